"""lillm.corpus: the documents the tokenizer trainer and the shard writer both read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lillm.corpus import CorpusError, check_files, read_documents


def test_txt_documents_are_blank_line_separated_and_stripped(tmp_path: Path):
    path = tmp_path / "a.txt"
    path.write_text("\n\n  First story,\ntwo lines.  \n\n\n   \nSecond: ünïcødé 🐱\n\nThird", encoding="utf-8")
    assert list(read_documents([path])) == ["First story,\ntwo lines.", "Second: ünïcødé 🐱", "Third"]


def test_shared_val_text_reads_as_its_blank_line_split(data_dir: Path):
    path = data_dir / "pretrain_tinystories_val.txt"
    expected = [d.strip() for d in path.read_text(encoding="utf-8").split("\n\n") if d.strip()]
    assert list(read_documents([path])) == expected


def test_jsonl_reads_text_field_and_chat_turns_only_when_asked(tmp_path: Path):
    path = tmp_path / "a.jsonl"
    rows = [{"text": "plain"}, {"text": "   "}, {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n", encoding="utf-8")
    assert list(read_documents([path], chat_messages=True)) == ["plain", "hi\nhello"]
    with pytest.raises(CorpusError, match=r"a\.jsonl:3: no string field 'text'; see --text_field"):
        list(read_documents([path]))


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("bad.txt", b"fine\n\nbroken \xff byte\n", r"bad\.txt:3: not valid UTF-8"),
        ("bad.jsonl", b'{"text": "ok"}\n[1, 2]\n', r"bad\.jsonl:2: expected a JSON object, got list"),
        ("bad.jsonl", b'{"text": "ok"}\n{"text": \n', r"bad\.jsonl:2: invalid JSON"),
        ("bad.jsonl", b'{"text": ["a"]}\n', r"bad\.jsonl:1: 'text' is list, not a string"),
    ],
    ids=["utf8", "not-object", "not-json", "not-string"],
)
def test_bad_lines_name_file_and_line(tmp_path: Path, name: str, content: bytes, message: str):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(CorpusError, match=message):
        list(read_documents([path]))


def test_check_files_rejects_missing_and_unknown_types(tmp_path: Path):
    (tmp_path / "a.csv").write_text("x")
    with pytest.raises(CorpusError, match=r"input file not found: .*nope\.txt"):
        check_files([tmp_path / "nope.txt"])
    with pytest.raises(CorpusError, match=r"a\.csv: unsupported file type '\.csv'"):
        check_files([tmp_path / "a.csv"])
