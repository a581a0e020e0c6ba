"""Token shards: data/prepare_pretrain.py output, memmap checks, and the deterministic batch sampler."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from lillm.data import DataError, ShardWriter, open_shards, sample_batch, shard_dtype
from lillm.tokenizer import load_tokenizer

EOS_ID = 0  # lillm's own layout (the tokenizers here are trained by lillm)

REPO = Path(__file__).resolve().parents[1]


def load_prepare():
    spec = importlib.util.spec_from_file_location("prepare_pretrain", REPO / "data" / "prepare_pretrain.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def prepare_fails(capsys, *argv) -> str:
    """Run prepare_pretrain.py in-process; it must exit with code 2 and a one-line message. Returns stderr."""
    with pytest.raises(SystemExit) as exit_info:
        load_prepare().main([str(a) for a in argv])
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_batches_are_a_function_of_seed_and_step():
    shard = np.arange(10_000, dtype=np.uint16)
    x1, y1 = sample_batch(shard, 4, 16, seed=1, step=7, chunk=1)
    x2, _ = sample_batch(shard, 4, 16, seed=1, step=7, chunk=1)
    x3, _ = sample_batch(shard, 4, 16, seed=1, step=8, chunk=1)
    assert torch.equal(x1, x2) and not torch.equal(x1, x3)
    assert torch.equal(y1[:, :-1], x1[:, 1:]) and x1.dtype == torch.int64
    assert torch.equal(x1[:, 0] + 1, x1[:, 1])  # windows are contiguous runs of the shard


def test_micro_batches_are_slices_of_one_global_batch():
    """2 ranks x 2 accumulation steps x 3 sequences == 1 process x 4 steps x 3 == one batch of 12, for any step."""
    shard = np.random.default_rng(0).integers(0, 60_000, size=50_000).astype(np.uint16)
    for step in (0, 1, 999):
        whole, _ = sample_batch(shard, 12, 32, seed=5, step=step)
        chunks = [sample_batch(shard, 3, 32, seed=5, step=step, chunk=c)[0] for c in range(4)]
        halves = [sample_batch(shard, 6, 32, seed=5, step=step, chunk=c)[0] for c in range(2)]
        assert torch.equal(torch.cat(chunks), whole) and torch.equal(torch.cat(halves), whole)


def test_shard_dtype_and_uint32_round_trip(tmp_path):
    assert shard_dtype(65536) == np.uint16 and shard_dtype(65537) == np.uint32
    writer = ShardWriter(tmp_path / "train.bin", shard_dtype(100_000))
    writer.write([0, 70_000, 99_999], text_bytes=9)
    assert not (tmp_path / "train.bin").exists()  # only the .tmp file until commit
    writer.commit()
    assert np.fromfile(tmp_path / "train.bin", dtype=np.uint32).tolist() == [0, 70_000, 99_999]
    assert (writer.tokens, writer.text_bytes) == (3, 9) and not (tmp_path / "train.bin.tmp").exists()


def test_shards_hold_every_document_then_eos(shards_dir, tokenizer_path, data_dir):
    meta = json.loads((shards_dir / "meta.json").read_text())
    val = np.fromfile(shards_dir / "val.bin", dtype=meta["dtype"])
    assert meta["dtype"] == "uint16" and len(val) == meta["val_tokens"]
    docs = load_tokenizer(tokenizer_path).decode(val.tolist(), skip_special_tokens=False).split("<|endoftext|>")
    source = (data_dir / "pretrain_tinystories_val.txt").read_text(encoding="utf-8")[:100_000]
    expected = source[: source.rfind("\n\n")].split("\n\n")
    assert docs[:-1] == expected and docs[-1] == "" and val[-1] == EOS_ID
    assert meta["val_bytes"] == sum(len(d.encode("utf-8")) for d in expected)  # for bits-per-byte


def test_jsonl_with_val_fraction_splits_every_document_once(tokenizer_path, tmp_path):
    docs = [f"Story number {i}: a cat named Tom{'!' * (i % 5)}" for i in range(200)]
    source = tmp_path / "docs.jsonl"
    source.write_text("".join(json.dumps({"body": d}) + "\n" for d in docs) + "\n")
    out = tmp_path / "out"
    load_prepare().main([str(source), "--text_field", "body", "--val_fraction", "0.2", "--tokenizer", str(tokenizer_path),
                         "--out_dir", str(out), "--batch_docs", "7"])
    tokenizer = load_tokenizer(out / "tokenizer.json")
    split = {}
    for name in ("train", "val"):
        ids = np.fromfile(out / f"{name}.bin", dtype=np.uint16).tolist()
        split[name] = tokenizer.decode(ids, skip_special_tokens=False).split("<|endoftext|>")[:-1]
    assert sorted(split["train"] + split["val"]) == sorted(docs)
    assert 20 <= len(split["val"]) <= 60  # ~20 % of 200
    shards = open_shards(out, seq_len=16)
    assert shards.val_bytes_per_token == pytest.approx(sum(len(d) for d in split["val"]) / len(shards.val))


def test_chat_jsonl_becomes_one_document_per_conversation(tokenizer_path, tmp_path):
    """speedrun.sh mixes the story instructions into pretraining: each conversation's turns, joined by newlines."""
    conversations = [
        [{"role": "user", "content": f"Write a story that uses the words: dog, ball{i}."},
         {"role": "assistant", "content": f"Once upon a time a dog found ball{i}.\nIt was happy."}]
        for i in range(12)
    ]
    train, val = tmp_path / "train.jsonl", tmp_path / "val.txt"
    train.write_text("".join(json.dumps({"messages": m}) + "\n" for m in conversations))
    val.write_text("A cat sat.\n\nA dog ran.\n")
    out = tmp_path / "out"
    load_prepare().main([str(train), "--val_file", str(val), "--tokenizer", str(tokenizer_path), "--out_dir", str(out)])
    tokenizer = load_tokenizer(out / "tokenizer.json")
    expected = []
    for messages in conversations:
        expected += tokenizer.encode("\n".join(m["content"] for m in messages)).ids + [EOS_ID]
    assert np.fromfile(out / "train.bin", dtype=np.uint16).tolist() == expected


@pytest.mark.parametrize(
    "break_it, message",
    [
        (lambda d: (d / "train.bin").write_bytes((d / "train.bin").read_bytes()[:-1]), "not a multiple of the uint16"),
        (lambda d: (d / "train.bin").write_bytes((d / "train.bin").read_bytes()[:-2]), "meta.json says"),
        (lambda d: (d / "val.bin").unlink(), "shard not found"),
        (lambda d: (d / "meta.json").unlink(), "meta.json not found"),
        (lambda d: (d / "meta.json").write_text("{"), "invalid shard metadata"),
        (lambda d: (d / "val.bin").write_bytes(b"\0\0" * 100), "at least 257 are needed"),
    ],
    ids=["odd-bytes", "truncated", "missing-val", "missing-meta", "bad-meta", "too-short"],
)
def test_open_shards_rejects_broken_folders(shards_dir, tmp_path, break_it, message):
    data = tmp_path / "shards"
    shutil.copytree(shards_dir, data)
    break_it(data)
    with pytest.raises(DataError, match=message):
        open_shards(data, seq_len=256)


def test_empty_corpus_fails_and_keeps_old_shards(shards_dir, tokenizer_path, tmp_path, capsys):
    data = tmp_path / "shards"
    shutil.copytree(shards_dir, data)
    before = {f.name: f.read_bytes() for f in data.iterdir()}
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n   \n\n")
    err = prepare_fails(capsys, shards_dir.parent / "val.txt", "--val_file", empty, "--tokenizer", tokenizer_path, "--out_dir", data)
    assert "the val corpus is empty" in err
    assert {f.name: f.read_bytes() for f in data.iterdir()} == before  # no new train.bin without its val.bin


@pytest.mark.parametrize(
    "content, args, message",
    [
        ('{"text": "fine"}\n{"text": 3}\n', ["--val_fraction", "0.5"], "bad.jsonl:2: 'text' is int"),
        ('{"text": "fine"}\nnot json\n', ["--val_fraction", "0.5"], "bad.jsonl:2: invalid JSON"),
        ('{"text": "fine"}\n', [], "no validation data"),
        ('{"text": "fine"}\n', ["--val_fraction", "1.5"], "--val_fraction must be in [0, 1)"),
    ],
    ids=["not-a-string", "not-json", "no-val", "bad-fraction"],
)
def test_prepare_rejects_bad_input(tokenizer_path, tmp_path, capsys, content, args, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    err = prepare_fails(capsys, bad, *args, "--tokenizer", tokenizer_path, "--out_dir", tmp_path / "o")
    last_line = err.rstrip("\n").split("\n")[-1]  # earlier output is the progress bar
    assert last_line.startswith("prepare_pretrain.py: error: ") and message in last_line and "Traceback" not in err
    assert not list((tmp_path / "o").glob("*.bin*"))  # no shard and no temporary file left behind


def test_streams_a_dataset_with_max_docs(tokenizer_path, tmp_path):
    """--dataset goes through `datasets` streaming (a local folder here: the tests run offline)."""
    folder = tmp_path / "my_dataset"
    folder.mkdir()
    docs = [f"Once upon a time there was a dog number {i}." for i in range(100)]
    (folder / "train.jsonl").write_text("".join(json.dumps({"story": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    out = tmp_path / "out"
    load_prepare().main(["--dataset", str(folder), "--text_field", "story", "--max_docs", "40", "--val_fraction", "0.25",
                         "--tokenizer", str(tokenizer_path), "--out_dir", str(out)])
    meta = json.loads((out / "meta.json").read_text())
    assert meta["source"] == [str(folder)]
    assert meta["train_bytes"] + meta["val_bytes"] == sum(len(d) for d in docs[:40])
    ids = np.concatenate([np.fromfile(out / f"{name}.bin", dtype=np.uint16) for name in ("train", "val")])
    assert (ids == EOS_ID).sum() == 40
