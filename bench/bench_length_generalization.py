"""NoPE vs RoPE: how validation loss changes when a model reads 1x, 2x and 4x the context it was trained on.

Trains two otherwise identical LilLMs with pretrain.py (one with rotary embeddings, one with no positional
encoding at all) on the same shards at a short context T, then measures the mean validation loss over windows of
T, 2T and 4T tokens, and the loss on positions beyond T alone. Prints a table and, last, the ratios.

    python bench/bench_length_generalization.py --data_dir speedrun/shards            # after speedrun.sh
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pretrain  # noqa: E402
from lillm.checkpoint import load_checkpoint  # noqa: E402
from lillm.data import open_shards, sample_batch  # noqa: E402


@torch.no_grad()
def loss_by_position(model, shard, seq_len: int, batches: int, batch_size: int) -> torch.Tensor:
    """Mean next-token loss at each position 0..seq_len-1 over fixed validation windows."""
    total = torch.zeros(seq_len)
    for i in range(batches):
        x, y = sample_batch(shard, batch_size, seq_len, seed=0, step=i)
        logits, _ = model(x)
        total += F.cross_entropy(logits.transpose(1, 2), y, reduction="none").mean(0)
    return total / batches


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", type=Path, default=Path("speedrun/shards"))
    p.add_argument("--context", type=int, default=64, help="training context T")
    p.add_argument("--max_steps", type=int, default=400)
    p.add_argument("--eval_batches", type=int, default=32, help="validation batches of 16 windows")
    p.add_argument("--out_dir", type=Path, help="where to keep the two checkpoints (default: a temp folder)")
    p.add_argument("--plot", type=Path, help="also save the loss at each position of both models as a PNG")
    args = p.parse_args()

    out = args.out_dir or Path(tempfile.mkdtemp(prefix="nope_rope_"))
    shards = open_shards(args.data_dir, 4 * args.context)
    rows, curves = {}, {}
    for pos in ("rope", "nope"):
        ckpt = out / pos
        pretrain.main([
            "--preset", "tiny", "--data_dir", str(args.data_dir), "--out_dir", str(ckpt), "--log_dir", str(out / f"runs_{pos}"),
            "--pos_encoding", pos, "--max_seq_len", str(args.context), "--batch_size", "32", "--max_steps", str(args.max_steps),
            "--eval_interval", str(args.max_steps), "--ckpt_interval", str(args.max_steps), "--device", "cpu",
        ])
        model = load_checkpoint(ckpt).model
        by_pos = curves[pos] = loss_by_position(model, shards.val, 4 * args.context, args.eval_batches, 16)
        rows[pos] = {f"{k}x": by_pos[: k * args.context].mean().item() for k in (1, 2, 4)}
        rows[pos]["beyond"] = by_pos[args.context :].mean().item()

    print(f"\nvalidation loss (nats/token), trained at T={args.context}, {args.max_steps} steps, tiny preset")
    print(f"{'':6} {'1x T':>8} {'2x T':>8} {'4x T':>8} {'positions > T':>14}")
    for pos, r in rows.items():
        print(f"{pos:6} {r['1x']:8.3f} {r['2x']:8.3f} {r['4x']:8.3f} {r['beyond']:14.3f}")
    if args.plot:
        plot_curves(curves, args.context, args.plot)
        print(f"wrote {args.plot}")
    for k in ("2x", "4x"):
        print(f"loss at {k} / loss at 1x: rope {rows['rope'][k] / rows['rope']['1x']:.2f}, nope {rows['nope'][k] / rows['nope']['1x']:.2f}")


def plot_curves(curves: dict[str, torch.Tensor], context: int, path: Path) -> None:
    """Loss at each position, smoothed over 16 positions so the trend shows through the noise."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    for pos, by_pos in curves.items():
        smooth = F.avg_pool1d(by_pos.view(1, 1, -1), 16, stride=1).flatten()
        ax.plot(torch.arange(len(smooth)) + 8, smooth, label=pos)
    ax.axvline(context, color="grey", ls="--", lw=1)
    ax.text(context, ax.get_ylim()[1], " trained context", va="top", fontsize=8, color="grey")
    ax.set(xlabel="position in the window", ylabel="validation loss (nats/token)",
           title=f"NoPE vs RoPE read beyond the {context}-token training context")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
