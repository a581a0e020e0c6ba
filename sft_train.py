"""Supervised fine-tuning: teach a pretrained LilLM to chat, with the loss on assistant tokens only.

    python sft_train.py --init checkpoints/base                         # chat_{train,val}.jsonl from ../shared/data
    python sft_train.py --init checkpoints/base --lora_rank 8           # LoRA adapters, merged into the saved weights
    torchrun --standalone --nproc_per_node=2 sft_train.py --init checkpoints/base --dataset HuggingFaceTB/smoltalk \\
        --dataset_config all --val_split test

Writes a self-contained checkpoint folder (--out_dir) with meta.json "stage": "sft", the held-out assistant loss
and the rate of sampled replies that end with <|im_end|>.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from lillm.chat import CHAT_TEMPLATE_VERSION, DEFAULT_SYSTEM_PROMPT
from lillm.checkpoint import load_checkpoint, load_trainer_state, resolve, save_checkpoint
from lillm.lora import apply_lora, lora_state_dict, merge_lora
from lillm.paths import default_data_file
from lillm.sft_data import SFTDataset, batch_indices, build_sft_dataset, collate, hub_conversations, read_jsonl_conversations
from lillm.tokenizer import atomic_write_text
from lillm.train import (
    RunLogger,
    TrainConfig,
    all_reduce_sum,
    cleanup_distributed,
    fit,
    resolve_dtype,
    restore_rng_state,
    rng_state,
    set_seed,
    setup_distributed,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--init", type=Path, required=True, help="pretrained checkpoint folder (from pretrain.py)")
    p.add_argument("--train_file", type=Path, help="chat jsonl (default: ../shared/data/chat_train.jsonl)")
    p.add_argument("--val_file", type=Path, help="held-out chat jsonl (default: ../shared/data/chat_val.jsonl)")
    p.add_argument("--dataset", help="Hugging Face chat dataset instead of files (e.g. HuggingFaceTB/smoltalk)")
    p.add_argument("--dataset_config", help="its configuration (e.g. all)")
    p.add_argument("--split", default="train")
    p.add_argument("--val_split", default="test")
    p.add_argument("--max_conversations", type=int, help="use at most this many training conversations")
    p.add_argument("--messages_field", default="messages")
    p.add_argument("--system", default=DEFAULT_SYSTEM_PROMPT, help="system message for conversations without one ('' for none)")
    p.add_argument("--overflow", choices=["truncate", "drop"], default="truncate", help="what to do with conversations longer than the context")
    p.add_argument("--train_on_inputs", action="store_true", help="also train on system/user tokens (for comparison)")
    p.add_argument("--out_dir", type=Path, default=Path("checkpoints/sft"))
    p.add_argument("--log_dir", type=Path, help="metrics folder (default: runs/<out_dir name>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out_dir")
    p.add_argument("--batch_size", type=int, default=16, help="conversations per micro-batch per process")
    p.add_argument("--grad_accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--min_lr", type=float, default=1e-4)
    p.add_argument("--warmup_steps", type=int, default=30)
    p.add_argument("--max_steps", type=int, default=300)
    p.add_argument("--weight_decay", type=float, default=0.0)
    p.add_argument("--grad_clip", type=float, default=1.0)
    p.add_argument("--eval_interval", type=int, default=100)
    p.add_argument("--max_eval_conversations", type=int, default=200, help="held-out conversations in each eval")
    p.add_argument("--ckpt_interval", type=int, default=100)
    p.add_argument("--log_interval", type=int, default=10)
    p.add_argument("--lora_rank", type=int, default=0, help="> 0: train LoRA adapters of this rank instead of all weights")
    p.add_argument("--lora_alpha", type=float, default=16.0)
    p.add_argument("--eval_samples", type=int, default=20, help="held-out prompts to sample replies for at the end")
    p.add_argument("--sample_max_tokens", type=int, default=128)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--grad_checkpointing", action="store_true")
    return p.parse_args(argv)


def conversations(args: argparse.Namespace, split: str, limit: int | None) -> tuple[Iterator, str]:
    """(conversations, where they come from) for split "train" or "val": --dataset, the files, or the defaults."""
    if args.dataset:
        hub_split = args.split if split == "train" else args.val_split
        convs = hub_conversations(args.dataset, hub_split, args.messages_field, args.dataset_config)
        where = f"{args.dataset}:{hub_split}"
    else:
        path = (args.train_file if split == "train" else args.val_file) or default_data_file(f"chat_{split}.jsonl")
        convs, where = read_jsonl_conversations(path, args.messages_field), str(path)
    return (itertools.islice(convs, limit) if limit else convs), where


def load_split(args, tokenizer, split: str, limit: int | None, max_seq_len: int) -> SFTDataset:
    convs, where = conversations(args, split, limit)
    return build_sft_dataset(tokenizer, convs, max_seq_len, args.overflow, args.system or None, where=f"{where}: conversation")


def assistant_loss(model, data: SFTDataset, info, batch_size: int) -> float:
    """Mean cross-entropy over every assistant token of the held-out set (token-weighted, all ranks)."""
    total, count = 0.0, 0.0
    for start in range(info.rank * batch_size, len(data), batch_size * info.world_size):
        x, y, mask = collate(data.ids[start : start + batch_size], data.masks[start : start + batch_size])
        x, y, mask = x.to(info.device), y.to(info.device), mask.to(info.device)
        n = mask.sum().item()
        total += model(x, y, loss_mask=mask)[1].item() * n
        count += n
    total, count = all_reduce_sum([total, count], info)
    return total / count


def im_end_rate(model, tokenizer, val_convs: list, max_tokens: int, system: str | None) -> float:
    """Fraction of greedy replies to held-out first user turns that end with <|im_end|> within max_tokens."""
    from lillm.chat import render
    from lillm.generate import SamplingConfig, generate_ids
    from lillm.tokenizer import IM_END_ID

    cfg = SamplingConfig(temperature=0.0, max_new_tokens=max_tokens, stop_ids=(IM_END_ID,))
    ended = 0
    for messages in val_convs:
        prompt, _ = render(tokenizer, messages[:1], add_generation_prompt=True, system=system)
        room = model.config.max_seq_len - len(prompt)
        reply = list(generate_ids(model, prompt, cfg))
        ended += len(reply) < min(max_tokens, room)
    return ended / len(val_convs)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    info = setup_distributed(args.device)
    try:
        run(args, info)
    except (ValueError, FileNotFoundError) as e:
        print(f"sft_train.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        cleanup_distributed()


def run(args: argparse.Namespace, info) -> None:
    set_seed(args.seed)
    base = load_checkpoint(args.init, device=info.device)
    model, tokenizer, config = base.model, base.tokenizer, base.config
    tokenizer_path = base.directory / "tokenizer.json"
    train = load_split(args, tokenizer, "train", args.max_conversations, config.max_seq_len)
    val = load_split(args, tokenizer, "val", args.max_eval_conversations, config.max_seq_len)
    if info.is_main:
        print(f"train: {train.summary()}\nval:   {val.summary()}")

    if args.lora_rank > 0:
        trainable = apply_lora(model, args.lora_rank, args.lora_alpha)
        if info.is_main:
            print(f"LoRA rank {args.lora_rank}: {trainable:,} trainable parameters of {model.num_parameters():,}")
    model.gradient_checkpointing = args.grad_checkpointing

    start_step, optimizer_state = 0, None
    if args.resume:
        state = load_trainer_state(resolve(args.out_dir))
        start_step, optimizer_state = state["step"], state["optimizer"]
        if args.lora_rank > 0:
            model.load_state_dict(state["lora"], strict=False)
        else:
            model.load_state_dict(load_checkpoint(args.out_dir, device=info.device).model.state_dict())
        restore_rng_state(state["rng"])
        if start_step >= args.max_steps:
            raise ValueError(f"{args.out_dir} is already at step {start_step} >= --max_steps {args.max_steps}")

    dtype = resolve_dtype(args.dtype, info.device)
    train_model = torch.compile(model) if args.compile else model
    chunks = info.world_size * args.grad_accum
    logger = RunLogger(args.log_dir or Path("runs") / args.out_dir.name, enabled=info.is_main, resume=args.resume)

    def get_batch(step: int, micro: int):
        rows = batch_indices(len(train), args.batch_size, args.seed, step, info.rank * args.grad_accum + micro, chunks)
        batch = collate([train.ids[i] for i in rows], [train.masks[i] for i in rows], args.train_on_inputs)
        return tuple(t.to(info.device) for t in batch)

    def evaluate() -> dict[str, float]:
        return {"val_loss": assistant_loss(model, val, info, args.batch_size)}

    def save(step: int, optimizer, metrics: dict) -> None:
        if not info.is_main:
            return
        plain = merge_lora(copy.deepcopy(model)) if args.lora_rank > 0 else model
        state = {"step": step, "optimizer": optimizer.state_dict(), "rng": rng_state()}
        if args.lora_rank > 0:
            state["lora"] = lora_state_dict(model)
        meta = {
            "stage": "sft",
            "chat_template_version": CHAT_TEMPLATE_VERSION,
            "system_prompt": args.system,
            "init": str(args.init),
            "step": step,
            "metrics": metrics,
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        }
        save_checkpoint(args.out_dir, plain, tokenizer_path, meta=meta, trainer_state=state)

    started = time.perf_counter()
    with torch.no_grad():
        model.eval()
        initial = assistant_loss(model, val, info, args.batch_size)
    if info.is_main:
        print(f"held-out assistant loss before SFT: {initial:.4f}")
    cfg = TrainConfig(
        max_steps=args.max_steps, lr=args.lr, min_lr=args.min_lr, warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay, grad_clip=args.grad_clip, grad_accum=args.grad_accum,
        eval_interval=args.eval_interval, ckpt_interval=args.ckpt_interval, log_interval=args.log_interval,
    )
    metrics = fit(train_model, info, cfg, get_batch, evaluate, save, logger, dtype,
                  start_step=start_step, optimizer_state=optimizer_state)
    logger.close(title=f"SFT {args.out_dir.name} (assistant tokens only)" if not args.train_on_inputs else "SFT (all tokens)")
    if not info.is_main:
        return
    summary = {"val_loss_before": initial, "val_loss": metrics["val_loss"], "seconds": time.perf_counter() - started}
    final = load_checkpoint(args.out_dir, device=info.device)  # what was saved: LoRA merged
    if args.eval_samples > 0:
        val_convs = list(conversations(args, "val", args.eval_samples)[0])
        summary["im_end_rate"] = im_end_rate(final.model, tokenizer, val_convs, args.sample_max_tokens, args.system or None)
    atomic_write_text(final.directory / "meta.json", json.dumps({**final.meta, "summary": summary}, indent=2) + "\n")
    print(
        f"done in {summary['seconds']:.0f} s: held-out assistant loss {initial:.4f} -> {metrics['val_loss']:.4f}"
        + (f", replies ending with <|im_end|>: {summary['im_end_rate']:.0%}" if "im_end_rate" in summary else "")
        + f" -> {args.out_dir}"
    )


if __name__ == "__main__":
    main()
