"""Hand-written BPE vs Hugging Face `tokenizers`: training time, compression and encode speed.

    python bench/bench_tokenizer.py [--train FILE] [--val FILE] [--vocab_size 8192]

Targets (issue 3): scratch training within 10x of `tokenizers`' BpeTrainer on the same text, bytes/token within
2% of it on the validation text. The ratio lines are printed last.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from lillm.paths import default_data_dir
from lillm.tokenizer import BPETokenizer, bytes_per_token, train_hf_tokenizer


def read_docs(path: Path) -> list[str]:
    return [doc for doc in path.read_text(encoding="utf-8").split("\n\n") if doc.strip()]


def timed(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data_dir = default_data_dir() or Path("../shared/data")
    parser.add_argument("--train", type=Path, default=data_dir / "pretrain_tinystories_train.txt")
    parser.add_argument("--val", type=Path, default=data_dir / "pretrain_tinystories_val.txt")
    parser.add_argument("--vocab_size", type=int, default=8192)
    args = parser.parse_args()
    for path in (args.train, args.val):
        if not path.is_file():
            sys.exit(f"bench_tokenizer.py: error: file not found: {path} (pass --train/--val)")
    train_docs, val_docs = read_docs(args.train), read_docs(args.val)
    val_mb = sum(len(doc.encode("utf-8")) for doc in val_docs) / 1e6
    print(f"train {args.train.name}: {len(train_docs)} docs; val {args.val.name}: {val_mb:.2f} MB")

    hf, hf_train_s = timed(train_hf_tokenizer, train_docs, args.vocab_size)
    scratch = BPETokenizer()
    _, scratch_train_s = timed(scratch.train, train_docs, args.vocab_size)
    exported = scratch.to_hf()  # encodes identically (tests/test_tokenizer.py), so it measures scratch's compression
    hf_bpt, scratch_bpt = bytes_per_token(hf, val_docs), bytes_per_token(exported, val_docs)

    # Encode speed: the Rust encoder as the scripts use it (batched, all cores) and single-threaded per document;
    # the Python encoder per document with a fresh word cache.
    _, hf_batch_s = timed(hf.encode_batch, val_docs)
    _, hf_single_s = timed(lambda: [hf.encode(doc) for doc in val_docs])
    with tempfile.TemporaryDirectory() as tmp:
        scratch.save(Path(tmp) / "bpe.json")
        fresh = BPETokenizer.load(Path(tmp) / "bpe.json")
    _, scratch_encode_s = timed(lambda: [fresh.encode(doc) for doc in val_docs])

    print(f"vocab: tokenizers {hf.get_vocab_size()}, scratch {scratch.vocab_size}")
    print(f"train time: tokenizers {hf_train_s:.2f} s, scratch {scratch_train_s:.2f} s")
    print(f"bytes/token on val: tokenizers {hf_bpt:.4f}, scratch {scratch_bpt:.4f}")
    print(f"encode MB/s: tokenizers batch {val_mb / hf_batch_s:.2f}, tokenizers single-thread "
          f"{val_mb / hf_single_s:.2f}, scratch {val_mb / scratch_encode_s:.2f}")
    print(f"train time ratio scratch/tokenizers: {scratch_train_s / hf_train_s:.2f}x (target <= 10x)")
    print(f"bytes/token ratio scratch/tokenizers: {scratch_bpt / hf_bpt:.4f} (target within 2%)")
    print(f"encode speed ratio tokenizers-batch/scratch: {scratch_encode_s / hf_batch_s:.1f}x")


if __name__ == "__main__":
    main()
