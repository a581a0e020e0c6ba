"""Tokenize a text corpus into train.bin / val.bin token shards for pretrain.py.

    python data/prepare_pretrain.py                                   # TinyStories from ../shared/data
    python data/prepare_pretrain.py corpus.txt --val_fraction 0.01 --out_dir data/mycorpus
    python data/prepare_pretrain.py --dataset HuggingFaceFW/fineweb-edu --dataset_config sample-10BT \\
        --max_docs 200000 --tokenizer tokenizer.json --out_dir data/fineweb

Inputs: .txt files (documents separated by a blank line), .jsonl files (one document per line in --text_field),
or a Hugging Face dataset streamed with `datasets`. An EOS token follows every document. The output folder gets
train.bin, val.bin (uint16 when the vocabulary has at most 65536 tokens, else uint32), a copy of the tokenizer and
meta.json with the counts, the dtype and the tokenizer's SHA-256 (pretrain.py checks it).
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tqdm.auto import tqdm  # noqa: E402

from lillm.corpus import check_files, hub_documents, read_documents  # noqa: E402
from lillm.data import META_FILE, TOKENIZER_FILE, ShardWriter, file_sha256, shard_dtype  # noqa: E402
from lillm.paths import default_data_file  # noqa: E402
from lillm.tokenizer import atomic_write_text, load_tokenizer, special_tokens  # noqa: E402


def tokenize_into(docs: Iterable[str], tokenizer, pick: Callable[[str], ShardWriter], batch_docs: int, desc: str) -> None:
    """Tokenize documents in batches (the Rust tokenizer encodes a batch on all cores) and append each one, then
    EOS, to the shard pick(document) chooses."""
    docs, eos = iter(docs), special_tokens(tokenizer).eos
    with tqdm(desc=desc, unit=" docs", dynamic_ncols=True) as bar:
        while batch := list(itertools.islice(docs, batch_docs)):
            for doc, encoding in zip(batch, tokenizer.encode_batch(batch)):
                pick(doc).write([*encoding.ids, eos], text_bytes=len(doc.encode("utf-8")))
            bar.update(len(batch))


def is_val_document(doc: str, val_fraction: float) -> bool:
    """A stable, content-based split: the same document lands on the same side on every run."""
    return int(hashlib.sha1(doc.encode("utf-8")).hexdigest()[:8], 16) < val_fraction * 16**8


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="*", type=Path, help=".txt or .jsonl training files (default: TinyStories train)")
    p.add_argument("--val_file", type=Path, nargs="*", help="held-out files (default: TinyStories val with the default inputs)")
    p.add_argument("--val_fraction", type=float, default=0.0, help="hold out this fraction of the inputs instead")
    p.add_argument("--dataset", help="Hugging Face dataset name, streamed (e.g. roneneldan/TinyStories)")
    p.add_argument("--dataset_config", help="dataset configuration name (e.g. sample-10BT for FineWeb-Edu)")
    p.add_argument("--split", default="train")
    p.add_argument("--val_split", help="dataset split for validation (default: --val_fraction of --split)")
    p.add_argument("--max_docs", type=int, help="stop after this many training documents (for --dataset)")
    p.add_argument("--text_field", default="text", help="field holding the text in .jsonl / dataset rows")
    p.add_argument("--tokenizer", type=Path, default=Path("tokenizer.json"), help="tokenizer.json to encode with")
    p.add_argument("--out_dir", type=Path, default=Path("data/tinystories"))
    p.add_argument("--batch_docs", type=int, default=1024, help="documents per encode_batch call")
    args = p.parse_args(argv)

    writers: dict[str, ShardWriter] = {}
    try:
        tokenizer = load_tokenizer(args.tokenizer)
        if not 0 <= args.val_fraction < 1:
            raise ValueError(f"--val_fraction must be in [0, 1), got {args.val_fraction}")
        if args.val_fraction and (args.val_file or args.val_split):
            raise ValueError("give either --val_fraction or --val_file/--val_split, not both")
        if args.dataset:
            sources = [args.dataset]
            train_docs = hub_documents(args.dataset, args.dataset_config, args.split, args.text_field)
            val_docs = hub_documents(args.dataset, args.dataset_config, args.val_split, args.text_field) if args.val_split else None
            if args.max_docs:
                train_docs = itertools.islice(train_docs, args.max_docs)
        else:
            inputs = args.inputs or [default_data_file("pretrain_tinystories_train.txt")]
            if args.val_file is None and not args.inputs and not args.val_fraction:
                args.val_file = [default_data_file("pretrain_tinystories_val.txt")]
            inputs, val_files = check_files(inputs), check_files(args.val_file or [])
            sources = [str(f) for f in inputs]
            train_docs = read_documents(inputs, args.text_field)
            val_docs = read_documents(val_files, args.text_field) if val_files else None
        if val_docs is None and not args.val_fraction:
            raise ValueError("no validation data: give --val_file, --val_split or a --val_fraction in (0, 1)")

        dtype = shard_dtype(tokenizer.get_vocab_size())
        args.out_dir.mkdir(parents=True, exist_ok=True)
        writers = {name: ShardWriter(args.out_dir / f"{name}.bin", dtype) for name in ("train", "val")}
        if val_docs is None:  # one pass over the (possibly streamed) inputs, each document routed by its hash
            def route(doc: str) -> ShardWriter:
                return writers["val" if is_val_document(doc, args.val_fraction) else "train"]

            tokenize_into(train_docs, tokenizer, route, args.batch_docs, desc="train.bin + val.bin")
        else:
            tokenize_into(train_docs, tokenizer, lambda _: writers["train"], args.batch_docs, desc="train.bin")
            tokenize_into(val_docs, tokenizer, lambda _: writers["val"], args.batch_docs, desc="val.bin")
        for name, writer in writers.items():
            if writer.tokens == 0:
                raise ValueError(f"the {name} corpus is empty: no non-blank document was found")
    except (ValueError, FileNotFoundError) as e:
        for writer in writers.values():
            writer.discard()
        print(f"prepare_pretrain.py: error: {e}", file=sys.stderr)
        sys.exit(2)

    # Both shards are complete: swap them in, then the tokenizer and meta.json (pretrain.py checks the token
    # counts against meta.json, so a crash between these renames is detected, never silently trained on).
    for writer in writers.values():
        writer.commit()
    if args.tokenizer.resolve() != (args.out_dir / TOKENIZER_FILE).resolve():
        atomic_write_text(args.out_dir / TOKENIZER_FILE, args.tokenizer.read_text(encoding="utf-8"))
    train, val = writers["train"], writers["val"]
    meta = {
        "dtype": dtype.name,
        "vocab_size": tokenizer.get_vocab_size(),
        "tokenizer_sha256": file_sha256(args.out_dir / TOKENIZER_FILE),
        "source": sources,
        "train_tokens": train.tokens,
        "train_bytes": train.text_bytes,
        "val_tokens": val.tokens,
        "val_bytes": val.text_bytes,
    }
    atomic_write_text(args.out_dir / META_FILE, json.dumps(meta, indent=2) + "\n")
    print(
        f"wrote {args.out_dir}: train {train.tokens:,} tokens, val {val.tokens:,} tokens "
        f"({dtype.name}, vocab {meta['vocab_size']}, {val.text_bytes / val.tokens:.2f} bytes/token on val)"
    )


if __name__ == "__main__":
    main()
