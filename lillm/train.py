"""Training machinery shared by pretrain.py and sft_train.py.

Devices and precision, torchrun/DDP set-up, the learning-rate schedule, the optimizer, RNG state for exact
resumes, logging (progress bar, CSV, TensorBoard, a loss-curve PNG) and `fit`, the optimisation loop itself.
The scripts only say where batches come from, how to evaluate and how to save.
"""

from __future__ import annotations

import csv
import math
import os
import random
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from lillm.devices import configure_cuda, cuda_device_for_rank, resolve_device
from lillm.sharding import full_tensor, is_sharded, load_full_optimizer_state, set_gradient_sync

# ---------------------------------------------------------------------------------------------- precision
# Which device and dtype: lillm.devices (resolve_device, resolve_dtype).


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision: matmuls in dtype, weights and optimizer state stay fp32. A no-op for fp32."""
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# ---------------------------------------------------------------------------------------------- distributed


@dataclass
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes files and prints."""
        return self.rank == 0


def setup_distributed(device_name: str = "auto") -> DistInfo:
    """Join the torchrun process group if RANK/WORLD_SIZE are set (nccl on CUDA, gloo on CPU)."""
    device = resolve_device(device_name)
    if device.type == "cuda":
        configure_cuda()
    if "RANK" not in os.environ:
        return DistInfo(0, 0, 1, device)
    rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    if device.type == "cuda":
        device = cuda_device_for_rank(local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank, local_rank, world, device)


def cleanup_distributed() -> None:
    """Leave the process group; call it from the script's `finally`. On a normal exit every rank first waits
    for the others (a barrier): a rank tearing down while rank 0 still works (SFT's end-of-run samples) could
    abort the job. With an exception in flight (SystemExit included) it leaves at once: the other ranks may be
    inside another collective, and a barrier would hang."""
    if not dist.is_initialized():
        return
    if sys.exc_info()[0] is None:
        nccl = dist.get_backend() == "nccl"
        dist.barrier(device_ids=[torch.cuda.current_device()] if nccl else None)
    dist.destroy_process_group()


def all_reduce_sum(values: list[float], info: DistInfo) -> list[float]:
    """Sum Python numbers over ranks (identity on one process)."""
    if info.world_size == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=info.device)
    dist.all_reduce(t)
    return t.tolist()


# ---------------------------------------------------------------------------------------------- optimisation


def lr_at(step: int, *, lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """Linear warm-up from ~0 to lr over warmup_steps, then cosine decay to min_lr at max_steps.
    step counts from 0; warm-up avoids huge early updates while Adam's moment estimates are still noisy."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def make_optimizer(
    model: torch.nn.Module, lr: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.95)
) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only: decaying norm gains would just fight the normalisation."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = all(p.is_cuda for p in params)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused or None)


# ---------------------------------------------------------------------------------------------- randomness


def set_seed(seed: int, rank: int = 0) -> None:
    """Seed Python's, numpy's and torch's RNGs (CUDA's included) with seed + rank. Scripts seed with rank 0
    before building the model (the same initial weights on every rank), then with their rank before training,
    so dropout masks differ between ranks. The data order draws from none of these: it is a function of
    (seed, step) alone (lillm.data.sample_batch, lillm.sft_data.batch_indices)."""
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed + rank)


def _own_rng_state(device: torch.device | None) -> dict:
    state = {
        "python": list(random.getstate()[1]),
        "python_pos": random.getstate()[2],
        "numpy": np.random.get_state()[1].tolist(),
        "numpy_pos": int(np.random.get_state()[2]),
        "torch": torch.get_rng_state(),
    }
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)  # this process's GPU only, never every visible one
    return state


def rng_state(info: DistInfo | None = None) -> dict:
    """Every RNG a run draws from, for a checkpoint (weights_only-loadable types only): rank 0's at the top
    level, and under "ranks" each rank's own (its CPU generators and its one GPU's), gathered from all ranks.
    Under torchrun every rank must call it (a collective); one process needs no info."""
    own = _own_rng_state(info.device if info is not None else None)
    if info is None or info.world_size == 1:
        return own
    ranks: list = [None] * info.world_size
    dist.all_gather_object(ranks, own)
    return {**ranks[0], "ranks": ranks}


def restore_rng_state(state: dict, info: DistInfo | None = None) -> None:
    """Put this rank's saved RNG streams back. A rank the saving run did not have keeps its fresh set_seed
    streams; a GPU state goes to this process's GPU whatever index it had when saved, so a resume on fewer
    (or other) GPUs works."""
    rank = info.rank if info is not None else 0
    saved = state.get("ranks", [state])
    if rank >= len(saved):
        return
    own = saved[rank]
    random.setstate((3, tuple(own["python"]), own["python_pos"]))
    np.random.set_state(("MT19937", np.array(own["numpy"], dtype=np.uint32), own["numpy_pos"], 0, 0.0))
    torch.set_rng_state(own["torch"])
    if "cuda" in own and info is not None and info.device.type == "cuda":
        torch.cuda.set_rng_state(own["cuda"], info.device)


# ---------------------------------------------------------------------------------------------- logging


class RunLogger:
    """Metrics to a CSV file and TensorBoard; a loss-curve PNG at the end. Does nothing on ranks other than 0."""

    def __init__(self, log_dir: str | os.PathLike | None, enabled: bool = True, resume: bool = False):
        self.enabled = enabled and log_dir is not None
        self.rows: list[dict] = []
        if not self.enabled:
            return
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.csv_path = self.log_dir / "metrics.csv"
        if resume and self.csv_path.is_file():
            with open(self.csv_path) as f:
                self.rows = [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]
        from torch.utils.tensorboard import SummaryWriter

        self.tensorboard = SummaryWriter(str(self.log_dir))

    def log(self, step: int, **metrics: float) -> None:
        if not self.enabled:
            return
        self.rows = [r for r in self.rows if not (r["step"] == step and set(metrics) <= set(r))]
        self.rows.append({"step": step, **metrics})
        for name, value in metrics.items():
            self.tensorboard.add_scalar(name, value, step)
        fields = sorted({k for r in self.rows for k in r}, key=lambda k: (k != "step", k))
        tmp = self.csv_path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(self.rows)
        os.replace(tmp, self.csv_path)

    def close(self, title: str = "loss") -> Path | None:
        """Flush TensorBoard and plot every *loss column against step into loss.png."""
        if not self.enabled:
            return None
        self.tensorboard.close()
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        for name in sorted({k for r in self.rows for k in r if k.endswith("loss")}):
            points = [(r["step"], r[name]) for r in self.rows if name in r]
            ax.plot(*zip(*points), label=name, marker="o" if name.startswith("val") else None, markersize=3)
        ax.set(xlabel="step", ylabel="cross-entropy (nats/token)", title=title)
        ax.grid(alpha=0.3)
        ax.legend()
        path = self.log_dir / "loss.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        return path


# ---------------------------------------------------------------------------------------------- the loop


class StepTimer:
    """Seconds spent in training steps only, for tokens/s and MFU: evaluation and checkpointing are paused out.
    On CUDA the clock is read after a synchronize (only at those pauses), so the GPU work queued by a window's
    steps is counted in that window. The first window is not reported: it pays for torch.compile, the
    allocator's and the kernels' warm-up, and would drag the average of a short run down."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds = 0.0  # in training steps, this window
        self.tokens = 0
        self.total_seconds = 0.0  # all windows, the first included
        self.windows = 0
        self.resume()

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def resume(self) -> None:
        self.started = self._now()

    def pause(self) -> None:
        self.seconds += self._now() - self.started

    def window_rate(self) -> float | None:
        """Tokens/s of the window that ends now (call while paused), None for the first; opens the next window."""
        rate = self.tokens / self.seconds if self.windows > 0 and self.seconds > 0 else None
        self.total_seconds += self.seconds
        self.windows += 1
        self.seconds, self.tokens = 0.0, 0
        return rate


@dataclass
class TrainConfig:
    max_steps: int
    lr: float
    min_lr: float
    warmup_steps: int
    weight_decay: float
    grad_clip: float
    grad_accum: int
    eval_interval: int
    ckpt_interval: int
    log_interval: int = 10


Batch = tuple[torch.Tensor, ...]  # (inputs, targets) or (inputs, targets, loss_mask)


def fit(
    model: torch.nn.Module,
    info: DistInfo,
    cfg: TrainConfig,
    get_batch: Callable[[int, int], Batch],
    evaluate: Callable[[], dict[str, float]],
    save: Callable[[int, torch.optim.Optimizer, dict], None],
    logger: RunLogger,
    dtype: torch.dtype,
    start_step: int = 0,
    optimizer_state: dict | None = None,
    tokens_per_step: int | None = None,
    flops_per_token: float | None = None,
    peak_flops: float | None = None,
    compile_model: bool = False,
) -> dict[str, float]:
    """Run optimizer steps start_step .. cfg.max_steps - 1 and return the last metrics.

    get_batch(step, micro_step) returns this rank's micro-batch on the right device. Each micro-batch loss is
    divided by grad_accum and DDP averages gradients over ranks, so N ranks x grad_accum A equals one process with
    grad_accum N*A when the chunks match. evaluate() runs with the model in eval mode on every rank. save(step,
    optimizer, metrics) is called on every rank after each ckpt_interval and at the end (it must write on rank 0
    only). tokens_per_step (over all ranks) drives tokens/s; with flops_per_token and peak_flops, MFU too, both
    over training steps alone (StepTimer). compile_model: torch.compile after the DDP wrap, so that DDP's
    bucketed all-reduce still overlaps the compiled backward (torch 2.x's recommended order).

    The step path never waits for the GPU: losses and the gradient norm stay on the device and are read once
    (one reduce, one copy) at steps that log, evaluate or save; the next micro-batch is fetched (and copied,
    non-blocking, from pinned memory if get_batch does so) while the GPU still runs the current one.
    The returned metrics add train_seconds, the time spent in training steps.
    A model sharded by lillm.sharding.shard_model trains with FSDP instead of DDP (same averaging, same results);
    optimizer_state is then the full state dict lillm.sharding.checkpoint_payload saved, re-sharded on load.
    """
    from tqdm.auto import tqdm

    sharded = is_sharded(model)  # FSDP (lillm.sharding.shard_model) replaces DDP: it reduces gradients itself
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay)
    if optimizer_state is not None and sharded:
        load_full_optimizer_state(model, optimizer, optimizer_state)
    elif optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    use_ddp = info.world_size > 1 and not sharded
    ddp_model = DDP(model, device_ids=[info.device.index] if info.device.type == "cuda" else None) if use_ddp else model
    train_model = torch.compile(ddp_model) if compile_model else ddp_model
    bar = tqdm(total=cfg.max_steps, initial=start_step, disable=not info.is_main, dynamic_ncols=True)
    metrics: dict[str, float] = {}
    timer = StepTimer(info.device)
    order = [(step, micro) for step in range(start_step, cfg.max_steps) for micro in range(cfg.grad_accum)]
    next_batch = get_batch(*order[0]) if order else None

    for step in range(start_step, cfg.max_steps):
        lr = lr_at(step, lr=cfg.lr, min_lr=cfg.min_lr, warmup_steps=cfg.warmup_steps, max_steps=cfg.max_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        model.train()
        loss_sum = torch.zeros((), device=info.device)
        for micro in range(cfg.grad_accum):
            batch = next_batch
            position = (step - start_step) * cfg.grad_accum + micro + 1
            last_micro = micro == cfg.grad_accum - 1
            sync = ddp_model.no_sync() if (use_ddp and not last_micro) else nullcontext()
            if sharded:
                set_gradient_sync(model, last_micro)
            with sync:
                with autocast(info.device, dtype):  # [1]: the logits are not kept alive past the loss
                    loss = train_model(*batch[:2], loss_mask=batch[2] if len(batch) > 2 else None)[1]
                next_batch = get_batch(*order[position]) if position < len(order) else None
                (loss / cfg.grad_accum).backward()
            loss_sum += loss.detach()
        # Under FSDP the gradients are DTensor shards: the norm is reduced over all ranks before clipping.
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        timer.tokens += tokens_per_step or 0
        done = step + 1
        log = done % cfg.log_interval == 0 or done == cfg.max_steps
        evaluate_now = done % cfg.eval_interval == 0 or done == cfg.max_steps
        save_now = done % cfg.ckpt_interval == 0 or done == cfg.max_steps
        if not (log or evaluate_now or save_now):
            bar.update(1)
            continue  # nothing to read: the host queues the next step without waiting
        timer.pause()
        step_values = torch.stack([loss_sum / cfg.grad_accum, full_tensor(grad_norm).float()])
        if info.world_size > 1:  # the loss averaged over ranks (the norm already is global)
            dist.all_reduce(step_values)
            step_values /= info.world_size  # the mean loss; the norm is the same on every rank
        train_loss, norm = step_values.tolist()  # the step's one device-to-host copy
        metrics = {"train_loss": train_loss, "lr": lr, "grad_norm": norm}
        if log:
            rate = timer.window_rate()
            if rate is not None and tokens_per_step:
                metrics["tokens_per_s"] = rate
                if flops_per_token and peak_flops:
                    metrics["mfu"] = rate * flops_per_token / (peak_flops * info.world_size)
            if info.device.type == "cuda":
                metrics["peak_memory_gib"] = torch.cuda.max_memory_allocated(info.device) / 2**30
            logger.log(done, **metrics)
        if evaluate_now:
            model.eval()
            with torch.no_grad(), autocast(info.device, dtype):
                eval_metrics = evaluate()
            metrics.update(eval_metrics)
            logger.log(done, **eval_metrics)
        postfix = {"loss": f"{train_loss:.3f}", "lr": f"{lr:.1e}"}
        if "tokens_per_s" in metrics:
            postfix["tok/s"] = f"{metrics['tokens_per_s']:.0f}"
        if "mfu" in metrics:
            postfix["mfu"] = f"{100 * metrics['mfu']:.1f}%"
        if "val_loss" in metrics:
            postfix["val"] = f"{metrics['val_loss']:.3f}"
        bar.set_postfix(postfix, refresh=False)
        bar.update(1)
        if save_now:
            save(done, optimizer, metrics)
        timer.resume()
    bar.close()
    return {**metrics, "train_seconds": timer.total_seconds}
