"""Train a byte-level BPE tokenizer.json from local text/jsonl files or a Hugging Face dataset.

    python train_custom_tokenizer.py                                  # TinyStories + chat data from ../shared/data
    python train_custom_tokenizer.py notes.txt chats.jsonl --vocab_size 4096 --output tok.json
    python train_custom_tokenizer.py --dataset roneneldan/TinyStories --max_docs 200000
    python train_custom_tokenizer.py --impl scratch                   # the hand-written trainer from chapter 01

Inputs: .txt files hold documents separated by blank lines; .jsonl files hold one JSON object per line with the
text in --text_field, or a "messages" list of chat turns whose contents are joined so the tokenizer sees chat text.
"""

from __future__ import annotations

import argparse
import itertools
import time
from collections.abc import Iterator
from pathlib import Path

from lillm import cli
from lillm.corpus import check_files, hub_documents, read_documents
from lillm.paths import default_data_dir
from lillm.tokenizer import (
    MIN_VOCAB_SIZE,
    BPETokenizer,
    bytes_per_token,
    save_tokenizer,
    train_hf_tokenizer,
)

DEFAULT_INPUTS = ("pretrain_tinystories_train.txt", "chat_train.jsonl")
DEFAULT_VAL_FILE = "pretrain_tinystories_val.txt"
VAL_SAMPLE_BYTES = 1_000_000  # bytes/token is measured on about this much held-out text


class InputError(ValueError):
    """Bad user input: reported as one line, exit code 2."""


def resolve_inputs(args: argparse.Namespace) -> tuple[Iterator[str], str]:
    """The training documents and a short description of where they come from."""
    if args.dataset and args.inputs:
        raise InputError("give either input files or --dataset, not both")
    if args.dataset:
        docs = hub_documents(args.dataset, None, args.split, args.text_field, chat_messages=True)
        source = f"{args.dataset}[{args.split}]"
    else:
        if args.inputs:
            paths = check_files([Path(p) for p in args.inputs])
        elif (data_dir := default_data_dir()) is not None:
            paths = check_files([data_dir / name for name in DEFAULT_INPUTS])
        else:
            raise InputError("no input files given and no default data folder (../shared/data or $LILLM_DATA_DIR); "
                             "pass .txt/.jsonl files or --dataset")
        docs, source = read_documents(paths, args.text_field, chat_messages=True), ", ".join(str(p) for p in paths)
    if args.max_docs is not None:
        docs = itertools.islice(docs, args.max_docs)
    return docs, source


def val_sample(args: argparse.Namespace) -> tuple[list[str], Path | None]:
    """The first ~1 MB of the held-out file (default: TinyStories val when ../shared/data exists)."""
    if args.val_file is None:
        data_dir = default_data_dir()
        if data_dir is None or not (data_dir / DEFAULT_VAL_FILE).is_file():
            return [], None
        path = data_dir / DEFAULT_VAL_FILE
    else:
        path = check_files([Path(args.val_file)])[0]
    sample, size = [], 0
    for doc in read_documents([path], args.text_field, chat_messages=True):
        sample.append(doc)
        size += len(doc.encode("utf-8"))
        if size >= VAL_SAMPLE_BYTES:
            break
    if not sample:
        raise InputError(f"validation file {path} holds no text")
    return sample, path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="*", help=".txt or .jsonl files (default: TinyStories train + chat_train.jsonl)")
    parser.add_argument("--dataset", help="Hugging Face dataset name, streamed (instead of input files)")
    parser.add_argument("--split", default="train", help="dataset split (with --dataset)")
    parser.add_argument("--max_docs", type=cli.positive_int, help="use at most this many documents")
    parser.add_argument("--text_field", default="text", help="jsonl/dataset field holding the text")
    parser.add_argument("--vocab_size", type=int, default=8192, help="total vocabulary incl. 4 special + 256 bytes")
    parser.add_argument("--output", type=cli.output_file, default=Path("tokenizer.json"), help="where to write tokenizer.json (atomically)")
    parser.add_argument("--impl", choices=("hf", "scratch"), default="hf",
                        help="hf: the fast `tokenizers` trainer; scratch: the hand-written lillm BPE")
    parser.add_argument("--val_file", help="held-out .txt/.jsonl for bytes/token (default: TinyStories val)")
    args = parser.parse_args(argv)
    if args.vocab_size < MIN_VOCAB_SIZE:
        raise InputError(f"--vocab_size must be at least {MIN_VOCAB_SIZE} (4 special + 256 bytes + 1 merge), "
                         f"got {args.vocab_size}")
    return args


@cli.error_boundary("train_custom_tokenizer.py")  # bad flags or input files: one line, exit status 2
def main(argv: list[str] | None = None) -> None:
    from tqdm.auto import tqdm

    args = parse_args(argv)
    docs, source = resolve_inputs(args)
    val_docs, val_path = val_sample(args)  # fail on a bad --val_file before the long part
    docs = tqdm(docs, desc="reading documents", unit="doc")

    print(f"training a {args.vocab_size}-token byte-level BPE ({args.impl}) on {source}")
    start = time.perf_counter()
    if args.impl == "hf":
        tokenizer = train_hf_tokenizer(docs, args.vocab_size, show_progress=True)
    else:
        scratch = BPETokenizer()
        scratch.train(docs, args.vocab_size, verbose=True)
        tokenizer = scratch.to_hf()
    seconds = time.perf_counter() - start
    if docs.n == 0:
        raise InputError(f"no documents found in {source}")
    save_tokenizer(tokenizer, args.output)

    print(f"vocab size: {tokenizer.get_vocab_size()} (asked for {args.vocab_size})")
    print(f"training time: {seconds:.2f} s on {docs.n} documents")
    if val_path is None:
        print("bytes/token: skipped (no --val_file and no ../shared/data)")
    else:
        print(f"bytes/token on {val_path}: {bytes_per_token(tokenizer, val_docs):.3f}")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
