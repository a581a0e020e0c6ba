"""Training throughput of LilLM against transformers' LlamaForCausalLM at the same config and weights.

Both models do the same work (forward, loss, backward, AdamW step) on the same random batches, timed
alternately so that a busy machine slows both alike. Prints tokens/s of each and the ratio, last.

    python bench/bench_train_throughput.py                   # tiny preset-sized model on the CPU
    python bench/bench_train_throughput.py --device cuda --dtype bf16 --dim 768 --n_layers 12 --n_heads 12 --n_kv_heads 4
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from lillm.hf import to_hf_llama
from lillm.model import LilLM, ModelConfig


def train_steps(step_fn, params, batches) -> float:
    """Run one optimizer step per batch; return the wall time in seconds."""
    opt = torch.optim.AdamW(params, lr=1e-4)
    start = time.perf_counter()
    for x, y in batches:
        loss = step_fn(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    if x.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab_size", type=int, default=8192)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--n_layers", type=int, default=4)
    p.add_argument("--n_heads", type=int, default=4)
    p.add_argument("--n_kv_heads", type=int, default=2)
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    args = p.parse_args()

    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=args.vocab_size, dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads,
        n_kv_heads=args.n_kv_heads, max_seq_len=args.seq_len,
    )
    ours = LilLM(cfg).to(args.device).train()
    reference = to_hf_llama(ours).train()
    reference.config._attn_implementation = "sdpa"

    batches = [torch.randint(0, cfg.vocab_size, (args.batch_size, args.seq_len + 1), device=args.device) for _ in range(args.steps)]
    batches = [(b[:, :-1], b[:, 1:]) for b in batches]
    with torch.no_grad():
        diff = (ours(batches[0][0])[0] - reference(input_ids=batches[0][0]).logits).abs().max().item()
    print(f"config: {cfg}\nmax |logit difference| at identical weights: {diff:.2e}")

    autocast = torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16, enabled=args.dtype == "bf16")

    def ours_step(x, y):
        with autocast:
            return ours(x, y)[1]

    def reference_step(x, y):
        with autocast:
            logits = reference(input_ids=x).logits
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1))

    train_steps(ours_step, ours.parameters(), batches[:2])  # warm-up
    train_steps(reference_step, reference.parameters(), batches[:2])
    t_ours = t_ref = 0.0
    for _ in range(args.rounds):
        t_ours += train_steps(ours_step, ours.parameters(), batches)
        t_ref += train_steps(reference_step, reference.parameters(), batches)
    tokens = args.rounds * args.steps * args.batch_size * args.seq_len
    ours_tps, ref_tps = tokens / t_ours, tokens / t_ref
    print(f"device {args.device}, dtype {args.dtype}, batch {args.batch_size} x {args.seq_len}, {args.rounds}x{args.steps} steps")
    print(f"LilLM                        : {ours_tps:10.0f} tokens/s")
    print(f"transformers LlamaForCausalLM: {ref_tps:10.0f} tokens/s")
    print(f"ratio LilLM / reference      : {ours_tps / ref_tps:.2f}x")


if __name__ == "__main__":
    main()
