"""Self-contained checkpoint folders: weights, model config, tokenizer and training state travel together.

    DIR/config.json          ModelConfig fields
    DIR/model.safetensors    weights (a tied embedding/head matrix is stored once)
    DIR/tokenizer.json       Hugging Face `tokenizers` format
    DIR/meta.json            what made it (stage, chat template version, training arguments, metrics)
    DIR/trainer_state.pt     optional: optimizer state, step, data position, RNG states (for --resume)

A save never destroys the previous checkpoint: everything is written to DIR.tmp, flushed to disk, then swapped
in with renames. If a crash lands between the two renames, DIR.old is still complete and `load` uses it.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model

from lillm.model import LilLM, ModelConfig

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
META_FILE = "meta.json"
STATE_FILE = "trainer_state.pt"


class CheckpointError(ValueError):
    """A checkpoint folder is missing, incomplete or inconsistent."""


@dataclass
class Checkpoint:
    model: LilLM
    tokenizer: "tokenizers.Tokenizer"  # noqa: F821 (imported lazily)
    config: ModelConfig
    meta: dict
    directory: Path


def _fsync_tree(directory: Path) -> None:
    for path in directory.iterdir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def unwrap(model: torch.nn.Module) -> LilLM:
    """The plain LilLM inside DistributedDataParallel and/or torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def save_checkpoint(
    directory: str | os.PathLike,
    model: torch.nn.Module,
    tokenizer_path: str | os.PathLike,
    meta: dict | None = None,
    trainer_state: dict | None = None,
) -> Path:
    """Write a complete checkpoint folder atomically (see module docstring) and return its path.

    trainer_state: anything torch.save can store that loads with weights_only=True (tensors, numbers, strings,
    lists, dicts), e.g. {"optimizer": opt.state_dict(), "step": 100, "rng": ...}.
    """
    directory = Path(directory)
    model = unwrap(model)
    tmp, old = directory.with_name(directory.name + ".tmp"), directory.with_name(directory.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / CONFIG_FILE).write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")
    save_model(model, str(tmp / WEIGHTS_FILE))
    shutil.copyfile(tokenizer_path, tmp / TOKENIZER_FILE)
    (tmp / META_FILE).write_text(json.dumps(meta or {}, indent=2, default=str) + "\n")
    if trainer_state is not None:
        torch.save(trainer_state, tmp / STATE_FILE)
    _fsync_tree(tmp)

    if directory.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.rename(directory, old)
    os.rename(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)
    return directory


def resolve(directory: str | os.PathLike) -> Path:
    """The folder to read: DIR, or DIR.old when a save was interrupted between its two renames."""
    directory = Path(directory)
    if directory.is_dir():
        return directory
    old = directory.with_name(directory.name + ".old")
    if old.is_dir():
        return old
    raise CheckpointError(f"checkpoint folder not found: {directory}")


def _require(directory: Path, name: str) -> Path:
    path = directory / name
    if not path.is_file():
        raise CheckpointError(f"checkpoint {directory} is incomplete: {name} is missing")
    return path


def load_config(directory: str | os.PathLike) -> ModelConfig:
    directory = resolve(directory)
    path = _require(directory, CONFIG_FILE)
    try:
        return ModelConfig.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: invalid model config ({e})") from None


def load_checkpoint(directory: str | os.PathLike, device: str | torch.device = "cpu") -> Checkpoint:
    """Model (in eval mode, on device), tokenizer, config and meta from a checkpoint folder."""
    from lillm.tokenizer import load_tokenizer

    directory = resolve(directory)
    config = load_config(directory)
    tokenizer = load_tokenizer(_require(directory, TOKENIZER_FILE))
    if tokenizer.get_vocab_size() > config.vocab_size:
        raise CheckpointError(
            f"checkpoint {directory}: tokenizer has {tokenizer.get_vocab_size()} tokens but the model's "
            f"vocab_size is {config.vocab_size}"
        )
    model = LilLM(config)
    try:
        missing, unexpected = load_model(model, str(_require(directory, WEIGHTS_FILE)), strict=False)
    except Exception as e:  # safetensors raises several types for truncated/corrupt files
        raise CheckpointError(f"checkpoint {directory}: cannot read {WEIGHTS_FILE} ({e})") from None
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {directory}: weights do not match config.json (missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]})"
        )
    meta_path = directory / META_FILE
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    return Checkpoint(model.to(device).eval(), tokenizer, config, meta, directory)


def load_trainer_state(directory: str | os.PathLike) -> dict:
    """The trainer_state saved with a checkpoint (optimizer state, step, RNG...), loaded with weights_only."""
    path = _require(resolve(directory), STATE_FILE)
    return torch.load(path, map_location="cpu", weights_only=True)
