"""The scripts' command-line contract: arguments checked while they are parsed, and one error boundary.

Every expected failure (a bad value, file, checkpoint or resource such as a port) ends as one stderr line,
`script.py: error: <what, where, what to do>`, and exit status 2, before any work is lost. Anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

import argparse
import functools
import socket
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from lillm.fileio import check_output_dir, check_output_file

# ValueError covers CheckpointError, DataError, CorpusError and UnicodeDecodeError; OSError covers missing files,
# folders where files belong, permissions, a full disk and ports in use.
EXPECTED_ERRORS = (ValueError, OSError)


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line (argparse prints its usage block first), under the name
    of the script that builds it, also when its main(argv) is called from Python."""

    def __init__(self, *args, **kwargs):
        caller = sys._getframe(1).f_globals.get("__file__")
        kwargs.setdefault("prog", Path(caller).name if caller else None)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def error_boundary(script: str) -> Callable:
    """Decorate a script's main(argv): an expected exception becomes `script: error: ...` and SystemExit(2)."""

    def wrap(main: Callable) -> Callable:
        @functools.wraps(main)
        def wrapped(*args, **kwargs):
            try:
                return main(*args, **kwargs)
            except EXPECTED_ERRORS as e:
                print(f"{script}: error: {one_line(e)}", file=sys.stderr, flush=True)
                raise SystemExit(2) from None

        return wrapped

    return wrap


def _argument(check: Callable) -> Callable[[str], object]:
    """An argparse `type=` from a checker that raises ValueError: the message becomes argparse's one line."""

    @functools.wraps(check)
    def parse(text: str):
        try:
            return check(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return parse


@_argument
def device(name: str) -> str:
    """A --device this machine has: auto, cpu, cuda[:N] with CUDA present, mps with MPS present."""
    if name == "auto":
        return name
    try:
        parsed = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r}: CUDA is not available on this machine; use --device cpu (or auto)")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif parsed.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ValueError(f"device {name!r}: MPS is not available on this machine; use --device cpu (or auto)")
    elif parsed.type != "cpu":
        raise ValueError(f"unsupported device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    return name


@_argument
def dtype(name: str) -> str:
    """A --dtype lillm.devices.resolve_dtype knows (checked now, not after the data is read)."""
    from lillm.devices import resolve_dtype

    resolve_dtype(name, torch.device("cpu"))
    return name


def _bounded(kind: type, low, what: str) -> Callable[[str], object]:
    @_argument
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise ValueError(f"invalid {kind.__name__} value: {text!r}") from None
        if value < low:
            raise ValueError(f"must be {what}, got {text}")
        return value

    parse.__name__ = f"{kind.__name__}_{what.replace(' ', '_')}"
    return parse


positive_int = _bounded(int, 1, "at least 1")
non_negative_int = _bounded(int, 0, ">= 0")
non_negative_float = _bounded(float, 0.0, ">= 0")


@_argument
def port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"invalid port {text!r}; use a number in 1..65535") from None
    if not 1 <= value <= 65535:
        raise ValueError(f"port {value} is out of range; use a number in 1..65535")
    return value


@_argument
def text(value: str) -> str:
    """Text from the command line: bytes that are not UTF-8 reach Python as lone surrogates; refuse them here
    rather than deep in the tokenizer."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = value[e.start].encode("utf-8", "surrogateescape")
        raise ValueError(f"not valid UTF-8 (byte 0x{bad.hex()} at position {e.start}); pass UTF-8 text") from None
    return value


@_argument
def output_file(value: str) -> Path:
    return check_output_file(value, "path")


@_argument
def output_dir(value: str) -> Path:
    return check_output_dir(value, "path")


def check_port_free(host: str, port_number: int) -> None:
    """Fail now, not after the model has loaded, when the port cannot be bound."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the web server does: TIME_WAIT is no conflict
        try:
            s.bind((host, port_number))
        except OSError as e:
            raise OSError(f"cannot listen on {host}:{port_number} ({e.strerror}); pick another --port or stop the "
                          "program using it") from None
