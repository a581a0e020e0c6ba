"""Pretraining data: token shards on disk and deterministic batch sampling.

A shard is a flat binary file of token ids (uint16 when the vocabulary fits, else uint32), with documents
separated by EOS, read through a numpy memmap so a corpus larger than RAM costs nothing to open. A folder of
shards holds train.bin, val.bin, meta.json (dtype, counts, tokenizer hash) and the tokenizer.json they were
made with.

build_shards writes such a folder from any stream of documents (data/prepare_pretrain.py, the tests and the
chapters all call it).

Batches are a pure function of (seed, step, chunk): resuming at step s replays exactly what an uninterrupted run
would have seen. Each optimizer step draws one global batch of windows, and a micro-batch is a contiguous slice
of it (chunk = rank * grad_accum + micro_step), so N processes x A accumulation steps x B sequences see exactly
the sequences of one process with N*A accumulation steps of B, or of one big batch of N*A*B.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lillm.fileio import atomic_write_text
from lillm.tokenizer import load_tokenizer, special_tokens

META_FILE = "meta.json"
TOKENIZER_FILE = "tokenizer.json"


class DataError(ValueError):
    """Shards are missing, corrupt, or inconsistent with the tokenizer or model."""


def shard_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned integer type that holds every token id."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class ShardWriter:
    """Appends token arrays to DIR/NAME.bin.tmp; `commit` renames it into place, so a crash never leaves a
    half-written shard under the real name. Counts tokens and the UTF-8 bytes of text they encode (for
    bits-per-byte)."""

    def __init__(self, path: Path, dtype: np.dtype):
        self.path, self.dtype = path, dtype
        self.tmp = path.with_name(path.name + ".tmp")
        self.file = open(self.tmp, "wb")
        self.tokens = self.text_bytes = 0

    def write(self, ids: list[int], text_bytes: int = 0) -> None:
        np.asarray(ids, dtype=self.dtype).tofile(self.file)
        self.tokens += len(ids)
        self.text_bytes += text_bytes

    def commit(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.path)

    def discard(self) -> None:
        """Drop the temporary file (after an error); a no-op once committed."""
        self.file.close()
        self.tmp.unlink(missing_ok=True)


@dataclass
class ShardSet:
    train: np.ndarray  # memmap of token ids
    val: np.ndarray
    meta: dict
    tokenizer_path: Path

    @property
    def val_bytes_per_token(self) -> float:
        """UTF-8 bytes of text per validation token, to turn nats/token into bits/byte."""
        return self.meta["val_bytes"] / self.meta["val_tokens"]


def _open_shard(path: Path, dtype: np.dtype, min_tokens: int) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"shard not found: {path} (run data/prepare_pretrain.py first)")
    size = path.stat().st_size
    if size % dtype.itemsize:
        raise DataError(f"corrupt shard {path}: {size} bytes is not a multiple of the {dtype.name} item size")
    if size // dtype.itemsize < min_tokens:
        raise DataError(f"shard {path} has {size // dtype.itemsize} tokens; at least {min_tokens} are needed (seq_len + 1)")
    return np.memmap(path, dtype=dtype, mode="r")


def open_shards(data_dir: str | os.PathLike, seq_len: int) -> ShardSet:
    """Open DIR/train.bin and DIR/val.bin as memmaps after checking them against DIR/meta.json."""
    data_dir = Path(data_dir)
    meta_path = data_dir / META_FILE
    if not meta_path.is_file():
        raise DataError(f"{meta_path} not found (run data/prepare_pretrain.py to make shards)")
    try:
        meta = json.loads(meta_path.read_text())
        dtype = np.dtype(meta["dtype"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise DataError(f"{meta_path}: invalid shard metadata ({e})") from None
    if meta.get("vocab_size", 0) > np.iinfo(dtype).max + 1:
        raise DataError(f"{meta_path}: vocab_size {meta['vocab_size']} does not fit the shard dtype {dtype.name}")
    train = _open_shard(data_dir / "train.bin", dtype, seq_len + 1)
    val = _open_shard(data_dir / "val.bin", dtype, seq_len + 1)
    for name, shard in (("train", train), ("val", val)):
        if len(shard) != meta[f"{name}_tokens"]:
            raise DataError(f"corrupt shard {data_dir / (name + '.bin')}: {len(shard)} tokens, meta.json says {meta[name + '_tokens']}")
    return ShardSet(train, val, meta, data_dir / TOKENIZER_FILE)


def sample_batch(
    shard: np.ndarray, batch_size: int, seq_len: int, seed: int, step: int, chunk: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Micro-batch `chunk` of step `step`'s global batch: random windows of seq_len + 1 tokens -> (inputs,
    targets), each (batch_size, seq_len), int64.

    The global batch's window starts come from a generator seeded with (seed, step) only, never from earlier
    calls; chunk c takes starts c*batch_size .. (c+1)*batch_size - 1. numpy draws bounded integers one after
    another, so the first k starts are the same whatever the total drawn (tests/test_data.py checks it)."""
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, len(shard) - seq_len, size=(chunk + 1) * batch_size)[chunk * batch_size :]
    windows = np.stack([shard[s : s + seq_len + 1] for s in starts]).astype(np.int64)
    batch = torch.from_numpy(windows)
    return batch[:, :-1], batch[:, 1:]


def random_windows(tokens: torch.Tensor, n: int, seq_len: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n random windows of seq_len + 1 tokens of an in-memory 1-D tensor -> (inputs, targets), each (n, seq_len).
    For small experiments on a tensor (the chapters' byte-level models); shards on disk use sample_batch."""
    starts = torch.randint(0, len(tokens) - seq_len, (n,), generator=generator)
    rows = torch.stack([tokens[s : s + seq_len + 1] for s in starts.tolist()])
    return rows[:, :-1], rows[:, 1:]


# ---------------------------------------------------------------------------------------------- building shards


def tokenize_into(
    docs: Iterable[str], tokenizer, pick: Callable[[str], ShardWriter], batch_docs: int, desc: str, progress: bool = True
) -> None:
    """Tokenize documents in batches (the Rust tokenizer encodes a batch on all cores) and append each one, then
    EOS, to the shard pick(document) chooses."""
    from tqdm.auto import tqdm

    docs, eos = iter(docs), special_tokens(tokenizer).eos
    with tqdm(desc=desc, unit=" docs", dynamic_ncols=True, disable=not progress) as bar:
        while batch := list(itertools.islice(docs, batch_docs)):
            for doc, encoding in zip(batch, tokenizer.encode_batch(batch)):
                pick(doc).write([*encoding.ids, eos], text_bytes=len(doc.encode("utf-8")))
            bar.update(len(batch))


def is_val_document(doc: str, val_fraction: float) -> bool:
    """A stable, content-based split: the same document lands on the same side on every run."""
    return int(hashlib.sha1(doc.encode("utf-8")).hexdigest()[:8], 16) < val_fraction * 16**8


def build_shards(
    train_docs: Iterable[str],
    tokenizer_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    val_docs: Iterable[str] | None = None,
    val_fraction: float = 0.0,
    sources: Sequence[str] = (),
    batch_docs: int = 1024,
    progress: bool = True,
) -> dict:
    """Tokenize documents into OUT_DIR/train.bin and val.bin, copy the tokenizer there and write meta.json;
    return the metadata. Validation documents are val_docs, or else the val_fraction of train_docs that
    is_val_document picks (one pass, so the inputs may be a stream). Nothing is renamed into place until both
    shards are complete: on an error (ValueError for an empty corpus) the temporary files are removed."""
    tokenizer_path, out_dir = Path(tokenizer_path), Path(out_dir)
    tokenizer = load_tokenizer(tokenizer_path)
    if val_docs is None and not 0 < val_fraction < 1:
        raise ValueError(f"no validation data: give val_docs or a val_fraction in (0, 1), got {val_fraction}")
    dtype = shard_dtype(tokenizer.get_vocab_size())
    out_dir.mkdir(parents=True, exist_ok=True)
    writers = {name: ShardWriter(out_dir / f"{name}.bin", dtype) for name in ("train", "val")}
    try:
        if val_docs is None:
            def route(doc: str) -> ShardWriter:
                return writers["val" if is_val_document(doc, val_fraction) else "train"]

            tokenize_into(train_docs, tokenizer, route, batch_docs, "train.bin + val.bin", progress)
        else:
            tokenize_into(train_docs, tokenizer, lambda _: writers["train"], batch_docs, "train.bin", progress)
            tokenize_into(val_docs, tokenizer, lambda _: writers["val"], batch_docs, "val.bin", progress)
        for name, writer in writers.items():
            if writer.tokens == 0:
                raise ValueError(f"the {name} corpus is empty: no non-blank document was found")
    except BaseException:
        for writer in writers.values():
            writer.discard()
        raise
    # Both shards are complete: swap them in, then the tokenizer and meta.json (open_shards checks the token
    # counts against meta.json, so a crash between these renames is detected, never silently trained on).
    for writer in writers.values():
        writer.commit()
    if tokenizer_path.resolve() != (out_dir / TOKENIZER_FILE).resolve():
        atomic_write_text(out_dir / TOKENIZER_FILE, tokenizer_path.read_text(encoding="utf-8"))
    train, val = writers["train"], writers["val"]
    meta = {
        "dtype": dtype.name,
        "vocab_size": tokenizer.get_vocab_size(),
        "tokenizer_sha256": file_sha256(out_dir / TOKENIZER_FILE),
        "source": list(sources),
        "train_tokens": train.tokens,
        "train_bytes": train.text_bytes,
        "val_tokens": val.tokens,
        "val_bytes": val.text_bytes,
    }
    atomic_write_text(out_dir / META_FILE, json.dumps(meta, indent=2) + "\n")
    return meta
