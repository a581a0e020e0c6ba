"""Multiple-choice scoring: the batched scorer (lillm.evaluate.choice_logprobs) vs one forward pass per choice.

    python bench/bench_evaluate.py --checkpoint checkpoints/base          # first 200 HellaSwag items
    python bench/bench_evaluate.py --checkpoint checkpoints/base --task arc_easy --items 400 --threads 1

Both score the same encoded items (encoding is not timed) and must agree; the batched scorer puts the choices
of several items into one right-padded forward pass and runs log_softmax only on the scored positions. The
last line is the ratio of the median items/s of --repeats alternating runs (target: >= 3x).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lillm import evaluate as ev  # noqa: E402
from lillm.checkpoint import load_checkpoint  # noqa: E402
from lillm.paths import default_data_dir  # noqa: E402


@torch.no_grad()
def per_choice_loop(model, items: list[ev.EncodedItem]) -> list[list[float]]:
    """The baseline: each choice alone, its full logits through log_softmax."""
    out = []
    for item in items:
        scores = []
        for choice in item.choices:
            seq, n = ev.fit_window(item.context, choice, model.config.max_seq_len)
            logits, _ = model(torch.tensor([seq[:-1]]))
            logprobs = torch.log_softmax(logits[0].float(), dim=-1)
            targets = torch.tensor(seq[1:])
            scores.append(float(logprobs[-n:].gather(1, targets[-n:, None]).sum()))
        out.append(scores)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint folder (its tokenizer and model are used)")
    p.add_argument("--task", default="hellaswag", choices=sorted(ev.TASKS))
    p.add_argument("--items", type=int, default=200)
    p.add_argument("--batch_size", type=int, default=32, help="choices per forward pass of the batched scorer")
    p.add_argument("--data_dir", type=Path, default=default_data_dir())
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--repeats", type=int, default=3, help="time each scorer this many times, alternating; report the median")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    ckpt = load_checkpoint(args.checkpoint)
    task = ev.TASKS[args.task]
    items = ev.load_items(task, args.data_dir / task.file, args.items)
    encoded = [ev.encode_item(ckpt.tokenizer, item) for item in items]
    n_choices = sum(len(item.choices) for item in items)
    print(f"LilLM {ckpt.model.num_parameters() / 1e6:.2f}M parameters, context {ckpt.config.max_seq_len}, "
          f"{torch.get_num_threads()} threads; {len(items)} {task.name} items ({n_choices} choices)")

    ev.choice_logprobs(ckpt.model, encoded[:8], args.batch_size)  # warm-up
    speeds: dict[str, list[float]] = {"batched": [], "loop": []}
    for _ in range(args.repeats):  # alternating, so a change in the machine's load hits both alike
        start = time.perf_counter()
        batched = ev.choice_logprobs(ckpt.model, encoded, args.batch_size)
        speeds["batched"].append(len(items) / (time.perf_counter() - start))
        start = time.perf_counter()
        looped = per_choice_loop(ckpt.model, encoded)
        speeds["loop"].append(len(items) / (time.perf_counter() - start))
    batched_speed, loop_speed = (statistics.median(speeds[k]) for k in ("batched", "loop"))
    print(f"batched scorer (batch {args.batch_size}): {batched_speed:8.1f} items/s (median of {args.repeats}: "
          f"{', '.join(f'{v:.1f}' for v in speeds['batched'])})")
    print(f"one forward per choice:      {loop_speed:8.1f} items/s (median of {args.repeats}: "
          f"{', '.join(f'{v:.1f}' for v in speeds['loop'])})")
    diff = max(abs(a - b) for x, y in zip(batched, looped) for a, b in zip(x, y))
    print(f"max |difference| of the summed log-probs: {diff:.2e}; acc {ev.mc_metrics(items, batched)['acc']:.4f}")
    if diff > 1e-3:
        sys.exit(f"bench_evaluate.py: error: the two scorers disagree by {diff}")
    print(f"ratio: {batched_speed / loop_speed:.2f}x (target >= 3x)")


if __name__ == "__main__":
    main()
