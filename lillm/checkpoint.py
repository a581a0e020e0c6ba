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
import math
import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from safetensors.torch import load_file, save_model

from lillm.data import file_sha256
from lillm.model import LilLM, ModelConfig, RotaryEmbedding

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
META_FILE = "meta.json"
STATE_FILE = "trainer_state.pt"
TOKENIZER_HASH_KEY = "tokenizer_sha256"  # in model.safetensors' metadata
WEIGHT_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}  # bytes per element of the dtypes a weight may have
MAX_HEADER_BYTES = 100_000_000  # the safetensors format's own limit


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
    # The weights name the tokenizer they were trained with, so a swapped tokenizer.json is refused on load.
    save_model(model, str(tmp / WEIGHTS_FILE), metadata={TOKENIZER_HASH_KEY: file_sha256(tokenizer_path)})
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
    if directory.is_file():
        raise CheckpointError(f"{directory} is a file; pass the checkpoint folder that holds it ({directory.parent})")
    old = directory.with_name(directory.name + ".old")
    if old.is_dir():
        return old
    raise CheckpointError(f"checkpoint folder not found: {directory}")


def _require(directory: Path, name: str) -> Path:
    path = directory / name
    if not path.is_file():
        raise CheckpointError(f"checkpoint {directory} is incomplete: {name} is missing")
    return path


def _one_line(e: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message, shortened: library errors can span screens."""
    lines = str(e).strip().splitlines()
    text = lines[0] if lines else type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _read_json_object(path: Path) -> dict:
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({_one_line(e)}); the file is damaged: restore it or save the checkpoint again") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(value).__name__}; restore it or save the checkpoint again")
    return value


def _type_ok(value, annotation: str) -> bool:
    """Does a JSON value fit a ModelConfig field annotation ("int", "int | None", "float", "str", "bool")?"""
    kinds = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,), "None": (type(None),)}
    allowed = tuple(t for name in annotation.split("|") for t in kinds[name.strip()])
    return isinstance(value, allowed) and (bool in allowed or not isinstance(value, bool))


def load_config(directory: str | os.PathLike) -> ModelConfig:
    """config.json, every field checked for its JSON type (true is not a layer count, "64" is not a width)."""
    directory = resolve(directory)
    path = _require(directory, CONFIG_FILE)
    raw = _read_json_object(path)
    for f in fields(ModelConfig):
        if f.name in raw and not _type_ok(raw[f.name], str(f.type)):
            raise CheckpointError(f"{path}: {f.name} must be {f.type}, got {raw[f.name]!r}")
    try:
        return ModelConfig.from_dict(raw)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: invalid model config ({e})") from None


def read_weights_header(path: Path) -> tuple[dict[str, tuple[str, tuple[int, ...]]], dict[str, str]]:
    """{name: (dtype, shape)} and the metadata of a safetensors file, read from its header alone, with every
    offset checked against the file size: a truncated or foreign file is found before a byte of it is loaded."""
    size = path.stat().st_size
    damaged = f"{path} is damaged ({size} bytes"
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{damaged}, too short for a safetensors file); save the checkpoint again")
        n = int.from_bytes(prefix, "little")
        if n > min(size - 8, MAX_HEADER_BYTES):
            raise CheckpointError(f"{damaged}, its header claims {n} bytes: truncated or not a safetensors file); save the checkpoint again")
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            header = None
    if not isinstance(header, dict):
        raise CheckpointError(f"{damaged}, its header is not a JSON object: not a safetensors file); save the checkpoint again")
    metadata = header.pop("__metadata__", None) or {}
    tensors, end = {}, 0
    for name, info in header.items():
        try:
            dtype, shape, (begin, stop) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
            valid = all(isinstance(d, int) and d >= 0 for d in (*shape, begin, stop)) and begin <= stop
        except (KeyError, TypeError, ValueError):
            valid = False
        if not valid or not isinstance(metadata, dict):
            raise CheckpointError(f"{damaged}, entry {name!r} of its header is malformed); save the checkpoint again")
        if dtype not in WEIGHT_DTYPES:
            raise CheckpointError(f"{path}: tensor {name} has dtype {dtype}; weights must be one of {sorted(WEIGHT_DTYPES)}")
        if stop - begin != math.prod(shape) * WEIGHT_DTYPES[dtype]:
            raise CheckpointError(f"{damaged}, tensor {name}'s data does not match its shape {list(shape)}); save the checkpoint again")
        tensors[name], end = (dtype, shape), max(end, stop)
    if 8 + n + end > size:
        raise CheckpointError(f"{damaged}, the header needs {8 + n + end}: truncated); save the checkpoint again")
    return tensors, metadata


def _layer_count(names) -> int:
    return len({m.group(1) for name in names if (m := re.match(r"layers\.(\d+)\.", name))})


def _check_weights_match_config(
    directory: Path, config: ModelConfig, model: LilLM, header: Mapping[str, tuple[str, tuple[int, ...]]]
) -> dict[str, list[str]]:
    """Every tensor the config implies is in the file with its shape, and nothing else is. Returns the tied
    groups: {name in the file: every parameter name sharing it} (a tied embedding/head is stored once)."""
    where = f"checkpoint {directory}: {WEIGHTS_FILE} does not match {CONFIG_FILE}"
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    shapes = dict(model.state_dict(keep_vars=True).items())
    stored: dict[str, list[str]] = {}
    missing = []
    for names in groups.values():
        present = [n for n in names if n in header]
        if present:
            stored[present[0]] = names
        else:
            missing.append(names[0])
    extra = sorted(set(header) - {n for names in groups.values() for n in names})
    if missing or extra:
        details = ", ".join(
            part for part in (f"missing {missing[:3]}" if missing else "", f"unexpected {extra[:3]}" if extra else "") if part
        )
        raise CheckpointError(f"{where}: the config needs {len(groups)} tensors, the file holds {len(header)} ({details}); "
                              "the two files come from different models")
    for name, names in stored.items():
        for other in names:
            if other in header and header[other][1] != tuple(shapes[other].shape):
                raise CheckpointError(f"{where}: {other} is {list(header[other][1])} in the file but "
                                      f"{list(shapes[other].shape)} by the config; the two files come from different models")
    return stored


def load_checkpoint(directory: str | os.PathLike, device: str | torch.device = "cpu") -> Checkpoint:
    """Model (in eval mode, on device), tokenizer, config and meta from a checkpoint folder: the one strict
    load path every script uses.

    Everything is checked before memory is spent: config.json's types, the tokenizer against the config's
    vocabulary and against the hash the weights were saved with, and config.json against the safetensors header
    (layer count, names, shapes, file size). The model is then built on the meta device (no allocation) and
    the loaded tensors are assigned to it, so a config that claims a huge model never allocates anything."""
    from lillm.tokenizer import load_tokenizer

    directory = resolve(directory)
    config = load_config(directory)
    meta = load_meta(directory)
    tokenizer_path = _require(directory, TOKENIZER_FILE)
    try:
        tokenizer = load_tokenizer(tokenizer_path)
    except ValueError as e:
        raise CheckpointError(f"checkpoint {directory}: {_one_line(e)}") from None
    if tokenizer.get_vocab_size() > config.vocab_size:
        raise CheckpointError(
            f"checkpoint {directory}: tokenizer has {tokenizer.get_vocab_size()} tokens but the model's "
            f"vocab_size is {config.vocab_size}"
        )
    weights_path = _require(directory, WEIGHTS_FILE)
    header, metadata = read_weights_header(weights_path)
    trained_with = metadata.get(TOKENIZER_HASH_KEY)
    if trained_with is not None and trained_with != file_sha256(tokenizer_path):
        raise CheckpointError(f"checkpoint {directory}: {TOKENIZER_FILE} is not the tokenizer these weights were trained "
                              "with (SHA-256 differs); restore the original tokenizer.json")
    if _layer_count(header) != config.n_layers:  # before building even on meta: n_layers could be a billion
        raise CheckpointError(f"checkpoint {directory}: {CONFIG_FILE} says n_layers {config.n_layers} but "
                              f"{WEIGHTS_FILE} holds {_layer_count(header)} layers; the two files come from different models")
    with torch.device("meta"):
        model = LilLM(config)
    stored = _check_weights_match_config(directory, config, model, header)

    try:
        tensors = load_file(weights_path, device="cpu")
    except Exception as e:  # safetensors raises several types for a corrupt file
        raise CheckpointError(f"checkpoint {directory}: cannot read {WEIGHTS_FILE} ({_one_line(e)})") from None
    state = {other: tensors[name].float() for name, names in stored.items() for other in names}
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_embeddings:  # assign replaced the shared Parameter with two; share it again
        model.lm_head.weight = model.embed_tokens.weight
    if model.rotary is not None:  # a non-saved buffer: computed, not loaded, so still on meta
        model.rotary = RotaryEmbedding(config.head_dim, config.rope_theta)
    return Checkpoint(model.to(device).eval(), tokenizer, config, meta, directory)


def load_meta(directory: str | os.PathLike) -> dict:
    """meta.json ({} when absent), with the fields the scripts read checked for their types."""
    directory = resolve(directory)
    path = directory / META_FILE
    if not path.is_file():
        return {}
    meta = _read_json_object(path)
    for key, kinds in (("stage", (str,)), ("system_prompt", (str, type(None))), ("step", (int,))):
        if key in meta and (not isinstance(meta[key], kinds) or isinstance(meta[key], bool)):
            raise CheckpointError(f"{path}: {key!r} has the wrong type ({type(meta[key]).__name__}); restore the file "
                                  "or save the checkpoint again")
    return meta


def check_same_tokenizer(directory: str | os.PathLike, sha256: str, source: str) -> None:
    """Refuse to continue a checkpoint with another tokenizer than its own (same ids, other meanings)."""
    path = _require(resolve(directory), TOKENIZER_FILE)
    if file_sha256(path) != sha256:
        raise CheckpointError(f"{path} is not the tokenizer of {source} (SHA-256 differs); resume with the tokenizer "
                              "the checkpoint was trained with")


# The trainer state every lillm training script saves; scripts add their own keys. A dict value is a nested schema.
TRAINER_STATE_SCHEMA: dict = {
    "step": int,
    "optimizer": {"state": dict, "param_groups": list},
    "rng": {"python": list, "python_pos": (float, type(None)), "numpy": list, "numpy_pos": int, "torch": torch.Tensor},
}


def _check_schema(value, schema: Mapping, path: Path, where: str = "") -> None:
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: {where or 'the trainer state'} must be a dict, got {type(value).__name__}; "
                              "the file is damaged or not from lillm: resume from another checkpoint or start again without --resume")
    for key, kind in schema.items():
        name = f"{where}.{key}" if where else key
        if key not in value:
            raise CheckpointError(f"{path}: {name!r} is missing; the file is damaged or was written by another script")
        if isinstance(kind, Mapping):
            _check_schema(value[key], kind, path, name)
        elif not isinstance(value[key], kind) or (kind is int and isinstance(value[key], bool)):
            expected = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
            raise CheckpointError(f"{path}: {name!r} must be {expected}, got {type(value[key]).__name__}; "
                                  "the file is damaged or was written by another script")


def load_trainer_state(directory: str | os.PathLike, schema: Mapping = TRAINER_STATE_SCHEMA) -> dict:
    """The trainer_state saved with a checkpoint (optimizer state, step, RNG...), loaded with weights_only=True
    (no code in the file can run) and checked against `schema` before anyone indexes into it."""
    path = _require(resolve(directory), STATE_FILE)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, garbage, a pickle asking for a forbidden global: many types
        raise CheckpointError(f"{path}: cannot load the trainer state ({_one_line(e, 120)}); the file is damaged: "
                              "resume from another checkpoint or start again without --resume") from None
    _check_schema(state, schema, path)
    rng = state.get("rng", {})
    if isinstance(schema.get("rng"), Mapping) and not (len(rng["python"]) == 625 and len(rng["numpy"]) == 624 and rng["torch"].dtype == torch.uint8):
        raise CheckpointError(f"{path}: the saved random-number state is malformed; the file is damaged")
    if state["step"] < 0:
        raise CheckpointError(f"{path}: step is {state['step']}; the file is damaged")
    return state


def check_optimizer_state(saved: Mapping, optimizer: torch.optim.Optimizer, path: str | os.PathLike) -> None:
    """The saved optimizer state fits this optimizer: same parameter groups and counts, and every per-parameter
    tensor (Adam's moments) the shape of its parameter. Checked here: torch only finds out mid-step."""
    groups = saved["param_groups"]
    live = [g["params"] for g in optimizer.param_groups]
    try:
        sizes = [len(g["params"]) for g in groups]
    except (TypeError, KeyError):
        sizes = None
    if sizes != [len(g) for g in live]:
        raise CheckpointError(f"{path}: the optimizer state was saved for other trainable parameters "
                              f"(groups of {sizes}, this model has {[len(g) for g in live]}); resume with the same model and LoRA flags")
    params = {pid: p for saved_group, group in zip(groups, live) for pid, p in zip(saved_group["params"], group)}
    for pid, per_param in saved["state"].items():
        if pid not in params or not isinstance(per_param, dict):
            raise CheckpointError(f"{path}: the optimizer state names parameter {pid!r}, which no group holds; the file is damaged")
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != params[pid].shape:
                raise CheckpointError(f"{path}: optimizer {key} for a {list(params[pid].shape)} parameter is "
                                      f"{list(value.shape)}; the file is damaged or from another model")


def check_out_dir(directory: str | os.PathLike, resume: bool, overwrite: bool, flag: str = "--out_dir") -> Path:
    """Before training: the folder a run will write is safe to write. A new run never replaces an existing
    checkpoint unless asked (--overwrite), and never replaces a folder that is not a checkpoint at all (a save
    swaps the whole folder out)."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"{flag} {directory} is a file, not a folder")
    previous = next((d for d in (directory, directory.with_name(directory.name + ".old")) if d.is_dir()), None)
    if resume:
        if previous is None:
            raise CheckpointError(f"checkpoint folder not found: {directory} (nothing to --resume; drop --resume to start)")
        return directory
    if previous is not None and any(previous.iterdir()):
        if not (previous / CONFIG_FILE).is_file():
            raise ValueError(f"{flag} {directory} is a folder that holds other files, not a checkpoint; a save would "
                             "replace it: choose a new folder")
        if not overwrite:
            raise ValueError(f"{flag} {directory} already holds a checkpoint; pass --resume to continue it or "
                             "--overwrite to replace it")
    return directory


def load_lora_adapters(model: torch.nn.Module, saved, path: str | os.PathLike) -> None:
    """Put LoRA adapters saved in a trainer state into `model` (already wrapped with the same rank and targets),
    refusing a missing, extra or misshapen adapter: load_state_dict(strict=False) alone would leave a missing
    one at its initial value without a word."""
    from lillm.lora import lora_state_dict

    expected = lora_state_dict(model)
    if not isinstance(saved, dict):
        raise CheckpointError(f"{path}: 'lora' must be a dict of adapter tensors, got {type(saved).__name__}; the file is damaged")
    wrong = sorted(set(expected) ^ set(saved)) or [
        name for name, t in expected.items() if not isinstance(saved[name], torch.Tensor) or saved[name].shape != t.shape
    ]
    if wrong:
        raise CheckpointError(f"{path}: the saved LoRA adapters do not fit this model ({wrong[:3]}); "
                              "resume with the same LoRA flags (--lora_rank, --lora_targets, ...)")
    model.load_state_dict(saved, strict=False)  # strict=False: only the adapters, checked above
