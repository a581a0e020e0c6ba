"""Evaluate a checkpoint: multiple-choice benchmarks, validation bits/byte, sample generations, as JSON.

    python evaluate.py --checkpoint checkpoints/base --tasks hellaswag,arc_easy,arc_challenge --limit 500
    python evaluate.py --checkpoint checkpoints/base --tasks "" --bpb ../shared/data/pretrain_tinystories_val.txt
    python evaluate.py --checkpoint checkpoints/sft --samples --out eval.json --report report.md

Multiple choice is scored by log-likelihood as lm-eval-harness does it (see lillm/evaluate.py); --limit N takes
the first N items of each set, so numbers are comparable across runs and tools. --bpb takes a text file
(documents separated by blank lines) or a .bin token shard with its meta.json. The evaluation sets are read
from --data_dir (default ../shared/data); they are for evaluation only, never train on them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from lillm import cli
from lillm.evaluate import TASKS, bits_per_byte, evaluate_task, get_task, load_items, sample_generations, tokenizer_sha256
from lillm.fileio import atomic_write_text, check_output_file
from lillm.generate import load_for_inference
from lillm.paths import default_data_dir
from lillm.report import machine_info, read_stage_times, render_report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint folder (pretrain.py, sft_train.py, convert_checkpoint.py)")
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, from {', '.join(TASKS)}; '' for none")
    p.add_argument("--limit", type=int, help="score only the first N items of each task (default: all)")
    p.add_argument("--data_dir", type=Path, default=default_data_dir(), help="folder with the eval_*.jsonl files")
    p.add_argument("--bpb", type=Path, help="text file or .bin shard to measure bits/byte on")
    p.add_argument("--bpb_tokens", type=int, help="measure bits/byte on about the first N tokens only")
    p.add_argument("--samples", action="store_true", help="greedy generations for a fixed set of prompts")
    p.add_argument("--sample_tokens", type=int, default=64, help="new tokens per sample")
    p.add_argument("--batch_size", type=int, default=32, help="sequences (choices) per forward pass")
    p.add_argument("--out", type=Path, help="write the results as JSON")
    p.add_argument("--report", type=Path, help="write a Markdown report card for this checkpoint")
    p.add_argument("--stage_times", type=Path, help="speedrun.sh's stage_times.tsv, for the report")
    p.add_argument("--device", type=cli.device, default="auto", help="auto (cuda > mps > cpu), cpu, cuda, ...")
    p.add_argument("--dtype", type=cli.dtype, default="auto", help="auto (bf16 on GPUs that support it, else fp32), fp32, bf16")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> list[tuple]:
    """Everything that can be wrong with the flags, found before the model is loaded. Returns (task, items) pairs."""
    for flag in ("limit", "bpb_tokens", "sample_tokens", "batch_size"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag} must be >= 1, got {value}")
    names = [name.strip() for name in args.tasks.split(",") if name.strip()]
    tasks = [get_task(name) for name in names]
    if tasks and args.data_dir is None:
        raise FileNotFoundError("no --data_dir given and no default data folder (../shared/data) found")
    if args.bpb is not None and not args.bpb.is_file():
        raise FileNotFoundError(f"--bpb file not found: {args.bpb}")
    if args.stage_times is not None and not args.stage_times.is_file():
        raise FileNotFoundError(f"--stage_times file not found: {args.stage_times}")
    for flag in ("out", "report"):
        if getattr(args, flag) is not None:
            check_output_file(getattr(args, flag), f"--{flag}")
    if not (tasks or args.bpb or args.samples):
        raise ValueError("nothing to do: give --tasks, --bpb or --samples")
    return [(task, load_items(task, args.data_dir / task.file, args.limit)) for task in tasks]


def loss_plot(meta: dict) -> str | None:
    """The training run's loss.png, if it is still where the run wrote it (--log_dir, else runs/<out_dir name>)."""
    args = meta.get("args") or {}
    log_dir = args.get("log_dir") or (Path("runs") / Path(args["out_dir"]).name if args.get("out_dir") else None)
    plot = Path(log_dir) / "loss.png" if log_dir else None
    return str(plot.resolve()) if plot is not None and plot.is_file() else None


def run(args: argparse.Namespace) -> dict:
    task_items = check_args(args)
    ckpt = load_for_inference(args.checkpoint, args.device, args.dtype)
    started = time.perf_counter()
    result = {
        "checkpoint": str(args.checkpoint),
        "model": {
            "parameters": ckpt.model.num_parameters(),
            "stage": ckpt.meta.get("stage"),
            "max_seq_len": ckpt.config.max_seq_len,
            "vocab_size": ckpt.config.vocab_size,
        },
        "tasks": {},
        "bpb": None,
        "samples": [],
        "meta": {k: v for k, v in ckpt.meta.items() if k != "args"},
        "loss_plot": loss_plot(ckpt.meta),
        "settings": {"limit": args.limit, "batch_size": args.batch_size, "device": str(next(ckpt.model.parameters()).device),
                     "dtype": str(next(ckpt.model.parameters()).dtype).removeprefix("torch.")},
    }
    for task, items in task_items:
        t0 = time.perf_counter()
        scores = evaluate_task(ckpt.model, ckpt.tokenizer, task, items, args.batch_size, progress=True)
        result["tasks"][task.name] = {**scores, "seconds": round(time.perf_counter() - t0, 2)}
        print(f"{task.name}: acc {scores['acc']:.4f}, acc_norm {scores['acc_norm']:.4f} on {scores['n']} items "
              f"(chance {scores['chance']:.4f})", flush=True)
    if args.bpb is not None:
        bpb = bits_per_byte(ckpt.model, ckpt.tokenizer, args.bpb, max_tokens=args.bpb_tokens,
                            tokenizer_sha256=tokenizer_sha256(ckpt.directory), progress=True)
        result["bpb"] = bpb.bits_per_byte
        result["bpb_data"] = {"file": bpb.file, "tokens": bpb.tokens, "bytes": bpb.bytes}
        print(f"bits/byte: {bpb.bits_per_byte:.4f} on {bpb.tokens:,} tokens of {args.bpb}", flush=True)
    if args.samples:
        result["samples"] = sample_generations(ckpt.model, ckpt.tokenizer, ckpt.meta, args.sample_tokens)
        for sample in result["samples"]:
            print(f"[{sample['kind']}] {sample['prompt']!r} -> {sample['output']!r}", flush=True)
    result["seconds"] = round(time.perf_counter() - started, 2)
    result["machine"] = machine_info()
    return result


@cli.error_boundary("evaluate.py")  # bad flags, data or checkpoint: one line, exit status 2
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    if args.out is not None:
        atomic_write_text(args.out, json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    if args.report is not None:
        times = read_stage_times(args.stage_times) if args.stage_times else None
        atomic_write_text(args.report, render_report([result], times, args.report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
