"""Decoding speed of a real model: lillm.generate vs transformers' `generate` on the same weights.

    python bench/bench_decode.py                                  # SmolLM2-135M-Instruct, fp32 and bf16, 1 and 2 threads
    python bench/bench_decode.py --checkpoint checkpoints/sft --dtypes fp32 --threads 1

Both decode greedily from the same chat prompt with the same weights (transformers' LlamaForCausalLM gets them
through lillm.hf.to_hf_llama), without stop tokens, for exactly --new_tokens tokens, KV cache on, batch 1; in fp32
the two must produce the same tokens (in bf16 rounding may differ and the tokens with it). Decoding a token reads every weight once, so memory bandwidth bounds the
speed: bytes of weights / bandwidth (measured here with a large copy) is printed as the ceiling next to each row.
The last line is lillm's speed over transformers' (geometric mean over the rows; target >= 1.0x).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lillm.generate import SamplingConfig, chat_prompt_ids, checkpoint_system_prompt, generate_ids, load_for_inference  # noqa: E402
from lillm.hf import ensure_default_chat_checkpoint, to_hf_llama  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def copy_bandwidth(n_bytes: int = 512 * 2**20, repeats: int = 5) -> float:
    """Bytes/s moved by the best of `repeats` large copies (each byte is read once and written once)."""
    src = torch.ones(n_bytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * n_bytes / best


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of weights one decoding step reads: every parameter once (a tied embedding/head matrix is read
    whole by the head; the embedding lookup reads a single row)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def lillm_speed(model, prompt: list[int], n: int) -> tuple[float, list[int]]:
    cfg = SamplingConfig(temperature=0.0, max_new_tokens=n, stop_ids=())
    start = time.perf_counter()
    tokens = list(generate_ids(model, prompt, cfg))
    return len(tokens) / (time.perf_counter() - start), tokens


@torch.no_grad()
def transformers_speed(model, prompt: list[int], n: int) -> tuple[float, list[int]]:
    ids = torch.tensor([prompt])
    start = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                         eos_token_id=None, pad_token_id=0, use_cache=True)
    elapsed = time.perf_counter() - start
    tokens = out[0, len(prompt):].tolist()
    return len(tokens) / elapsed, tokens


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="default: checkpoints/smollm2-135m-instruct (converted on first use)")
    p.add_argument("--new_tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2, help="best of this many runs per row")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--threads", default="1,2")
    args = p.parse_args(argv)
    checkpoint = args.checkpoint or ensure_default_chat_checkpoint(announce=lambda line: print(line, file=sys.stderr))

    ckpt = load_for_inference(checkpoint, device="cpu", dtype="fp32")
    messages = [{"role": "user", "content": "Explain how a bicycle works, step by step."}]
    cfg = SamplingConfig(temperature=0.0, max_new_tokens=args.new_tokens)
    prompt = chat_prompt_ids(ckpt.model, ckpt.tokenizer, messages, cfg, checkpoint_system_prompt(ckpt.meta))
    reference = to_hf_llama(ckpt.model).eval()
    print(f"{checkpoint}: {ckpt.model.num_parameters() / 1e6:.1f}M parameters, {len(prompt)}-token chat prompt, "
          f"{args.new_tokens} new tokens, greedy, batch 1, CPU; load average {os.getloadavg()[0]:.2f}")
    print(f"{'dtype':>5} {'threads':>7} {'lillm tok/s':>12} {'transformers':>13} {'ratio':>6} {'bandwidth bound':>16} "
          f"{'lillm/bound':>11}  same tokens")
    ratios = []
    for dtype_name in args.dtypes.split(","):
        ckpt.model.to(DTYPES[dtype_name])
        reference.to(DTYPES[dtype_name])
        for threads in (int(t) for t in args.threads.split(",")):
            torch.set_num_threads(threads)
            bound = copy_bandwidth() / weight_bytes(ckpt.model)
            lillm_speed(ckpt.model, prompt, 4), transformers_speed(reference, prompt, 4)  # warm-up
            ours = max(lillm_speed(ckpt.model, prompt, args.new_tokens) for _ in range(args.repeats))
            theirs = max(transformers_speed(reference, prompt, args.new_tokens) for _ in range(args.repeats))
            ratios.append(ours[0] / theirs[0])
            print(f"{dtype_name:>5} {threads:>7} {ours[0]:>12.1f} {theirs[0]:>13.1f} {ratios[-1]:>5.2f}x "
                  f"{bound:>12.1f} tok/s {ours[0] / bound:>10.0%}  {ours[1] == theirs[1]}", flush=True)
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    geomean = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
    print(f"lillm / transformers decoding speed: {geomean:.2f}x (geometric mean of {len(ratios)} rows; target >= 1.0x)")


if __name__ == "__main__":
    main()
