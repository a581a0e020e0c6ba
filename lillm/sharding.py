"""Fully sharded data parallel (FSDP2, `torch.distributed.fsdp.fully_shard`) for LilLM.

DDP keeps a full copy of the weights, gradients and Adam moments on every rank: 16 bytes per parameter, whatever
the number of GPUs. FSDP cuts each of them into N pieces (dim 0 of every tensor, one piece per rank). Before a
Block runs (forward, and again in backward), its pieces are all-gathered into the full weights and dropped right
after; its gradients are reduce-scattered, so each rank keeps the gradient (and the Adam moments) of its own piece.
Per rank that is 16/N bytes per parameter plus the full weights of the Block in flight, and the activations, which
sharding does not touch (lillm.memory counts each part).

The checkpoint folder stays the one a single process writes (lillm.checkpoint): on save the shards are gathered
into one full state dict on rank 0's CPU, and the optimizer state into the same id-keyed layout that
`torch.optim.Optimizer.state_dict()` gives without sharding. A run saved with --fsdp resumes with or without it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from lillm.model import LilLM

# The whole state dict on rank 0 (not one file per rank, which only a same-sized job could read back), tensors
# moved to CPU one by one as they are gathered (so the GPU never holds a second full copy); other ranks get {}.
FULL_ON_RANK0 = StateDictOptions(full_state_dict=True, cpu_offload=True)


def is_sharded(model: nn.Module) -> bool:
    """model, or a module inside it (e.g. the policy of lillm.dpo.DPOObjective), was sharded by shard_model."""
    return any(isinstance(m, FSDPModule) for m in model.modules())


def shard_model(model: LilLM, device: torch.device, dtype: torch.dtype) -> LilLM:
    """Shard model in place over every rank of the process group and return it.

    Each Block is its own unit (all-gathered just before it runs, freed just after). The root unit holds the
    rest: the embedding, tied to the output head (one matrix, so one unit, used first and last), and the final
    norm; an untied embedding gets a unit of its own. With a bf16 dtype the gathered weights are cast to bf16 for
    compute while the shards, the gradients' reduction and the optimizer stay fp32 (as autocast does without FSDP).
    """
    if not dist.is_initialized():
        raise ValueError("--fsdp needs a process group: launch with torchrun (--nproc_per_node 1 for one process)")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    if dtype == torch.float32:
        policy = MixedPrecisionPolicy()
    else:
        policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for block in model.layers:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    if not model.config.tie_embeddings:
        fully_shard(model.embed_tokens, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def set_gradient_sync(model: nn.Module, last_micro_step: bool) -> None:
    """Gradient accumulation under FSDP: on all but the last micro-step, keep the full gradients local (no
    reduce-scatter) and keep the gathered weights after backward (the next micro-step's forward needs them again);
    the last micro-step reduce-scatters the accumulated sum once and frees the full weights."""
    for unit in model.modules():
        if isinstance(unit, FSDPModule):
            unit.set_requires_gradient_sync(last_micro_step, recurse=False)
            unit.set_reshard_after_backward(last_micro_step, recurse=False)


def local_parameter_bytes(model: nn.Module) -> int:
    """Bytes of parameters this rank actually stores: its local shard of each DTensor, or the whole tensor."""
    total = 0
    for p in model.parameters():
        local = p.to_local() if isinstance(p, DTensor) else p
        total += local.numel() * local.element_size()
    return total


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's global value (a collective), or t itself."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def gather_full_model(model: LilLM) -> LilLM | None:
    """A plain CPU LilLM with the full weights on rank 0, None elsewhere. Every rank must call it (all-gathers)."""
    state = get_model_state_dict(model, options=FULL_ON_RANK0)
    if dist.get_rank() != 0:
        return None
    plain = LilLM(model.config)
    plain.load_state_dict(state)
    return plain


def _parameter_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The name of each parameter in the optimizer's order: the i-th one is id i in optimizer.state_dict()."""
    names = {id(p): name for name, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict | None:
    """The full optimizer state dict on rank 0, keyed by parameter id as an unsharded optimizer's would be;
    None on other ranks. Every rank must call it (the moments are gathered like the weights)."""
    names = _parameter_names(model, optimizer)
    by_name = get_optimizer_state_dict(model, optimizer, options=FULL_ON_RANK0)
    if dist.get_rank() != 0:
        return None
    ids = {name: i for i, name in enumerate(names)}
    groups = [{**g, "params": [ids[name] for name in g["params"]]} for g in by_name["param_groups"]]
    return {"state": {ids[name]: s for name, s in by_name["state"].items()}, "param_groups": groups}


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load an id-keyed full optimizer state dict (saved with or without FSDP) into a sharded optimizer: each rank
    keeps its own slice of every moment."""
    names = _parameter_names(model, optimizer)
    by_name = {
        "state": {names[i]: s for i, s in state["state"].items()},
        "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]],
    }
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))


def checkpoint_payload(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[nn.Module | None, dict | None]:
    """(model to save, optimizer state dict) for lillm.checkpoint.save_checkpoint; under FSDP the full ones on
    rank 0 and (None, None) elsewhere. Call it on every rank, then write on rank 0 only."""
    if not is_sharded(model):
        return model, optimizer.state_dict()
    return gather_full_model(model), full_optimizer_state(model, optimizer)


def idle_forwards(model: nn.Module, count: int, device: torch.device) -> None:
    """Under FSDP every forward is a collective (each unit all-gathers its weights), so a rank that ran out of
    evaluation batches must still join its peers' remaining forwards: this runs count one-token forwards."""
    if not is_sharded(model):
        return
    token = torch.zeros(1, 1, dtype=torch.long, device=device)
    for _ in range(count):
        model(token)
