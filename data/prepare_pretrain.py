"""Tokenize a text corpus into train.bin / val.bin token shards for pretrain.py.

    python data/prepare_pretrain.py                                   # TinyStories from ../shared/data
    python data/prepare_pretrain.py corpus.txt --val_fraction 0.01 --out_dir data/mycorpus
    python data/prepare_pretrain.py --dataset HuggingFaceFW/fineweb-edu --dataset_config sample-10BT \\
        --max_docs 200000 --tokenizer tokenizer.json --out_dir data/fineweb

Inputs: .txt files (documents separated by a blank line), .jsonl files (one document per line in --text_field, or
a chat "messages" list whose turns are joined with newlines, e.g. the story instructions that speedrun.sh mixes
in), or a Hugging Face dataset streamed with `datasets`. An EOS token follows every document. The output folder gets
train.bin, val.bin (uint16 when the vocabulary has at most 65536 tokens, else uint32), a copy of the tokenizer and
meta.json with the counts, the dtype and the tokenizer's SHA-256 (pretrain.py checks it).
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lillm import cli  # noqa: E402
from lillm.corpus import check_files, hub_documents, read_documents  # noqa: E402
from lillm.data import build_shards  # noqa: E402
from lillm.paths import default_data_file  # noqa: E402
from lillm.tokenizer import load_tokenizer  # noqa: E402


@cli.error_boundary("prepare_pretrain.py")  # bad flags or input files: one line, exit status 2
def main(argv: list[str] | None = None) -> None:
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="*", type=Path, help=".txt or .jsonl training files (default: TinyStories train)")
    p.add_argument("--val_file", type=Path, nargs="*", help="held-out files (default: TinyStories val with the default inputs)")
    p.add_argument("--val_fraction", type=float, default=0.0, help="hold out this fraction of the inputs instead")
    p.add_argument("--dataset", help="Hugging Face dataset name, streamed (e.g. roneneldan/TinyStories)")
    p.add_argument("--dataset_config", help="dataset configuration name (e.g. sample-10BT for FineWeb-Edu)")
    p.add_argument("--split", default="train")
    p.add_argument("--val_split", help="dataset split for validation (default: --val_fraction of --split)")
    p.add_argument("--max_docs", type=cli.positive_int, help="stop after this many training documents (for --dataset)")
    p.add_argument("--text_field", default="text", help="field holding the text in .jsonl / dataset rows")
    p.add_argument("--tokenizer", type=Path, default=Path("tokenizer.json"), help="tokenizer.json to encode with")
    p.add_argument("--out_dir", type=cli.output_dir, default=Path("data/tinystories"))
    p.add_argument("--batch_docs", type=cli.positive_int, default=1024, help="documents per encode_batch call")
    args = p.parse_args(argv)

    load_tokenizer(args.tokenizer)  # a bad tokenizer fails before any document is read
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
        train_docs = read_documents(inputs, args.text_field, chat_messages=True)
        val_docs = read_documents(val_files, args.text_field, chat_messages=True) if val_files else None
    if val_docs is None and not args.val_fraction:
        raise ValueError("no validation data: give --val_file, --val_split or a --val_fraction in (0, 1)")
    meta = build_shards(train_docs, args.tokenizer, args.out_dir, val_docs, args.val_fraction, sources, args.batch_docs)
    print(
        f"wrote {args.out_dir}: train {meta['train_tokens']:,} tokens, val {meta['val_tokens']:,} tokens "
        f"({meta['dtype']}, vocab {meta['vocab_size']}, {meta['val_bytes'] / meta['val_tokens']:.2f} bytes/token on val)"
    )


if __name__ == "__main__":
    main()
