"""Training throughput of candidate CPU pretraining configurations, measured back to back.

A busy machine slows every configuration alike when they are timed in alternating short bursts, so the ratios
(tokens/s and bytes/s against the first configuration) hold even when the absolute numbers do not. Each burst is
a few full optimizer steps (forward, loss, backward, clip, AdamW) on real shard batches; torch.compile warm-up is
excluded and reported apart.

    python bench/bench_cpu_recipe.py --shards 8192=speedrun/shards --configs "dim=128,n_layers=4,vocab=8192"
    python bench/bench_cpu_recipe.py --shards 8192=a/ 2048=b/ --configs "vocab=8192" "vocab=2048,dtype=bf16"

A configuration is comma-separated key=value: dim, n_layers, n_heads, n_kv_heads, vocab, seq, batch, dtype
(fp32|bf16), compile (0|1), threads.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from lillm.data import open_shards, sample_batch
from lillm.flops import count_parameters
from lillm.model import LilLM, ModelConfig
from lillm.train import autocast, make_optimizer

DEFAULTS = dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, vocab=8192, seq=256, batch=8, dtype="fp32", compile=0, threads=2)


def parse_config(text: str) -> dict:
    config = dict(DEFAULTS)
    for item in filter(None, text.split(",")):
        key, value = item.split("=")
        if key not in DEFAULTS:
            raise SystemExit(f"bench_cpu_recipe.py: error: unknown key {key!r} in {text!r}; use {', '.join(DEFAULTS)}")
        config[key] = type(DEFAULTS[key])(value)
    return config


class Runner:
    """One configuration: its model, optimizer and shard, ready to time a burst of steps."""

    def __init__(self, config: dict, shard_dirs: dict[int, Path]):
        self.config = config
        shards = open_shards(shard_dirs[config["vocab"]], config["seq"])
        self.train, self.bytes_per_token = shards.train, shards.val_bytes_per_token
        torch.manual_seed(0)
        self.model_config = ModelConfig(
            vocab_size=config["vocab"], dim=config["dim"], n_layers=config["n_layers"], n_heads=config["n_heads"],
            n_kv_heads=config["n_kv_heads"], max_seq_len=config["seq"],
        )
        self.model = LilLM(self.model_config)
        self.optimizer = make_optimizer(self.model, 1e-3, 0.1)
        self.forward = torch.compile(self.model) if config["compile"] else self.model
        self.dtype = torch.bfloat16 if config["dtype"] == "bf16" else torch.float32
        self.step = 0
        torch.set_num_threads(config["threads"])
        started = time.perf_counter()
        self.burst(2)  # warm-up (and compilation)
        self.warmup_s = time.perf_counter() - started

    def burst(self, steps: int) -> float:
        """Wall seconds for `steps` optimizer steps."""
        torch.set_num_threads(self.config["threads"])
        started = time.perf_counter()
        for _ in range(steps):
            x, y = sample_batch(self.train, self.config["batch"], self.config["seq"], seed=0, step=self.step)
            self.step += 1
            with autocast(torch.device("cpu"), self.dtype):
                _, loss = self.forward(x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - started


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", nargs="+", required=True, help="VOCAB=DIR pairs: shards made with a VOCAB-token tokenizer")
    p.add_argument("--configs", nargs="+", required=True, help="configurations; the first is the reference")
    p.add_argument("--tokens", type=int, default=16384, help="tokens per burst (rounded to whole steps)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()
    shard_dirs = {int(v): Path(d) for v, d in (pair.split("=") for pair in args.shards)}
    runners = [Runner(parse_config(c), shard_dirs) for c in args.configs]
    seconds = [0.0] * len(runners)
    tokens = [0] * len(runners)
    for _ in range(args.rounds):
        for i, r in enumerate(runners):
            steps = max(1, args.tokens // (r.config["batch"] * r.config["seq"]))
            seconds[i] += r.burst(steps)
            tokens[i] += steps * r.config["batch"] * r.config["seq"]
    rows = []
    for r, s, n in zip(runners, seconds, tokens):
        rows.append({
            "config": args.configs[runners.index(r)], "params": count_parameters(r.model_config),
            "tokens_per_s": n / s, "bytes_per_s": n / s * r.bytes_per_token, "warmup_s": r.warmup_s,
        })
    ref = rows[0]
    for row in rows:
        row["tokens_ratio"] = row["tokens_per_s"] / ref["tokens_per_s"]
        row["bytes_ratio"] = row["bytes_per_s"] / ref["bytes_per_s"]
        print(f"{row['config']:<60} {row['params'] / 1e6:5.2f}M  {row['tokens_per_s']:8.0f} tok/s  "
              f"{row['bytes_per_s']:8.0f} B/s  warm-up {row['warmup_s']:5.1f} s  x{row['bytes_ratio']:.2f} bytes/s")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
