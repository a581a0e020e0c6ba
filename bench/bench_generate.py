"""KV-cache decoding vs re-running the whole sequence at every step.

    python bench/bench_generate.py                 # tiny preset size, 512 new tokens, CPU
    python bench/bench_generate.py --device cuda --new_tokens 900

Both paths decode greedily from the same short prompt with the same random weights (speed does not depend on
what was learned) and must produce identical tokens. With the cache each step costs one token's forward pass
plus attention over the cached keys; without it, step t re-runs all t tokens, so the total cost grows with the
square of the length. The last line is the ratio (target: >= 5x for 512 new tokens).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lillm.generate import SamplingConfig, generate_ids  # noqa: E402
from lillm.model import LilLM, ModelConfig  # noqa: E402
from lillm.devices import resolve_device  # noqa: E402


def tokens_per_second(model: LilLM, prompt: list[int], cfg: SamplingConfig, use_cache: bool) -> tuple[float, list[int]]:
    if model.embed_tokens.weight.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    tokens = list(generate_ids(model, prompt, cfg, use_cache=use_cache))  # int() per token syncs the device
    return len(tokens) / (time.perf_counter() - start), tokens


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--new_tokens", type=int, default=512)
    p.add_argument("--prompt_tokens", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    config = ModelConfig(vocab_size=8192, dim=128, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=1024)
    if args.prompt_tokens + args.new_tokens > config.max_seq_len:
        p.error(f"--prompt_tokens + --new_tokens must be <= max_seq_len {config.max_seq_len}")
    device = resolve_device(args.device)
    model = LilLM(config).to(device).eval()
    prompt = torch.randint(4, config.vocab_size, (args.prompt_tokens,)).tolist()
    cfg = SamplingConfig(temperature=0.0, max_new_tokens=args.new_tokens, stop_ids=())
    print(f"LilLM {model.num_parameters() / 1e6:.2f}M parameters on {device} ({torch.get_num_threads()} threads), "
          f"{args.prompt_tokens}-token prompt, {args.new_tokens} new tokens, greedy")

    list(generate_ids(model, prompt, SamplingConfig(temperature=0.0, max_new_tokens=8, stop_ids=())))  # warm-up
    cached_speed, cached = tokens_per_second(model, prompt, cfg, use_cache=True)
    print(f"with KV cache:    {cached_speed:8.1f} tokens/s")
    uncached_speed, uncached = tokens_per_second(model, prompt, cfg, use_cache=False)
    print(f"without KV cache: {uncached_speed:8.1f} tokens/s")
    if cached != uncached:
        raise SystemExit("bench_generate.py: error: cached and uncached greedy tokens differ")
    print(f"speed-up with cache: {cached_speed / uncached_speed:.1f}x")


if __name__ == "__main__":
    main()
