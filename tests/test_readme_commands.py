"""The README's command lines stay in step with the scripts: every flag it shows exists in that script's argparse."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ["train_custom_tokenizer.py", "data/prepare_pretrain.py", "pretrain.py", "sft_train.py", "inference.py", "inference_gradio.py",
           "evaluate.py", "report.py"]


def readme_commands() -> list[tuple[str, list[str]]]:
    """(script, flags) for each command in the README's fenced shell blocks that runs one of our scripts."""
    text = (REPO / "README.md").read_text()
    commands = []
    for block in re.findall(r"```(?:bash|sh|shell)\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if not line or line.startswith("#"):
                continue
            words = shlex.split(line)
            script = next((w for w in words if w.endswith(".py") and w in SCRIPTS), None)
            if script:
                flags = [w.split("=", 1)[0] for w in words[words.index(script) + 1 :] if w.startswith("--")]
                commands.append((script, flags))
    return commands


@cache
def help_text(script: str) -> str:
    result = subprocess.run([sys.executable, script, "--help"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{script} --help failed: {result.stderr[-500:]}"
    return result.stdout


def test_readme_runs_every_script():
    shown = {script for script, _ in readme_commands()}
    assert shown == set(SCRIPTS), f"README shows no command for {sorted(set(SCRIPTS) - shown)}"


@pytest.mark.parametrize("script", SCRIPTS)
def test_readme_flags_exist(script):
    options = set(re.findall(r"(--[A-Za-z0-9_-]+)", help_text(script)))
    for shown_script, flags in readme_commands():
        if shown_script == script:
            unknown = [f for f in flags if f not in options]
            assert not unknown, f"README uses {unknown} with {script}, which its argparse does not define"
