"""train_custom_tokenizer.py run as a user would: a subprocess, real files, checked outputs and exit codes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lillm.tokenizer import BPETokenizer, load_tokenizer

SCRIPT = Path(__file__).resolve().parents[1] / "train_custom_tokenizer.py"


def run_cli(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


@pytest.fixture(scope="module")
def inputs(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """~200 kB of TinyStories (txt), 100 chat conversations (jsonl with "messages"), a small val file."""
    folder = tmp_path_factory.mktemp("cli_inputs")
    with open(data_dir / "pretrain_tinystories_train.txt", encoding="utf-8") as f:
        (folder / "stories.txt").write_text(f.read(200_000).rsplit("\n\n", 1)[0], encoding="utf-8")
    with open(data_dir / "chat_train.jsonl", encoding="utf-8") as f:
        (folder / "chat.jsonl").write_text("".join(line for _, line in zip(range(100), f)), encoding="utf-8")
    with open(data_dir / "pretrain_tinystories_val.txt", encoding="utf-8") as f:
        (folder / "val.txt").write_text(f.read(50_000), encoding="utf-8")
    return {"txt": folder / "stories.txt", "jsonl": folder / "chat.jsonl", "val": folder / "val.txt"}


@pytest.mark.parametrize("impl", ["hf", "scratch"])
def test_trains_from_txt_and_chat_jsonl(impl: str, inputs: dict[str, Path], tmp_path: Path) -> None:
    output = tmp_path / "tok.json"
    result = run_cli(inputs["txt"], inputs["jsonl"], "--vocab_size", 600, "--impl", impl, "--output", output,
                     "--val_file", inputs["val"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "vocab size: 600" in result.stdout and "training time:" in result.stdout
    bpt = float(re.search(r"bytes/token on .*: ([\d.]+)", result.stdout).group(1))
    assert 2.5 < bpt < 5.0  # a 600-token BPE compresses English about 3x
    tokenizer = load_tokenizer(output)
    assert tokenizer.get_vocab_size() == 600
    chat_text = json.loads(inputs["jsonl"].read_text(encoding="utf-8").splitlines()[0])["messages"][0]["content"]
    assert tokenizer.decode(tokenizer.encode(chat_text).ids) == chat_text
    assert [f.name for f in tmp_path.iterdir()] == ["tok.json"]  # the atomic write left no temp file
    if impl == "scratch":  # the CLI's scratch path is the library's hand-written trainer
        scratch = BPETokenizer()
        texts = inputs["txt"].read_text(encoding="utf-8").split("\n\n")
        texts += ["\n".join(m["content"] for m in json.loads(line)["messages"])
                  for line in inputs["jsonl"].read_text(encoding="utf-8").splitlines()]
        scratch.train(texts, vocab_size=600)
        assert tokenizer.encode(chat_text).ids == scratch.encode(chat_text)


def test_trains_from_local_dataset_folder(tmp_path: Path) -> None:
    """--dataset streams through `datasets` (a local folder here, since tests run offline)."""
    data = tmp_path / "my_dataset"
    data.mkdir()
    records = [{"story": f"Story {i}: the little robot counted to {i} and smiled."} for i in range(200)]
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    result = run_cli("--dataset", data, "--text_field", "story", "--max_docs", 150, "--vocab_size", 300,
                     "--val_file", data / "train.jsonl", "--output", tmp_path / "tok.json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "on 150 documents" in result.stdout
    assert load_tokenizer(tmp_path / "tok.json").get_vocab_size() == 300


@pytest.mark.parametrize(
    ("make_args", "message"),
    [
        (lambda d: [d / "missing.txt"], r"input file not found: .*missing\.txt"),
        (lambda d: [d / "bad.jsonl"], r"bad\.jsonl:2: invalid JSON"),
        (lambda d: [d / "nofield.jsonl"], r"nofield\.jsonl:1: no string field 'text'"),
        (lambda d: [d / "ok.txt", "--vocab_size", "260"], r"--vocab_size must be at least 261 .*got 260"),
        (lambda d: [d / "empty.txt"], r"no documents found in .*empty\.txt"),
    ],
    ids=["missing_file", "bad_json_line", "missing_field", "vocab_too_small", "no_documents"],
)
def test_bad_input_is_one_line_and_exit_code_2(make_args, message: str, tmp_path: Path) -> None:
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": oops}\n', encoding="utf-8")
    (tmp_path / "nofield.jsonl").write_text('{"body": "no text field"}\n', encoding="utf-8")
    (tmp_path / "ok.txt").write_text("hello there\n\ngeneral kenobi\n", encoding="utf-8")
    (tmp_path / "empty.txt").write_text("\n\n", encoding="utf-8")
    result = run_cli(*make_args(tmp_path), "--output", tmp_path / "out.json", cwd=tmp_path)
    assert result.returncode == 2
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("train_custom_tokenizer.py: error: ") and re.search(message, last_line), result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out.json").exists()
