"""File safety: writes that never leave a half-written file, and output paths checked before any work starts.

A script that trains for an hour and then finds its --output is a directory has wasted the hour; these checks
run while the arguments are parsed.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path


def utf8_lines(path: str | os.PathLike, error: type[ValueError] = ValueError) -> Iterator[tuple[int, str]]:
    """(line number, line) of a UTF-8 text file, streamed; a line that is not UTF-8 raises `error` naming
    file:line, so every reader of user files reports bad bytes the same way."""
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            try:
                yield line_no, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise error(f"{path}:{line_no}: not valid UTF-8 ({e.reason})") from None


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` via a temp file in the same folder, fsync and rename: never a half-written file.

    The temp file is created with mode 0666 minus the umask, like a plain open() would (tempfile.mkstemp's
    0600 would leave the file unreadable to the others sharing a checkpoint folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def check_output_file(path: str | os.PathLike, flag: str) -> Path:
    """`path` can become a file: it is not a folder, and no file stands where one of its parent folders goes."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a folder; give a file name (e.g. {path / 'tokenizer.json'})")
    _check_parents(path, flag)
    return path


def check_output_dir(path: str | os.PathLike, flag: str) -> Path:
    """`path` can become a folder: it is not a file, and neither is any of its parents."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path} is a file, not a folder; give a folder path")
    _check_parents(path, flag)
    return path


def _check_parents(path: Path, flag: str) -> None:
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"{flag} {path}: {parent} is a file, not a folder")
            return
