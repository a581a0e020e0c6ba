"""Text corpora as streams of documents: .txt files, .jsonl files, or a Hugging Face dataset streamed from the Hub.

train_custom_tokenizer.py and data/prepare_pretrain.py both read through here, so a tokenizer is trained on
exactly the documents that the token shards are made of, and bad input gets the same one-line errors.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from lillm.fileio import utf8_lines

SUFFIXES = (".txt", ".jsonl")


class CorpusError(ValueError):
    """Bad corpus input (missing file, bad line, missing field): scripts print it in one line and exit with 2."""


def check_files(paths: Iterable[Path]) -> list[Path]:
    """The paths, once each is known to be an existing .txt or .jsonl file (checked before any long work)."""
    paths = [Path(p) for p in paths]
    for path in paths:
        if not path.is_file():
            raise CorpusError(f"input file not found: {path}")
        if path.suffix not in SUFFIXES:
            raise CorpusError(f"{path}: unsupported file type {path.suffix!r}; use .txt or .jsonl")
    return paths


def read_txt(path: Path) -> Iterator[str]:
    """Documents separated by blank lines, stripped, streamed line by line (a file larger than memory is fine)."""
    lines: list[str] = []
    for _, line in utf8_lines(path, CorpusError):
        if line.strip():
            lines.append(line)
        elif lines:
            yield "".join(lines).strip()
            lines = []
    if lines:
        yield "".join(lines).strip()


def record_text(record: object, text_field: str, where: str, chat_messages: bool = False) -> str:
    """The text of one jsonl line or dataset row: its `text_field` string. With chat_messages, a row without
    it may instead hold a "messages" list of chat turns, whose contents are joined with newlines."""
    if not isinstance(record, dict):
        raise CorpusError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if text_field in record:
        value = record[text_field]
        if not isinstance(value, str):
            raise CorpusError(f"{where}: {text_field!r} is {type(value).__name__}, not a string")
        return value
    turns = record.get("messages") if chat_messages else None
    if isinstance(turns, list) and all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in turns):
        return "\n".join(m["content"] for m in turns)
    alternative = " (or 'messages' list of chat turns)" if chat_messages else ""
    raise CorpusError(f"{where}: no string field {text_field!r}{alternative}; see --text_field")


def read_jsonl(path: Path, text_field: str, chat_messages: bool = False) -> Iterator[str]:
    """One document per line; blank lines and blank documents are skipped."""
    for line_no, line in utf8_lines(path, CorpusError):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise CorpusError(f"{path}:{line_no}: invalid JSON, expected one object per line ({e.msg})") from None
        text = record_text(record, text_field, f"{path}:{line_no}", chat_messages)
        if text.strip():
            yield text


def read_documents(paths: Iterable[Path], text_field: str = "text", chat_messages: bool = False) -> Iterator[str]:
    """The documents of several .txt / .jsonl files, in order (call check_files first to fail early)."""
    for path in paths:
        path = Path(path)
        yield from read_jsonl(path, text_field, chat_messages) if path.suffix == ".jsonl" else read_txt(path)


def hub_documents(
    name: str, config: str | None, split: str, text_field: str = "text", chat_messages: bool = False
) -> Iterator[str]:
    """Documents of a Hugging Face dataset (a Hub name or a local folder), streamed: nothing is downloaded up
    front and one row at a time is held in memory. Blank documents are skipped."""
    import datasets  # slow to import: only when asked for

    try:
        rows = datasets.load_dataset(name, config, split=split, streaming=True)
    except Exception as e:  # datasets raises many types (offline, not found, bad split, ...)
        raise CorpusError(f"cannot load dataset {name!r} split {split!r}: {e}") from None
    for i, row in enumerate(rows):
        text = record_text(row, text_field, f"{name}[{split}] row {i}", chat_messages)
        if text.strip():
            yield text


def text_slice(path: str | Path, n_chars: int) -> str:
    """The first n_chars characters of a .txt corpus, cut back to the last document boundary (blank line), so
    a small experiment gets whole documents. Reads only what it returns."""
    with open(path, encoding="utf-8") as f:
        text = f.read(n_chars)
    return text[: text.rfind("\n\n")] if "\n\n" in text else text


def split_documents(text: str) -> list[str]:
    """The documents of a text, separated by blank lines and stripped: the rule read_txt applies to a file."""
    return [doc.strip() for doc in re.split(r"\n\s*\n", text) if doc.strip()]
