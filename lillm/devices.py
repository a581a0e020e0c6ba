"""Which device and precision a run uses, and the CUDA settings that go with them.

Shared by training (lillm.train), inference (lillm.generate) and the benches, so that "auto" means the same
everywhere: cuda > mps > cpu, and bf16 only where the GPU computes it natively.
"""

from __future__ import annotations

import os

import torch

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' picks cuda > mps > cpu; anything else is passed to torch.device (a CUDA name needs a visible GPU)."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA GPU is visible to torch {torch.__version__}; use --device cpu")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' picks bf16 on GPUs with native bf16 (Ampere and later), fp32 elsewhere: a V100 or T4 would only
    emulate bf16 (slowly), and CPU bf16 matmuls are slow on most CPUs."""
    if name == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
        return torch.bfloat16 if bf16 else torch.float32
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use auto, fp32 or bf16")
    return DTYPES[name]


def cuda_device_for_rank(local_rank: int) -> torch.device:
    """This process's GPU under torchrun: cuda:LOCAL_RANK, refused in one line when torchrun started more
    processes than there are visible GPUs (torch would fail later with "invalid device ordinal")."""
    visible = torch.cuda.device_count()
    if local_rank >= visible:
        raise ValueError(
            f"process LOCAL_RANK={local_rank} has no GPU: only {visible} visible "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); "
            f"start torchrun with --nproc_per_node={visible} or fewer"
        )
    return torch.device("cuda", local_rank)


def configure_cuda() -> None:
    """Let fp32 matmuls that remain (fp32 runs, autocast's fp32 ops) use TF32 tensor cores: ~8x the fp32 rate
    on Ampere and later, 10 mantissa bits instead of 23, which training does not notice."""
    torch.set_float32_matmul_precision("high")


def enable_determinism() -> None:
    """Make CUDA kernels deterministic (--deterministic): no atomics-based reductions in backward (embedding,
    attention), a fixed cuBLAS workspace. Slower; needed for bit-exact resumes and repeatable runs on GPUs
    (on CPUs they already are). Must run before the first CUDA matmul."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host batch on its device. On CUDA through pinned memory with non_blocking=True: the copy is queued
    behind the GPU's current work instead of stalling the host (fit fetches the next batch meanwhile)."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)
