"""The report card: one Markdown page with what a run measured (nanochat-style).

It is built from the JSON that evaluate.py writes (one per checkpoint) and, for a speedrun, the stage times
speedrun.sh records. Everything in it is read from those files and the checkpoints' meta.json, so the same
page can be made for any checkpoint.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path

import torch


def machine_info() -> dict:
    """CPU model, core count, load average, torch version and thread count, at the time of the call."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "gpu": gpu,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def read_stage_times(path: str | os.PathLike) -> list[tuple[str, int]]:
    """speedrun.sh's NAME<TAB>SECONDS lines."""
    times = []
    for line_no, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        name, sep, seconds = line.rpartition("\t")
        if not sep or not seconds.isdigit():
            raise ValueError(f"{path}:{line_no}: expected NAME<TAB>SECONDS, got {line!r}")
        times.append((name, int(seconds)))
    return times


def _fmt(value, spec: str = ".4f", empty: str = "–") -> str:
    return empty if value is None else format(value, spec)


def _link(target: str | os.PathLike, report_dir: Path | None) -> str:
    return os.path.relpath(target, report_dir) if report_dir is not None else str(target)


def _quote(text: str) -> str:
    """A sample's text inside a Markdown table cell: one line, pipes escaped."""
    return " ".join(text.split()).replace("|", "\\|") or "(empty)"


def _instruction_rows(instruct: dict | None) -> list[str]:
    """The story-instruction score of an SFT summary (lillm.instruct.instruction_report) as table rows."""
    if not instruct:
        return []
    sft, base, other = instruct["sft"], instruct["base"], instruct.get("sft_shuffled_words", {})
    rows = []
    if instruct.get("no_repeat_ngram"):
        rows.append(f"| story instructions: decoding | greedy, no repeated {instruct['no_repeat_ngram']}-grams in a reply |")
    if "all_words" in sft:
        contrast = f", another instruction's words {other['all_words']:.0%}" if other else ""
        rows.append(f"| story instructions: replies using every requested word ({instruct['n_words']} held out) | "
                    f"**{sft['all_words']:.0%}** (base {base['all_words']:.0%}{contrast}) |")
        contrast = f", another instruction's {other['words']:.0%}" if other else ""
        rows.append(f"| story instructions: requested words used | {sft['words']:.0%} (base {base['words']:.0%}{contrast}) |")
        if "uses_per_word" in sft:
            rows.append(f"| story instructions: uses of a requested word per reply | {sft['uses_per_word']:.1f} "
                        f"(base {base['uses_per_word']:.1f}) |")
    if "opening" in sft:
        rows.append(f"| story instructions: replies starting with the requested opening ({instruct['n_begin']} held out) | "
                    f"{sft['opening']:.0%} (base {base['opening']:.0%}) |")
    rows.append(f"| story instructions: replies ending with `<|im_end|>` | **{sft['im_end']:.0%}** (base {base['im_end']:.0%}) |")
    return rows


def render_report(
    evaluations: Sequence[dict],
    stage_times: Sequence[tuple[str, int]] | None = None,
    report_path: str | os.PathLike | None = None,
    title: str = "lillm report card",
) -> str:
    """The Markdown report for one or more evaluate.py results (dicts of its JSON). Plot links are written
    relative to report_path's folder."""
    report_dir = Path(report_path).resolve().parent if report_path is not None else None
    machine = evaluations[0]["machine"] if evaluations else machine_info()
    lines = [f"# {title}", "", f"Written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.", "", "## Machine", ""]
    load = machine.get("load_average")
    lines += [
        "| CPU | cores | GPU | load (1/5/15 min, at evaluation) | torch | threads | platform |",
        "|---|---|---|---|---|---|---|",
        f"| {machine['cpu']} | {machine['cores']} | {machine.get('gpu') or 'none'} | "
        f"{' / '.join(map(str, load)) if load else '–'} | {machine['torch']} | {machine['threads']} | {machine['platform']} |",
        "",
    ]
    if stage_times:
        lines += ["## Stages", "", "| stage | time |", "|---|---|"]
        lines += [f"| {name} | {seconds} s |" for name, seconds in stage_times]
        total = sum(s for _, s in stage_times)
        lines += [f"| **total** | **{total} s ({total / 60:.1f} min)** |", ""]

    lines += [
        "## Models", "",
        "| checkpoint | stage | parameters | context | tokens seen (pretraining) | val bits/byte (training eval) | bits/byte (evaluate.py) |",
        "|---|---|---|---|---|---|---|",
    ]
    for ev in evaluations:
        model, meta = ev["model"], ev.get("meta", {})
        bpb = ev.get("bpb")
        bpb_text = f"{bpb:.4f} on {Path(ev['bpb_data']['file']).name} ({ev['bpb_data']['tokens']:,} tokens)" if bpb is not None else "–"
        tokens_seen = meta.get("tokens_seen")
        lines.append(
            f"| `{ev['checkpoint']}` | {model['stage'] or '–'} | {model['parameters'] / 1e6:.2f}M | {model['max_seq_len']} | "
            f"{_fmt(tokens_seen, ',')} | {_fmt((meta.get('metrics') or {}).get('val_bpb'))} | {bpb_text} |"
        )
    lines.append("")

    tasks = list(dict.fromkeys(task for ev in evaluations for task in ev.get("tasks", {})))  # first-seen order
    if tasks:
        lines += [
            "## Multiple choice", "",
            "Log-likelihood scoring as lm-eval-harness does it (zero-shot): acc picks the choice with the highest summed "
            "log-probability, acc_norm the highest per UTF-8 byte. The first n items of each set; chance = mean of "
            "1 / number of choices.", "",
        ]
        lines += ["| task | checkpoint | n | chance | acc | acc_norm |", "|---|---|---|---|---|---|"]
        for task in tasks:
            for ev in evaluations:
                if task in ev["tasks"]:
                    s = ev["tasks"][task]
                    lines.append(f"| {task} | {Path(ev['checkpoint']).name} | {s['n']} | {s['chance']:.1%} | "
                                 f"{s['acc']:.1%} | {s['acc_norm']:.1%} |")
        lines.append("")

    for ev in evaluations:
        summary = ev.get("meta", {}).get("summary")
        if summary:
            lines += [f"## Supervised fine-tuning: `{ev['checkpoint']}`", "", "| measure | value |", "|---|---|"]
            lines.append(
                f"| held-out assistant loss (nats/token, {summary.get('val_assistant_tokens', 0):,} tokens) | "
                f"{summary['val_loss_before']:.4f} → **{summary['val_loss']:.4f}** |"
            )
            if "im_end_rate" in summary:
                lines.append(
                    f"| greedy replies to {summary['im_end_samples']} held-out prompts that end with `<|im_end|>` | "
                    f"**{summary['im_end_rate']:.0%}** |"
                )
            lines += _instruction_rows(summary.get("instruct"))
            lines.append("")

    for ev in evaluations:
        samples = ev.get("samples") or []
        if samples:
            kind = "replies" if samples[0]["kind"] == "chat" else "story continuations"
            lines += [f"## Sample {kind}: `{ev['checkpoint']}` (greedy)", "", "| prompt | output |", "|---|---|"]
            lines += [f"| {_quote(s['prompt'])} | {_quote(s['output'])} |" for s in samples[:5]]
            lines.append("")

    plots = [(ev["checkpoint"], ev["loss_plot"]) for ev in evaluations if ev.get("loss_plot")]
    if plots:
        lines += ["## Loss curves", ""]
        lines += [f"![{Path(ckpt).name} loss]({_link(plot, report_dir)})" for ckpt, plot in plots]
        lines.append("")
    return "\n".join(lines)

