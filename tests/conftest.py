"""Shared fixtures. The real data lives in ../shared/data (read-only, never copied into the repo)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("LILLM_DATA_DIR", REPO_ROOT.parent / "shared" / "data"))

for _name, _value in {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "GRADIO_ANALYTICS_ENABLED": "False",
    "MPLBACKEND": "Agg",
}.items():
    os.environ.setdefault(_name, _value)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """../shared/data; the tests need the real corpora and fail loudly without them."""
    if not (DATA_DIR / "pretrain_tinystories_train.txt").is_file():
        pytest.fail(f"shared data not found in {DATA_DIR} (set LILLM_DATA_DIR)")
    return DATA_DIR


@pytest.fixture(scope="session")
def tokenizer_path(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A vocab-1024 tokenizer.json trained with `tokenizers` on ~1 MB of TinyStories + 300 chat conversations."""
    import json

    from lillm.tokenizer import save_tokenizer, train_hf_tokenizer

    with open(data_dir / "pretrain_tinystories_train.txt", encoding="utf-8") as f:
        texts = f.read(1_000_000).split("\n\n")
    with open(data_dir / "chat_train.jsonl", encoding="utf-8") as f:
        for _, line in zip(range(300), f):
            texts.extend(message["content"] for message in json.loads(line)["messages"])
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
    save_tokenizer(train_hf_tokenizer(texts, vocab_size=1024), path)
    return path
