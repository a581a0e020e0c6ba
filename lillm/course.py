"""What the chapter notebooks share that is not their lesson: notebook set-up, a quiet training run on a tensor
of tokens, and the course's artifacts, one model carried from text to chat.

    chapter 01 trains the tokenizer      -> chapters/artifacts/tokenizer.json
    chapter 07 makes shards, pretrains   -> chapters/artifacts/shards/, chapters/artifacts/base/
    chapter 09 fine-tunes that model     -> chapters/artifacts/sft/
    chapter 10 chats with it

Each artifact is rebuilt here, by the same recipe the chapter runs, whenever it is missing or was made from a
different parent (its meta.json records the recipe and its parent's SHA-256), so every notebook still runs top
to bottom on its own. chapters/artifacts/ is not versioned; $LILLM_ARTIFACTS_DIR (a folder inside the repository) moves it.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from lillm.paths import REPO_ROOT, default_data_file

ARTIFACTS = Path(os.environ.get("LILLM_ARTIFACTS_DIR", REPO_ROOT / "chapters" / "artifacts"))  # inside the repo
TOKENIZER = ARTIFACTS / "tokenizer.json"
SHARDS = ARTIFACTS / "shards"
BASE = ARTIFACTS / "base"
SFT = ARTIFACTS / "sft"

# The recipes. Small enough that the whole chain (tokenizer, shards, pretraining, SFT) rebuilds in about a
# minute on one CPU thread, which is what lets chapter 10 run alone.
TOKENIZER_RECIPE = {"train_chars": 1_000_000, "vocab_size": 1024}
SHARDS_RECIPE = {"train_chars": 1_500_000, "val_chars": 150_000}
BASE_RECIPE = {
    "model": {"vocab_size": 1024, "dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 256},
    "init_seed": 0, "data_seed": 1337, "batch_size": 8, "max_steps": 240, "lr": 3e-3, "min_lr": 3e-4,
    "warmup_steps": 20, "weight_decay": 0.1, "grad_clip": 1.0, "eval_interval": 30, "eval_batches": 4,
}
SFT_RECIPE = {
    "train_conversations": 6000, "val_conversations": 300, "data_seed": 0, "batch_size": 8, "max_steps": 250,
    "lr": 2e-3, "min_lr": 2e-4, "warmup_steps": 20, "weight_decay": 0.0, "grad_clip": 1.0, "eval_interval": 50,
}


def setup(seed: int = 0, threads: int = 1) -> None:
    """The first cell of every chapter: one CPU thread (these models are tiny, and on a shared 2-core machine
    two threads per process thrash), a fixed seed, figure defaults, no tqdm widget warning."""
    import matplotlib.pyplot as plt

    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    plt.rcParams.update({"figure.dpi": 80, "figure.figsize": (6.5, 3.5)})
    warnings.filterwarnings("ignore", message="IProgress not found")


def byte_tokens(name: str, n_bytes: int) -> torch.Tensor:
    """The first n_bytes of a default data file as a 1-D int64 tensor of byte values (vocabulary 256)."""
    with open(default_data_file(name), "rb") as f:
        return torch.frombuffer(bytearray(f.read(n_bytes)), dtype=torch.uint8).long()


class _History:
    """A logger for lillm.train.fit that keeps every row in memory and writes nothing."""

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def log(self, step: int, **metrics: float) -> None:
        self.rows.append({"step": step, **metrics})


def _fit_quietly(model, cfg, get_batch, evaluate: Callable[[], dict] = dict) -> list[dict]:
    """lillm.train.fit on one CPU process, fp32, without progress bar or files; returns the logged rows."""
    from lillm import train

    history = _History()
    with contextlib.redirect_stderr(io.StringIO()):
        train.fit(model, train.DistInfo(0, 0, 1, torch.device("cpu")), cfg, get_batch, evaluate,
                  save=lambda *_: None, logger=history, dtype=torch.float32)
    return history.rows


def train_on_windows(
    model, tokens: torch.Tensor, steps: int, batch_size: int, seq_len: int, lr: float, seed: int, warmup_steps: int = 20
) -> list[float]:
    """Train on random windows of an in-memory token tensor with lillm.train.fit (AdamW, warm-up, cosine decay
    to lr/10, no weight decay, gradients clipped at 1); the batches depend on `seed` only. Returns the training
    loss of every step."""
    from lillm.data import random_windows
    from lillm.train import TrainConfig

    generator = torch.Generator().manual_seed(seed)
    cfg = TrainConfig(max_steps=steps, lr=lr, min_lr=lr / 10, warmup_steps=warmup_steps, weight_decay=0.0,
                      grad_clip=1.0, grad_accum=1, eval_interval=steps, ckpt_interval=steps, log_interval=1)
    rows = _fit_quietly(model, cfg, lambda step, micro: random_windows(tokens, batch_size, seq_len, generator))
    return [r["train_loss"] for r in rows if "train_loss" in r]


# ---------------------------------------------------------------------------------------------- artifacts


def _sha256(path: Path) -> str:
    from lillm.data import file_sha256

    return file_sha256(path)


def _is_current(meta_path: Path, recipe: dict) -> bool:
    try:
        return json.loads(meta_path.read_text()).get("recipe") == recipe
    except (OSError, json.JSONDecodeError):
        return False


def train_tokenizer():
    """Chapter 01's tokenizer: lillm's BPETokenizer on the first TOKENIZER_RECIPE["train_chars"] characters of
    TinyStories train."""
    from lillm.corpus import split_documents, text_slice
    from lillm.tokenizer import BPETokenizer

    docs = split_documents(text_slice(default_data_file("pretrain_tinystories_train.txt"), TOKENIZER_RECIPE["train_chars"]))
    tokenizer = BPETokenizer()
    tokenizer.train(docs, TOKENIZER_RECIPE["vocab_size"])
    return tokenizer


def tokenizer_path(rebuild: bool = False) -> Path:
    """chapters/artifacts/tokenizer.json, trained by train_tokenizer() if missing (about a second)."""
    if rebuild or not TOKENIZER.is_file():
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        train_tokenizer().export_hf(TOKENIZER)  # written atomically
    return TOKENIZER


def shards_dir(rebuild: bool = False) -> Path:
    """Chapter 07's token shards of TinyStories, encoded with the course tokenizer."""
    from lillm.corpus import split_documents, text_slice
    from lillm.data import META_FILE, build_shards

    recipe = {**SHARDS_RECIPE, "tokenizer_sha256": _sha256(tokenizer_path())}
    meta_path = SHARDS / META_FILE
    if rebuild or not (meta_path.is_file() and json.loads(meta_path.read_text()).get("tokenizer_sha256") == recipe["tokenizer_sha256"]
                       and _is_current(SHARDS / "recipe.json", recipe)):
        train = split_documents(text_slice(default_data_file("pretrain_tinystories_train.txt"), SHARDS_RECIPE["train_chars"]))
        val = split_documents(text_slice(default_data_file("pretrain_tinystories_val.txt"), SHARDS_RECIPE["val_chars"]))
        build_shards(train, TOKENIZER, SHARDS, val_docs=val, sources=["TinyStories train", "TinyStories val"], progress=False)
        (SHARDS / "recipe.json").write_text(json.dumps({"recipe": recipe}, indent=2) + "\n")
    return SHARDS


def pretrain_base(rebuild: bool = False) -> Path:
    """Chapter 07's base model: BASE_RECIPE run with lillm.train.fit on the course shards (about 25 s on one
    thread), saved with its loss history in meta.json. Reused when it exists and was made from these shards."""
    from lillm import checkpoint, data, train
    from lillm.model import LilLM, ModelConfig

    shards = data.open_shards(shards_dir(), BASE_RECIPE["model"]["max_seq_len"])
    recipe = {**BASE_RECIPE, "shards": SHARDS_RECIPE, "tokenizer_sha256": shards.meta["tokenizer_sha256"]}
    if not rebuild and _is_current(BASE / checkpoint.META_FILE, recipe):
        return BASE
    r, seq = BASE_RECIPE, BASE_RECIPE["model"]["max_seq_len"]
    torch.manual_seed(r["init_seed"])
    model = LilLM(ModelConfig(**r["model"]))
    cfg = train.TrainConfig(max_steps=r["max_steps"], lr=r["lr"], min_lr=r["min_lr"], warmup_steps=r["warmup_steps"],
                            weight_decay=r["weight_decay"], grad_clip=r["grad_clip"], grad_accum=1,
                            eval_interval=r["eval_interval"], ckpt_interval=r["max_steps"], log_interval=1)

    def evaluate() -> dict:
        losses = [model(*data.sample_batch(shards.val, r["batch_size"], seq, seed=0, step=i))[1].item()
                  for i in range(r["eval_batches"])]
        return {"val_loss": float(np.mean(losses))}

    model.eval()
    with torch.no_grad():
        first = evaluate()["val_loss"]
    rows = _fit_quietly(model, cfg, lambda step, micro: data.sample_batch(shards.train, r["batch_size"], seq, r["data_seed"], step), evaluate)
    history = {
        "step": [row["step"] for row in rows if "train_loss" in row],
        "train_loss": [row["train_loss"] for row in rows if "train_loss" in row],
        "val_step": [0] + [row["step"] for row in rows if "val_loss" in row],
        "val_loss": [first] + [row["val_loss"] for row in rows if "val_loss" in row],
    }
    val_bpb = history["val_loss"][-1] / math.log(2) / shards.val_bytes_per_token
    meta = {"stage": "base", "step": r["max_steps"], "val_bpb": val_bpb, "history": history, "recipe": recipe}
    checkpoint.save_checkpoint(BASE, model, shards.tokenizer_path, meta=meta)
    return BASE


def _held_out_loss(model, dataset, batch_size: int = 32) -> float:
    """Mean assistant-token loss of a rendered dataset (every counted token weighs the same)."""
    from lillm.sft_data import collate

    total = count = 0.0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(dataset.ids), batch_size):
            inputs, targets, mask = collate(dataset.ids[start : start + batch_size], dataset.masks[start : start + batch_size], dataset.pad_id)
            _, loss = model(inputs, targets, loss_mask=mask)
            total += loss.item() * mask.sum().item()
            count += mask.sum().item()
    return total / count


def finetune_sft(rebuild: bool = False) -> Path:
    """Chapter 09's chat model: the base model fine-tuned on every weight with the assistant-only loss (SFT_RECIPE)
    on the first conversations of chat_train.jsonl that fit its context, evaluated on chat_val.jsonl before and
    after; saved with the default system prompt and its loss history."""
    from lillm import checkpoint, train
    from lillm.chat import DEFAULT_SYSTEM_PROMPT
    from lillm.sft_data import batch_indices, build_sft_dataset, collate, read_jsonl_conversations

    base_dir = pretrain_base()
    recipe = {**SFT_RECIPE, "base_sha256": _sha256(base_dir / checkpoint.WEIGHTS_FILE)}
    if not rebuild and _is_current(SFT / checkpoint.META_FILE, recipe):
        return SFT
    r = SFT_RECIPE
    base = checkpoint.load_checkpoint(base_dir)
    model, tokenizer, seq = base.model, base.tokenizer, base.model.config.max_seq_len

    def dataset(name: str, limit: int):
        return build_sft_dataset(tokenizer, read_jsonl_conversations(default_data_file(name)), seq, overflow="drop",
                                 system=DEFAULT_SYSTEM_PROMPT, limit=limit)

    train_set, val_set = dataset("chat_train.jsonl", r["train_conversations"]), dataset("chat_val.jsonl", r["val_conversations"])
    cfg = train.TrainConfig(max_steps=r["max_steps"], lr=r["lr"], min_lr=r["min_lr"], warmup_steps=r["warmup_steps"],
                            weight_decay=r["weight_decay"], grad_clip=r["grad_clip"], grad_accum=1,
                            eval_interval=r["eval_interval"], ckpt_interval=r["max_steps"], log_interval=1)

    def get_batch(step: int, micro: int):
        rows = batch_indices(len(train_set), r["batch_size"], r["data_seed"], step, 0, 1)
        return collate([train_set.ids[i] for i in rows], [train_set.masks[i] for i in rows], train_set.pad_id)

    before = _held_out_loss(model, val_set)
    rows = _fit_quietly(model, cfg, get_batch, lambda: {"val_loss": _held_out_loss(model, val_set)})
    history = {
        "step": [row["step"] for row in rows if "train_loss" in row],
        "train_loss": [row["train_loss"] for row in rows if "train_loss" in row],
        "val_step": [0] + [row["step"] for row in rows if "val_loss" in row],
        "val_loss": [before] + [row["val_loss"] for row in rows if "val_loss" in row],
    }
    meta = {"stage": "sft", "step": r["max_steps"], "system_prompt": DEFAULT_SYSTEM_PROMPT, "train_data": train_set.summary(),
            "val_data": val_set.summary(), "history": history, "recipe": recipe}
    tokenizer_file = base_dir / checkpoint.TOKENIZER_FILE
    checkpoint.save_checkpoint(SFT, model, tokenizer_file, meta=meta)
    return SFT
