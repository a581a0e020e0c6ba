"""What fits: the memory one rank needs to train a LilLM, by kind, for DDP or FSDP on N ranks.

Per parameter, AdamW training in fp32 master weights costs 4 bytes of weights, 4 of gradients and 8 of Adam
moments (exp_avg, exp_avg_sq). DDP keeps all of it on every rank, plus a second copy of the gradients in its
communication buckets (DistributedDataParallel's default gradient_as_bucket_view=False). FSDP keeps 1/N of each
on every rank, plus the full weights (and gradients) of the unit being computed. Activations, the tensors autograd
saves for backward, depend on the micro-batch, not on the number of ranks; they are counted here tensor by tensor
for lillm.model (and checked against torch's saved-tensor hooks in tests/test_fsdp.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from lillm.flops import count_parameters
from lillm.model import ModelConfig

FP32 = 4


@dataclass
class TrainingMemory:
    """Bytes one rank holds at the peak of a training step, by kind."""

    weights: float
    gradients: float
    optimizer: float
    activations: float
    gathered: float = 0.0  # FSDP: full weights + gradients of the units being all-gathered / reduce-scattered

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.gathered

    def table(self) -> str:
        rows = [(k, getattr(self, k)) for k in ("weights", "gradients", "optimizer", "activations", "gathered")]
        return "\n".join(f"{name:<12}{value / 2**30:8.2f} GiB" for name, value in [*rows, ("total", self.total)])


def activation_bytes_per_token(config: ModelConfig, compute_bytes: int = 2, grad_checkpointing: bool = False) -> float:
    """Bytes autograd saves per token of a micro-batch (dropout 0), compute_bytes = 2 under bf16 autocast, 4 in fp32.

    Each RMSNorm saves its fp32 input, rsqrt and normalised output, and each matmul reading it its input in the
    compute dtype (under autocast every Linear keeps its own bf16 copy: 3 after the attention norm, 2 after the
    FFN norm; in fp32 they share one tensor); attention saves q, k, v, its output and a log-sum-exp per head
    (flash attention: no T x T matrix); SwiGLU saves gate, up, silu(gate) and their product. The head saves the
    fp32 log-softmax over the vocabulary, often the largest single tensor. With gradient checkpointing only each
    Block's fp32 input is kept, and one Block's tensors are rebuilt at a time in backward.
    """
    d, kv, h, a = config.dim, config.n_kv_heads * config.head_dim, config.ffn_hidden, compute_bytes

    def norm(readers: int) -> int:
        return FP32 * (2 * d + 1) + a * d * (readers if a < FP32 else 1)

    block = norm(3) + a * (d + 2 * kv) + a * d + FP32 * config.n_heads + norm(2) + 4 * a * h
    head = norm(1) + FP32 * config.vocab_size + 12  # + input ids (int64) and the loss weights
    layers = config.n_layers * FP32 * d + block if grad_checkpointing else config.n_layers * block
    return layers + head


def _largest_unit_parameters(config: ModelConfig) -> int:
    """Parameters of the biggest FSDP unit of lillm.sharding.shard_model: one Block, or the root (embedding)."""
    block = (count_parameters(config, include_embedding=False) - config.dim
             - (0 if config.tie_embeddings else config.vocab_size * config.dim)) // config.n_layers
    return max(block, config.vocab_size * config.dim)


def training_memory(
    config: ModelConfig,
    batch_size: int,
    seq_len: int | None = None,
    n_ranks: int = 1,
    strategy: str = "ddp",
    compute_bytes: int = 2,
    grad_accum: int = 1,
    grad_checkpointing: bool = False,
) -> TrainingMemory:
    """Peak bytes on one rank for micro-batches of batch_size x seq_len; strategy "ddp" or "fsdp".

    With FSDP and grad_accum > 1, lillm.train.fit keeps full gradients and weights between micro-steps (one
    reduce-scatter per optimizer step instead of one per micro-step): that memory is counted in `gathered`.
    """
    if strategy not in ("ddp", "fsdp"):
        raise ValueError(f"strategy must be 'ddp' or 'fsdp', got {strategy!r}")
    params = count_parameters(config)
    activations = batch_size * (seq_len or config.max_seq_len) * activation_bytes_per_token(
        config, compute_bytes, grad_checkpointing
    )
    if strategy == "ddp":
        buckets = FP32 * params if n_ranks > 1 else 0
        casts = params * compute_bytes if compute_bytes < FP32 else 0  # autocast's low-precision weight copies
        return TrainingMemory(FP32 * params, FP32 * params + buckets, 2 * FP32 * params, activations, casts)
    if grad_accum > 1:
        gathered = params * (compute_bytes + FP32)  # full weights and accumulated gradients of every unit
    else:
        gathered = 2 * _largest_unit_parameters(config) * (compute_bytes + FP32)  # this unit + the prefetched one
    return TrainingMemory(FP32 * params / n_ranks, FP32 * params / n_ranks, 2 * FP32 * params / n_ranks, activations, gathered)


def main(argv: list[str] | None = None) -> None:
    """python -m lillm.memory --dim 768 --n_layers 12 ... : the per-rank table for one model and micro-batch."""
    import argparse
    import dataclasses

    p = argparse.ArgumentParser(prog="python -m lillm.memory", description=main.__doc__)
    for f in dataclasses.fields(ModelConfig):
        if f.type in (int, "int", float, "float"):
            p.add_argument(f"--{f.name}", type=type(f.default), default=f.default)
    p.add_argument("--batch_size", type=int, default=32, help="sequences per micro-batch per rank")
    p.add_argument("--grad_accum", type=int, default=1)
    p.add_argument("--ranks", default="2,8", help="comma-separated rank counts to compare")
    p.add_argument("--fp32", action="store_true", help="compute in fp32 (default: bf16 autocast / mixed precision)")
    p.add_argument("--grad_checkpointing", action="store_true")
    args = p.parse_args(argv)
    config = ModelConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ModelConfig) if hasattr(args, f.name)})
    setups = [("1 GPU", 1, "ddp")] + [(f"{s.upper()} x {n}", n, s) for n in map(int, args.ranks.split(",")) for s in ("ddp", "fsdp")]
    print(f"{count_parameters(config) / 1e6:.1f}M parameters, micro-batch {args.batch_size} x {config.max_seq_len}, "
          f"{'fp32' if args.fp32 else 'bf16'}" + (", grad checkpointing" if args.grad_checkpointing else "") + "; GiB per rank")
    print(f"| setup | weights | gradients | Adam | activations | gathered/casts | total |\n|---|---|---|---|---|---|---|")
    for label, n, strategy in setups:
        m = training_memory(config, args.batch_size, None, n, strategy, 4 if args.fp32 else 2, args.grad_accum,
                            args.grad_checkpointing)
        cells = [m.weights, m.gradients, m.optimizer, m.activations, m.gathered, m.total]
        print(f"| {label} | " + " | ".join(f"{c / 2**30:.2f}" for c in cells) + " |")


if __name__ == "__main__":
    main()
