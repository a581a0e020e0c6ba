"""The measurements of bench/gpu_check.sh that need Python, and its markdown table.

    python bench/gpu_check.py --checkpoint CKPT --runs RUNS --shards SHARDS --device cuda --resumed_at 150

Reads the pretraining numbers (tokens/s and MFU over training steps only, peak memory) from the run's
metrics.csv, then measures on the trained checkpoint: host syncs per training step (torch.cuda.set_sync_debug_mode
on CUDA; on a CPU, lillm's tensor reads .item()/.tolist()/float()/int()/bool() are counted instead), the rotary
angle error and logit drift of bf16 at the second half of the context, and which SDPA kernel prefill, one-token
decoding, padded batch decoding and fp32 training run. Prints the table and writes it to --out.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lillm.checkpoint import load_checkpoint  # noqa: E402
from lillm.devices import resolve_device, to_device  # noqa: E402
from lillm.generate import load_for_inference  # noqa: E402
from lillm.model import KVCache  # noqa: E402
from lillm.train import DistInfo, RunLogger, TrainConfig, fit  # noqa: E402


def training_numbers(runs: Path) -> dict[str, float]:
    """Mean tokens/s and MFU over the logged windows (the first window after each start is never logged),
    the highest peak memory, and the last validation numbers."""
    with open(runs / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    column = lambda name: [float(r[name]) for r in rows if r.get(name)]  # noqa: E731
    out = {"steps": max(int(float(r["step"])) for r in rows)}
    for name, reduce in (("tokens_per_s", statistics.mean), ("mfu", statistics.mean), ("peak_memory_gib", max),
                         ("val_loss", lambda v: v[-1]), ("val_bpb", lambda v: v[-1])):
        if column(name):
            out[name] = reduce(column(name))
    return out


def syncs_per_step(checkpoint: Path, device: torch.device, dtype: torch.dtype, steps: int = 30, log_interval: int = 10,
                   grad_accum: int = 2, batch_size: int = 4) -> tuple[Counter, str]:
    """Run lillm.train.fit for `steps` steps on random batches and count the host syncs of each step."""
    model = load_checkpoint(checkpoint, device).model.train()
    T, V = model.config.max_seq_len, model.config.vocab_size
    data = torch.randint(0, V, (grad_accum, batch_size, T + 1), generator=torch.Generator().manual_seed(0))
    forwards = [0]
    model.register_forward_pre_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))
    counts: Counter = Counter()

    def record() -> None:
        counts[max(forwards[0] - 1, 0) // grad_accum + 1] += 1  # the step whose forwards ran last

    def get_batch(step, micro):
        rows = data[micro]
        return to_device(rows[:, :-1], device), to_device(rows[:, 1:], device)

    cfg = TrainConfig(max_steps=steps, lr=1e-4, min_lr=1e-5, warmup_steps=1, weight_decay=0.1, grad_clip=1.0,
                      grad_accum=grad_accum, eval_interval=steps, ckpt_interval=steps, log_interval=log_interval)
    run = lambda: fit(model, DistInfo(0, 0, 1, device), cfg, get_batch, dict, lambda *a: None, RunLogger(None), dtype)  # noqa: E731
    if device.type == "cuda":
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("always")
                warnings.showwarning = lambda *a, **k: record()
                run()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        return counts, "torch.cuda.set_sync_debug_mode"
    originals = {name: getattr(torch.Tensor, name) for name in ("item", "tolist", "__float__", "__int__", "__bool__")}

    def counting(original):
        def wrapped(self, *args, **kwargs):
            if "/lillm/" in sys._getframe(1).f_code.co_filename:  # lillm's reads, not torch's CPU optimizer's
                record()
            return original(self, *args, **kwargs)
        return wrapped

    for name, original in originals.items():
        setattr(torch.Tensor, name, counting(original))
    try:
        run()
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
    return counts, "on a CPU: tensor reads in lillm code, counted"


def rope_drift(checkpoint: Path, shards: Path, device: torch.device) -> dict[str, float]:
    """Positions T/2 .. T-1 of real validation text: rotary angle error and bf16-vs-fp32 logit error, now and
    with inv_freq rounded to bf16 (what a plain model.to(bfloat16) did before the fix)."""
    fp32 = load_for_inference(checkpoint, str(device), "fp32").model
    bf16 = load_for_inference(checkpoint, str(device), "bf16").model
    T = fp32.config.max_seq_len
    ids = torch.from_numpy(np.fromfile(shards / "val.bin", dtype=np.uint16 if fp32.config.vocab_size <= 65536 else np.uint32,
                                       count=T).astype(np.int64))[None].to(device)
    positions = torch.arange(T // 2, T, device=device, dtype=torch.float32)[:, None]
    inv_freq = fp32.rotary.inv_freq
    rounded = inv_freq.bfloat16().float()
    with torch.no_grad():
        reference = fp32(ids)[0][0, T // 2 :].float()
        error = lambda logits: float((logits[0, T // 2 :].float() - reference).norm() / reference.norm())  # noqa: E731
        now = error(bf16(ids)[0])
        bf16.rotary.inv_freq = rounded
        before = error(bf16(ids)[0])
    return {
        "positions": f"{T // 2}-{T - 1}",
        "angle_now": float((positions * (load_for_inference(checkpoint, str(device), "bf16").model.rotary.inv_freq - inv_freq)).abs().max()),
        "angle_before": float((positions * (rounded - inv_freq)).abs().max()),
        "logits_now": now,
        "logits_before": before,
    }


def sdpa_kernels(checkpoint: Path, device: torch.device) -> dict[str, str]:
    """The aten SDPA implementation each attention call dispatches to, read from the profiler."""
    from torch.profiler import ProfilerActivity, profile

    def ops(fn) -> str:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        names = {e.key for e in prof.key_averages() if e.key.startswith("aten::_scaled_dot_product") or "attention_forward" in e.key}
        return ", ".join(sorted(n.removeprefix("aten::") for n in names)) or "none found"

    bf16 = load_for_inference(checkpoint, str(device), "bf16").model
    config = bf16.config
    prompt = torch.randint(0, config.vocab_size, (1, 64), device=device)
    cache = KVCache(config, 1, 80, device=device, dtype=torch.bfloat16)
    result = {}
    with torch.no_grad():
        result["prefill, 64 tokens, bf16"] = ops(lambda: bf16(prompt, cache=cache))
        result["decoding one token after the cache, bf16"] = ops(lambda: bf16(prompt[:, :1], cache=cache))
        padded = torch.ones(2, 64, dtype=torch.bool, device=device)
        padded[0, :10] = False
        batch_cache = KVCache(config, 2, 80, device=device, dtype=torch.bfloat16)
        bf16(prompt.expand(2, -1), cache=batch_cache, attention_mask=padded)
        mask = torch.cat([padded, torch.ones(2, 1, dtype=torch.bool, device=device)], 1)
        result["padded batch decoding (mask), bf16"] = ops(lambda: bf16(prompt[:, :1].expand(2, -1), cache=batch_cache, attention_mask=mask))
    fp32 = load_checkpoint(checkpoint, device).model.train()
    result["training forward + backward, fp32"] = ops(lambda: fp32(prompt, prompt)[1].backward())
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--runs", type=Path, required=True, help="the pretraining run's --log_dir")
    p.add_argument("--shards", type=Path, required=True, help="its --data_dir (validation text for the RoPE check)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--resumed_at", type=int, required=True, help="the step the second run resumed from")
    p.add_argument("--command", default="", help="the pretraining command, for the table")
    p.add_argument("--out", type=Path, help="also write the table here")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    gpu = (f"{torch.cuda.get_device_name(device)} ({torch.cuda.device_count()} visible), CUDA {torch.version.cuda}"
           if device.type == "cuda" else "none (CPU dry run: the numbers only prove the script runs)")

    train = training_numbers(args.runs)
    meta_step = load_checkpoint(args.checkpoint).meta.get("step")
    counts, how = syncs_per_step(args.checkpoint, device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    quiet = [counts.get(s, 0) for s in range(11, 30) if s % 10]  # after the first window, steps that do not log
    at_log = [counts.get(s, 0) for s in (20,)]
    rope = rope_drift(args.checkpoint, args.shards, device)
    kernels = sdpa_kernels(args.checkpoint, device)

    fmt = lambda key, f: f.format(train[key]) if key in train else "not logged"  # noqa: E731
    rows = [
        ("GPU", gpu),
        ("torch", torch.__version__),
        ("pretraining", f"`{args.command}`: steps 0-{args.resumed_at}, then `--resume` to step {train['steps']}"
                        f" (checkpoint at step {meta_step})"),
        ("tokens/s (training steps only; mean of the logged windows)", fmt("tokens_per_s", "{:,.0f}")),
        ("MFU (lillm.flops, dense bf16 peak)", fmt("mfu", "{:.1%}")),
        ("peak memory allocated", fmt("peak_memory_gib", "{:.2f} GiB")),
        ("validation loss / bits per byte at the end", f"{fmt('val_loss', '{:.4f}')} / {fmt('val_bpb', '{:.4f}')}"),
        (f"host syncs per training step ({how})",
         f"{max(quiet)} in each of {len(quiet)} steps that do not log; {at_log[0]} at a step that logs (log_interval 10)"),
        (f"rotary angle error in bf16, positions {rope['positions']}",
         f"{rope['angle_now']:.2g} rad now (inv_freq kept fp32); {rope['angle_before']:.2f} rad with inv_freq cast to bf16"),
        (f"bf16 vs fp32 logits, positions {rope['positions']} (relative L2)",
         f"{rope['logits_now']:.4f} now; {rope['logits_before']:.4f} with inv_freq cast to bf16"),
        *((f"SDPA kernel: {case}", value) for case, value in kernels.items()),
    ]
    table = "| check | measured |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in rows)
    print(table, end="")
    if args.out:
        args.out.write_text(table)


if __name__ == "__main__":
    main()
