"""Evaluation: multiple-choice log-likelihood scoring, bits per byte, and a fixed set of sample generations.

Multiple choice is scored the way lm-eval-harness does it. An item is a context and some choices; the model
reads context + choice and we add up the log-probabilities of the choice's tokens only. The highest sum is
the model's answer (`acc`). A sum of log-probs favours short choices, since every extra token costs
probability, so `acc_norm` divides each sum by the choice's length in UTF-8 bytes first. Bytes are used
because they do not depend on the tokenizer, which makes the score comparable across models.

    ARC        "Question: <question>\\nAnswer:"  then  " <choice>"
    HellaSwag  "<context>"                      then  " <ending>"

The context is encoded once per item, and each choice is encoded on its own (with its leading space).
The context also goes through the model only once: its keys and values are cached, and the choices of many
items, sorted by length, continue from copies of their context's cache rows in right-padded batches. If context + choice is longer than the model's window,
the context is cut from the left, as lm-eval-harness does, and those items are scored as whole windows.

Bits per byte is the validation loss in a unit that does not depend on the tokenizer: total nats over
the text / ln 2 / the text's UTF-8 bytes. Tiny models score near chance on multiple choice long before
they stop improving, and bits/byte still tells them apart.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lillm.corpus import read_txt
from lillm.data import file_sha256
from lillm.fileio import utf8_lines
from lillm.model import KVCache
from lillm.tokenizer import encode_ordinary, special_tokens

# ---------------------------------------------------------------------------------------------- tasks and items


@dataclass(frozen=True)
class Task:
    name: str
    file: str  # in the data folder (../shared/data), one JSON item per line
    field: str  # "context" (completion style) or "question" (QA style)

    def context(self, record: dict) -> str:
        if self.field == "question":
            return f"Question: {record['question']}\nAnswer:"
        return record["context"]


TASKS = {
    "hellaswag": Task("hellaswag", "eval_hellaswag_val.jsonl", "context"),
    "arc_easy": Task("arc_easy", "eval_arc_easy_test.jsonl", "question"),
    "arc_challenge": Task("arc_challenge", "eval_arc_challenge_test.jsonl", "question"),
}


@dataclass(frozen=True)
class Item:
    """One multiple-choice question: the context the model reads, the choices as written (no leading space)."""

    id: str
    context: str
    choices: tuple[str, ...]
    label: int  # index of the right choice


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[name]


def load_items(task: Task, path: str | os.PathLike, limit: int | None = None) -> list[Item]:
    """The first `limit` items (all if None) of a task file, checked line by line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{task.name} data not found: {path} (pass --data_dir with {task.file})")
    items: list[Item] = []
    lines = utf8_lines(path) if limit != 0 else iter(())  # --limit 0 reads nothing and is refused below
    for line_no, line in lines:
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            choices = tuple(record["choices"])
            item = Item(str(record["id"]), task.context(record), choices, int(record["label"]))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}:{line_no}: not a {task.name} item ({type(e).__name__}: {e})") from None
        if len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            raise ValueError(f"{path}:{line_no}: an item needs at least 2 non-empty string choices")
        if not 0 <= item.label < len(choices):
            raise ValueError(f"{path}:{line_no}: label {item.label} is not a choice index (0..{len(choices) - 1})")
        items.append(item)
        if len(items) == limit:  # stop here: lines past the limit are never read
            break
    if not items:
        raise ValueError(f"{path}: no items to evaluate (empty file or --limit 0)")
    return items


@dataclass(frozen=True)
class EncodedItem:
    context: list[int]
    choices: list[list[int]]


def encode_item(tokenizer, item: Item) -> EncodedItem:
    """Token ids of the context (once) and of each " " + choice. An empty context becomes <|endoftext|>, so the
    first choice token is still predicted from something."""
    context = encode_ordinary(tokenizer, item.context) or [special_tokens(tokenizer).eos]
    return EncodedItem(context, [encode_ordinary(tokenizer, " " + choice) for choice in item.choices])


def fit_window(context: Sequence[int], choice: Sequence[int], max_seq_len: int) -> tuple[list[int], int]:
    """The last max_seq_len + 1 tokens of context + choice (the model reads all but the last one), and how many
    of the final tokens are scored: the choice's, or all but the first if the choice alone is too long."""
    sequence = (list(context) + list(choice))[-(max_seq_len + 1):]
    return sequence, min(len(choice), len(sequence) - 1)


# ---------------------------------------------------------------------------------------------- scoring


def _batches(items: Sequence[EncodedItem], batch_size: int):
    """Consecutive runs of items holding about batch_size choices each; an item is never split."""
    run: list[int] = []
    rows = 0
    for i, item in enumerate(items):
        if run and rows + len(item.choices) > batch_size:
            yield run
            run, rows = [], 0
        run.append(i)
        rows += len(item.choices)
    if run:
        yield run


def fits_window(item: EncodedItem, max_seq_len: int) -> bool:
    """Whether every choice follows the whole context inside the model's window (no truncation needed)."""
    return len(item.context) + max(len(choice) for choice in item.choices) <= max_seq_len + 1


def _sum_by_row(n_rows: int, row_idx: list[int], logits: torch.Tensor, targets: list[int], device) -> torch.Tensor:
    """Per row, the sum of log_softmax(logits)[target] over that row's entries (float64: long choices add up
    hundreds of terms). Only the scored positions ever go through log_softmax."""
    rows = torch.tensor(row_idx, dtype=torch.long, device=device)
    picked = F.log_softmax(logits.float(), dim=-1).gather(1, torch.tensor(targets, device=device)[:, None])[:, 0]
    return torch.zeros(n_rows, dtype=torch.float64, device=device).index_add_(0, rows, picked.double())


def _score_windows(model: torch.nn.Module, items: Sequence[EncodedItem]) -> list[float]:
    """Every choice of the items as its own window (context truncated from the left), right-padded into one
    batch. Causal attention: no position sees the padding after it, so no mask is needed."""
    device = next(model.parameters()).device
    rows = [fit_window(item.context, choice, model.config.max_seq_len) for item in items for choice in item.choices]
    width = max(len(seq) for seq, _ in rows) - 1
    inputs = torch.tensor([seq[:-1] + [seq[-1]] * (width - len(seq) + 1) for seq, _ in rows], device=device)
    logits, _ = model(inputs)
    # Row r's last n targets are predicted at input positions len-1-n .. len-2.
    row_idx = [r for r, (_, n) in enumerate(rows) for _ in range(n)]
    pos_idx = [len(seq) - 1 - n + j for seq, n in rows for j in range(n)]
    targets = [t for seq, n in rows for t in seq[len(seq) - n :]]
    return _sum_by_row(len(rows), row_idx, logits[row_idx, pos_idx], targets, device).tolist()


def _context_caches(model: torch.nn.Module, items: Sequence[EncodedItem], batch_size: int):
    """The contexts' keys and values in one cache, right-aligned: every context ends at the same position, so
    any of its rows can be continued side by side. Contexts run batch_size at a time (the items come sorted by
    context length); a shorter batch starts later in the cache, and the empty, masked slots before it are never
    computed. Returns the cache, which of its slots are real, and log p(next token) after each context."""
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    n_ctx = max(len(item.context) for item in items)
    cache = KVCache(model.config, len(items), n_ctx, device=device, dtype=dtype)
    is_real = torch.tensor([[False] * (n_ctx - len(it.context)) + [True] * len(it.context) for it in items], device=device)
    next_token = []
    for start in range(0, len(items), batch_size):
        batch = items[start : start + batch_size]
        width = max(len(item.context) for item in batch)
        part = KVCache(model.config, len(batch), n_ctx, device=device, dtype=dtype)
        part.advance(n_ctx - width)  # the slots before this batch's longest context stay empty
        inputs = torch.tensor([[it.context[0]] * (width - len(it.context)) + it.context for it in batch], device=device)
        logits, _ = model(inputs, cache=part, attention_mask=is_real[start : start + len(batch)], last_only=True)
        cache.keys[:, start : start + len(batch)], cache.values[:, start : start + len(batch)] = part.keys, part.values
        next_token.append(F.log_softmax(logits[:, -1].float(), dim=-1))
    cache.advance(n_ctx)
    return cache, is_real, torch.cat(next_token)


def _score_shared_context(model: torch.nn.Module, items: Sequence[EncodedItem], batch_size: int) -> list[float]:
    """Items that fit the window: their contexts run through the model once (`_context_caches`); then all their
    choices, sorted by length so that little of each batch is padding, continue from copies of their context's
    cache rows, batch_size choices per forward pass."""
    device = next(model.parameters()).device
    cache, is_real, next_token = _context_caches(model, items, batch_size)

    choices = [(i, choice) for i, item in enumerate(items) for choice in item.choices]
    sums = [0.0] * len(choices)
    order = sorted(range(len(choices)), key=lambda r: len(choices[r][1]))
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        batch = [choices[r][1] for r in rows]
        owner = torch.tensor([choices[r][0] for r in rows], device=device)
        first = next_token[owner, torch.tensor([c[0] for c in batch], device=device)].double()
        width = max(len(c) for c in batch) - 1  # a choice's last token is a target, never an input
        if width == 0:  # every choice here is a single token
            scores = first
        else:
            rows_cache = cache.rows(owner, extra_positions=width)
            inputs = torch.tensor([c[:-1] + [c[0]] * (width - len(c) + 1) for c in batch], device=device)
            mask = torch.cat([is_real[owner], torch.ones(len(batch), width, dtype=torch.bool, device=device)], dim=1)
            scored = torch.tensor([[j < len(c) - 1 for j in range(width)] for c in batch], device=device)
            logits, _ = model(inputs, cache=rows_cache, attention_mask=mask, logits_at=scored)  # the head skips padding
            row_idx = [b for b, c in enumerate(batch) for _ in range(len(c) - 1)]
            targets = [t for c in batch for t in c[1:]]
            scores = first + _sum_by_row(len(batch), row_idx, logits, targets, device)
        for r, score in zip(rows, scores.tolist()):
            sums[r] = score
    return sums


@torch.no_grad()
def choice_logprobs(
    model: torch.nn.Module, items: Sequence[EncodedItem], batch_size: int = 32, desc: str | None = None
) -> list[list[float]]:
    """For each item, the summed log-probability of each choice's tokens given the context.

    Items that fit the model's window share one pass over their context (KV cache), 4 * batch_size items at a
    time: batch_size contexts per pass, then batch_size of their choices per pass. The others are scored as
    left-truncated windows, batches of about batch_size choices. `model` is a LilLM (or anything with its forward signature, KV cache included, and
    `config`). desc: show a progress bar with that label."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    max_seq_len = model.config.max_seq_len
    scores: list[list[float]] = [[] for _ in items]
    bar = tqdm(total=len(items), desc=desc, unit=" items", disable=desc is None, dynamic_ncols=True)
    for shared in (True, False):
        group = [i for i, item in enumerate(items) if fits_window(item, max_seq_len) == shared]
        # Similar lengths batch together, so little of each batch is padding.
        group.sort(key=lambda i: (len(items[i].context), max(map(len, items[i].choices))))
        if shared:  # the choices of 4 * batch_size items at a time: many choices batch into similar lengths
            n = 4 * batch_size
            runs = [list(range(s, min(s + n, len(group)))) for s in range(0, len(group), n)]
        else:  # about batch_size windows at a time
            runs = list(_batches([items[i] for i in group], batch_size))
        for run in runs:
            batch = [items[group[j]] for j in run]
            sums = _score_shared_context(model, batch, batch_size) if shared else _score_windows(model, batch)
            for j, item in zip(run, batch):
                scores[group[j]], sums = sums[: len(item.choices)], sums[len(item.choices) :]
            bar.update(len(run))
    bar.close()
    return scores


def mc_metrics(items: Sequence[Item], scores: Sequence[Sequence[float]]) -> dict:
    """acc (argmax of the summed log-probs), acc_norm (argmax of log-prob per UTF-8 byte of the choice), the
    item count, and chance: the expected accuracy of guessing (mean of 1 / number of choices)."""
    correct = correct_norm = 0
    for item, choice_scores in zip(items, scores, strict=True):
        per_byte = [s / len(c.encode("utf-8")) for s, c in zip(choice_scores, item.choices, strict=True)]
        correct += int(np.argmax(choice_scores)) == item.label
        correct_norm += int(np.argmax(per_byte)) == item.label
    n = len(items)
    return {"acc": correct / n, "acc_norm": correct_norm / n, "n": n, "chance": sum(1 / len(i.choices) for i in items) / n}


def evaluate_task(
    model: torch.nn.Module, tokenizer, task: Task, items: Sequence[Item], batch_size: int = 32, progress: bool = False
) -> dict:
    """mc_metrics of the model on the items of one task."""
    encoded = [encode_item(tokenizer, item) for item in items]
    scores = choice_logprobs(model, encoded, batch_size, desc=task.name if progress else None)
    return mc_metrics(items, scores)


# ---------------------------------------------------------------------------------------------- bits per byte


@dataclass(frozen=True)
class BitsPerByte:
    bits_per_byte: float
    tokens: int  # predicted tokens
    bytes: float  # UTF-8 bytes of text they encode (an estimate from meta.json's ratio for a shard)
    file: str


def text_token_stream(tokenizer, path: Path, max_tokens: int | None = None) -> tuple[list[int], int]:
    """<|endoftext|> doc1 <|endoftext|> doc2 <|endoftext|> ... for a text file of documents separated by blank
    lines (the layout of the shards), and the documents' UTF-8 bytes. With max_tokens, whole documents are
    taken until about that many tokens, so the byte count stays exact."""
    eos = special_tokens(tokenizer).eos
    ids, n_bytes = [eos], 0
    for doc in read_txt(path):
        if max_tokens is not None and len(ids) > max_tokens:
            break
        ids += encode_ordinary(tokenizer, doc) + [eos]
        n_bytes += len(doc.encode("utf-8"))
    if n_bytes == 0:
        raise ValueError(f"{path}: no text to measure bits/byte on")
    return ids, n_bytes


def shard_token_stream(path: Path, tokenizer_sha256: str | None = None) -> tuple[np.ndarray, float]:
    """A token shard (lillm.data format) and its UTF-8 bytes per token, from the meta.json beside it."""
    meta_path = path.with_name("meta.json")
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path} not found: a .bin shard needs the meta.json written with it")
    meta = json.loads(meta_path.read_text())
    name = path.stem  # train or val
    if f"{name}_bytes" not in meta or f"{name}_tokens" not in meta:
        raise ValueError(f"{meta_path} has no {name}_bytes / {name}_tokens counts for {path.name}")
    if tokenizer_sha256 is not None and meta.get("tokenizer_sha256") != tokenizer_sha256:
        raise ValueError(f"{path} was made with a different tokenizer than the model's (tokenizer_sha256 differs)")
    ids = np.memmap(path, dtype=np.dtype(meta["dtype"]), mode="r")
    return ids, meta[f"{name}_bytes"] / meta[f"{name}_tokens"]


@torch.no_grad()
def stream_nats(model: torch.nn.Module, ids: Sequence[int], batch_size: int = 8, desc: str | None = None) -> float:
    """Total cross-entropy (nats) of ids[1:] given what precedes each token, in windows of max_seq_len
    predictions (each window starts over: no context crosses a window edge)."""
    device = next(model.parameters()).device
    T = model.config.max_seq_len
    starts = range(0, len(ids) - 1, T)
    full = [s for s in starts if s + T + 1 <= len(ids)]
    chunks = [full[b : b + batch_size] for b in range(0, len(full), batch_size)]
    chunks += [[s] for s in starts if s + T + 1 > len(ids)]  # the last, shorter window goes alone
    total = 0.0
    for chunk in tqdm(chunks, desc=desc, unit=" batches", disable=desc is None, dynamic_ncols=True):
        window = torch.from_numpy(np.stack([np.asarray(ids[s : s + T + 1], dtype=np.int64) for s in chunk])).to(device)
        logits, _ = model(window[:, :-1])
        total += F.cross_entropy(logits.float().flatten(0, 1), window[:, 1:].flatten(), reduction="sum").item()
    return total


def bits_per_byte(
    model: torch.nn.Module,
    tokenizer,
    path: str | os.PathLike,
    batch_size: int = 8,
    max_tokens: int | None = None,
    tokenizer_sha256: str | None = None,
    progress: bool = False,
) -> BitsPerByte:
    """Validation bits/byte on a text file (documents separated by blank lines) or a .bin token shard.
    tokenizer_sha256: refuse a shard made with another tokenizer (its meta.json records the hash)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"bits/byte file not found: {path}")
    if path.suffix == ".bin":
        ids, bytes_per_token = shard_token_stream(path, tokenizer_sha256)
        if max_tokens is not None:
            ids = ids[: max_tokens + 1]
        if len(ids) < 2:
            raise ValueError(f"{path}: fewer than 2 tokens, nothing to predict")
        n_bytes = (len(ids) - 1) * bytes_per_token
    else:
        ids, n_bytes = text_token_stream(tokenizer, path, max_tokens)
    nats = stream_nats(model, ids, batch_size, desc=f"bits/byte {path.name}" if progress else None)
    return BitsPerByte(nats / math.log(2) / n_bytes, len(ids) - 1, n_bytes, str(path))


def tokenizer_sha256(checkpoint_dir: str | os.PathLike) -> str:
    return file_sha256(Path(checkpoint_dir) / "tokenizer.json")


# ---------------------------------------------------------------------------------------------- samples

STORY_PROMPTS = (
    "Once upon a time",
    "One day, a little girl named Lily",
    "Tom had a big red ball.",
    "The dog was hungry, so",
    "In a small house by the sea,",
)
CHAT_PROMPTS = (
    "Can you tell me a short story about a cat?",
    "What is the capital of France?",
    "How do I make a cup of tea?",
    "Give me three tips for sleeping better.",
    "Why is the sky blue?",
)


def is_chat_model(meta: dict) -> bool:
    """Base (pretrained) checkpoints continue text; everything fine-tuned or imported as an instruct model chats."""
    return meta.get("stage") != "base"


def sample_generations(model, tokenizer, meta: dict, max_new_tokens: int = 64) -> list[dict]:
    """Greedy replies to the fixed chat prompts (chat models) or continuations of the story prompts (base)."""
    from lillm.generate import SamplingConfig, chat_reply, checkpoint_system_prompt, generate_ids, stream_text

    cfg = SamplingConfig(temperature=0.0, max_new_tokens=max_new_tokens).with_stops(tokenizer)
    samples = []
    if is_chat_model(meta):
        system = checkpoint_system_prompt(meta) or None
        for prompt in CHAT_PROMPTS:
            reply = "".join(chat_reply(model, tokenizer, [{"role": "user", "content": prompt}], cfg, system))
            samples.append({"kind": "chat", "prompt": prompt, "output": reply.strip()})
    else:
        eos = special_tokens(tokenizer).eos
        for prompt in STORY_PROMPTS:
            ids = generate_ids(model, [eos, *encode_ordinary(tokenizer, prompt)], cfg)
            samples.append({"kind": "story", "prompt": prompt, "output": "".join(stream_text(tokenizer, ids))})
    return samples
