"""Write a report card (Markdown) from evaluate.py results, e.g. the base and SFT checkpoints of a speedrun.

    python report.py speedrun/eval_base.json speedrun/eval_sft.json --stage_times speedrun/stage_times.tsv \\
        --out speedrun/report.md

Each JSON is what `evaluate.py --out` wrote; the page shows the machine, the stage times, model sizes,
bits/byte, the multiple-choice scores next to random chance, the SFT numbers, sample outputs and loss plots.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lillm.fileio import atomic_write_text, check_output_file
from lillm.report import read_stage_times, render_report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", type=Path, help="evaluate.py --out JSON files")
    p.add_argument("--stage_times", type=Path, help="speedrun.sh's stage_times.tsv (NAME<TAB>SECONDS lines)")
    p.add_argument("--out", type=Path, required=True, help="the Markdown file to write")
    p.add_argument("--title", default="lillm report card")
    return p.parse_args(argv)


def load_result(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"result file not found: {path}")
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e})") from None
    missing = [key for key in ("checkpoint", "model", "tasks", "machine") if key not in result]
    if missing:
        raise ValueError(f"{path}: not an evaluate.py result (no {', '.join(missing)})")
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        check_output_file(args.out, "--out")
        results = [load_result(path) for path in args.results]
        times = read_stage_times(args.stage_times) if args.stage_times else None
        atomic_write_text(args.out, render_report(results, times, args.out, args.title))
    except (ValueError, FileNotFoundError) as e:
        print(f"report.py: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
