"""Pretrain LilLM on token shards, on one process or many (torchrun, DDP).

    python pretrain.py --preset tiny                                   # a laptop CPU, minutes
    torchrun --standalone --nproc_per_node=2 pretrain.py --preset base  # 2 GPUs
    python pretrain.py --preset tiny --resume                          # continue an interrupted run exactly

Every ModelConfig field is also a flag (--dim, --n_layers, --pos_encoding, ...), overriding the preset.
The checkpoint folder (--out_dir) is rewritten atomically every --ckpt_interval steps and at the end;
metrics go to --log_dir (CSV, TensorBoard, loss.png).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from pathlib import Path

import torch

from lillm import cli
from lillm.checkpoint import (
    TRAINER_STATE_SCHEMA,
    check_optimizer_state,
    check_out_dir,
    check_same_tokenizer,
    load_checkpoint,
    load_config,
    load_trainer_state,
    resolve,
    save_checkpoint,
)
from lillm.data import DataError, file_sha256, open_shards, sample_batch
from lillm.devices import enable_determinism, resolve_dtype, to_device
from lillm.flops import count_parameters, flops_per_token, peak_flops
from lillm.model import LilLM, ModelConfig
from lillm.sharding import checkpoint_payload, idle_forwards, local_parameter_bytes, shard_model
from lillm.tokenizer import load_tokenizer
from lillm.train import (
    RunLogger,
    TrainConfig,
    all_reduce_sum,
    cleanup_distributed,
    fit,
    make_optimizer,
    restore_rng_state,
    rng_state,
    set_seed,
    setup_distributed,
)

# Named starting points; any flag overrides them. Parameter counts for an 8k (32k) vocabulary. tiny: 1.8M (4.9M),
# 2M tokens, a 2-core CPU in minutes. small: 13M (22M), 82M tokens, one GPU. base: 82M (101M), 2.6B tokens per
# process, 1-2 GPUs.
PRESETS: dict[str, dict] = {
    "tiny": dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=256,
                 batch_size=8, grad_accum=1, lr=3e-3, min_lr=3e-4, warmup_steps=50, max_steps=1000,
                 eval_interval=100, ckpt_interval=250),
    # cpu: the tiny shape for a 2048-token tokenizer and bf16 autocast (README, "A faster CPU recipe"): 2.5x the
    # steps of tiny in about the same time on a 2-core CPU with native bf16.
    "cpu": dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=256,
                batch_size=8, grad_accum=1, lr=3e-3, min_lr=3e-4, warmup_steps=50, max_steps=2500,
                eval_interval=250, ckpt_interval=500),
    "small": dict(dim=384, n_layers=6, n_heads=6, n_kv_heads=2, max_seq_len=512,
                  batch_size=32, grad_accum=1, lr=1.5e-3, min_lr=1.5e-4, warmup_steps=200, max_steps=5000,
                  eval_interval=250, ckpt_interval=1000),
    "base": dict(dim=768, n_layers=12, n_heads=12, n_kv_heads=4, max_seq_len=1024,
                 batch_size=32, grad_accum=4, lr=6e-4, min_lr=6e-5, warmup_steps=500, max_steps=20000,
                 eval_interval=500, ckpt_interval=1000),
}
MODEL_FIELDS = [f for f in dataclasses.fields(ModelConfig) if f.name != "vocab_size"]
STATE_SCHEMA = {**TRAINER_STATE_SCHEMA, "data": {"seed": int, "next_step": int}}  # what --resume reads


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--data_dir", type=Path, default=Path("data/tinystories"), help="shards from data/prepare_pretrain.py")
    p.add_argument("--tokenizer", type=Path, help="tokenizer.json (default: the one saved with the shards)")
    p.add_argument("--out_dir", type=cli.output_dir, default=Path("checkpoints/base"), help="checkpoint folder")
    p.add_argument("--log_dir", type=cli.output_dir, help="metrics folder (default: runs/<out_dir name>)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out_dir")
    p.add_argument("--overwrite", action="store_true", help="replace the checkpoint in --out_dir (refused otherwise)")
    model = p.add_argument_group("model (override the preset)")
    model.add_argument("--vocab_size", type=int, help="default: the tokenizer's vocabulary size")
    for f in MODEL_FIELDS:
        kind = bool if f.type in (bool, "bool") else type(f.default) if f.default is not None else int
        if kind is bool:
            model.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=None)
        else:
            model.add_argument(f"--{f.name}", type=kind, default=None)
    train = p.add_argument_group("training (override the preset)")
    train.add_argument("--batch_size", type=int, help="sequences per micro-batch per process")
    train.add_argument("--grad_accum", type=int, help="micro-batches per optimizer step per process")
    train.add_argument("--lr", type=float, help="peak learning rate")
    train.add_argument("--min_lr", type=float, help="learning rate at the end of the cosine decay")
    train.add_argument("--warmup_steps", type=int)
    train.add_argument("--max_steps", type=int, help="optimizer steps")
    train.add_argument("--max_tokens", type=float, help="token budget; sets max_steps (e.g. 5e7)")
    train.add_argument("--weight_decay", type=float, default=0.1)
    train.add_argument("--grad_clip", type=float, default=1.0, help="clip the global gradient norm (0: off)")
    train.add_argument("--eval_interval", type=int)
    train.add_argument("--eval_batches", type=int, default=20)
    train.add_argument("--ckpt_interval", type=int)
    train.add_argument("--log_interval", type=int, default=10)
    train.add_argument("--seed", type=int, default=1337)
    train.add_argument("--device", type=cli.device, default="auto", help="auto (cuda > mps > cpu), cpu, cuda, ...")
    train.add_argument("--dtype", type=cli.dtype, default="auto", help="auto (bf16 where supported), fp32 or bf16")
    train.add_argument("--compile", action="store_true", help="torch.compile the model (after the DDP wrap); for GPUs")
    train.add_argument("--deterministic", action="store_true",
                       help="deterministic CUDA kernels: bit-exact resumes on GPUs too, somewhat slower")
    train.add_argument("--grad_checkpointing", action="store_true", help="recompute activations in backward")
    train.add_argument("--fsdp", action="store_true", help="shard weights, gradients and optimizer state over ranks (FSDP2)")
    args = p.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def model_config(args: argparse.Namespace, tokenizer_vocab: int) -> ModelConfig:
    vocab_size = args.vocab_size or tokenizer_vocab
    if vocab_size < tokenizer_vocab:
        raise ValueError(f"--vocab_size {vocab_size} is smaller than the tokenizer's vocabulary ({tokenizer_vocab} tokens)")
    given = {f.name: getattr(args, f.name) for f in MODEL_FIELDS if getattr(args, f.name) is not None}
    return ModelConfig(vocab_size=vocab_size, **given)


@cli.error_boundary("pretrain.py")  # bad flags, shards or checkpoint: one line, exit status 2
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    info = setup_distributed(args.device)
    try:
        run(args, info)
    finally:
        cleanup_distributed()


def run(args: argparse.Namespace, info) -> None:
    for name in ("batch_size", "grad_accum", "eval_interval", "eval_batches", "ckpt_interval", "log_interval"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be at least 1, got {getattr(args, name)}")
    check_out_dir(args.out_dir, args.resume, args.overwrite)
    if args.deterministic:
        enable_determinism()
    set_seed(args.seed)
    config = state = None
    if args.resume:
        resume_dir = resolve(args.out_dir)  # DIR, or DIR.old if a save was cut off
        config, state = load_config(resume_dir), load_trainer_state(resume_dir, STATE_SCHEMA)
        if state["data"]["seed"] != args.seed:
            raise ValueError(f"{args.out_dir} was trained with --seed {state['data']['seed']}; resume with the same seed")
    shards = open_shards(args.data_dir, config.max_seq_len if config else args.max_seq_len)
    tokenizer_path = args.tokenizer or args.data_dir / "tokenizer.json"
    tokenizer = load_tokenizer(tokenizer_path)
    if file_sha256(tokenizer_path) != shards.meta["tokenizer_sha256"]:
        raise DataError(f"{tokenizer_path} is not the tokenizer the shards in {args.data_dir} were made with (SHA-256 differs)")
    if state is not None:
        check_same_tokenizer(resume_dir, shards.meta["tokenizer_sha256"], f"the shards in {args.data_dir}")
    config = config or model_config(args, tokenizer.get_vocab_size())
    if config.vocab_size < shards.meta["vocab_size"]:
        raise ValueError(f"model vocab_size {config.vocab_size} is smaller than the shards' tokenizer ({shards.meta['vocab_size']})")
    if args.max_tokens:
        args.max_steps = math.ceil(args.max_tokens / (args.batch_size * args.grad_accum * info.world_size * config.max_seq_len))
    if args.max_steps < 1:
        raise ValueError(f"--max_steps must be at least 1, got {args.max_steps}")

    dtype = resolve_dtype(args.dtype, info.device)
    # Resuming, the weights come through the one strict load path (names, shapes, tokenizer all checked).
    model = load_checkpoint(resume_dir, info.device).model.train() if state is not None else LilLM(config).to(info.device)
    model.gradient_checkpointing = args.grad_checkpointing
    set_seed(args.seed, info.rank)  # the weights are rank 0's everywhere; dropout differs between ranks
    start_step, optimizer_state = 0, None
    if state is not None:
        check_optimizer_state(state["optimizer"], make_optimizer(model, args.lr, args.weight_decay), resume_dir / "trainer_state.pt")
        start_step, optimizer_state = state["step"], state["optimizer"]
        restore_rng_state(state["rng"], info)
        if start_step >= args.max_steps:
            raise ValueError(f"{args.out_dir} is already at step {start_step} >= --max_steps {args.max_steps}")
    if args.fsdp:
        if args.compile:
            raise ValueError("--compile with --fsdp is not supported yet; drop one of them")
        shard_model(model, info.device, dtype)  # in place: model now holds this rank's shards

    seq_len, batch_size, accum = config.max_seq_len, args.batch_size, args.grad_accum
    tokens_per_step = batch_size * accum * info.world_size * seq_len
    log_dir = args.log_dir or Path("runs") / args.out_dir.name
    logger = RunLogger(log_dir, enabled=info.is_main, resume=args.resume)
    if info.is_main:
        print(
            f"LilLM {count_parameters(config) / 1e6:.2f}M parameters | {info.world_size} process(es) on {info.device} "
            f"({str(dtype).removeprefix('torch.')}) | {tokens_per_step:,} tokens/step | {args.max_steps} steps "
            f"({tokens_per_step * args.max_steps / 1e6:.1f}M tokens) | train shard {len(shards.train):,} tokens"
            + (f" | FSDP: rank 0 holds {local_parameter_bytes(model) / 2**20:.2f} MiB of parameters" if args.fsdp else "")
        )

    def get_batch(step: int, micro: int):
        x, y = sample_batch(shards.train, batch_size, seq_len, args.seed, step, chunk=info.rank * accum + micro)
        return to_device(x, info.device), to_device(y, info.device)

    def evaluate() -> dict[str, float]:
        """Mean loss over the same eval_batches validation batches at every evaluation, split over ranks."""
        total = 0.0
        mine = range(info.rank, args.eval_batches, info.world_size)
        for i in mine:
            x, y = sample_batch(shards.val, batch_size, seq_len, seed=0, step=i)
            total += model(x.to(info.device), y.to(info.device))[1].item()
        idle_forwards(model, len(range(0, args.eval_batches, info.world_size)) - len(mine), info.device)
        val_loss = all_reduce_sum([total], info)[0] / args.eval_batches
        return {"val_loss": val_loss, "val_bpb": val_loss / math.log(2) / shards.val_bytes_per_token}

    started = time.perf_counter()

    def save(step: int, optimizer, metrics: dict) -> None:
        weights, optimizer_state = checkpoint_payload(model, optimizer)  # FSDP gathers: every rank takes part
        rng = rng_state(info)  # every rank's streams, gathered: also a collective
        if not info.is_main:
            return
        meta = {
            "stage": "base",
            "step": step,
            "tokens_seen": step * tokens_per_step,
            "data_dir": str(args.data_dir),
            "metrics": metrics,
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        }
        # The data position is (seed, step): batches are a pure function of them (lillm.data.sample_batch).
        trainer_state = {
            "step": step, "optimizer": optimizer_state, "rng": rng,
            "data": {"seed": args.seed, "next_step": step},
        }
        save_checkpoint(args.out_dir, weights, tokenizer_path, meta=meta, trainer_state=trainer_state)

    cfg = TrainConfig(
        max_steps=args.max_steps, lr=args.lr, min_lr=args.min_lr, warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay, grad_clip=args.grad_clip, grad_accum=accum,
        eval_interval=args.eval_interval, ckpt_interval=args.ckpt_interval, log_interval=args.log_interval,
    )
    metrics = fit(
        model, info, cfg, get_batch, evaluate, save, logger, dtype,
        start_step=start_step, optimizer_state=optimizer_state, tokens_per_step=tokens_per_step,
        flops_per_token=flops_per_token(config, seq_len), peak_flops=peak_flops(info.device), compile_model=args.compile,
    )
    plot = logger.close(title=f"pretraining {args.out_dir.name}")
    if info.is_main:
        print(
            f"done in {time.perf_counter() - started:.0f} s: val loss {metrics['val_loss']:.4f}, "
            f"val bits/byte {metrics['val_bpb']:.4f} -> {args.out_dir}" + (f" (curve: {plot})" if plot else "")
        )


if __name__ == "__main__":
    main()
