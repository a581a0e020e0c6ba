"""Supervised fine-tuning data: conversations -> token ids + assistant-only loss mask, batched with padding.

Every conversation goes through `lillm.chat.render`, which produces the ids and the mask in one pass. The model
reads ids[:-1] and predicts ids[1:]; the loss counts a position only where the *target* token is an assistant
token (mask[1:]), so the model learns to write replies and to end them with <|im_end|>, never to imitate users.

A conversation longer than the context is cut after its last whole assistant turn that still fits
(`overflow="truncate"`) or skipped (`overflow="drop"`); both are counted. Batches are right-padded with the
tokenizer's pad token (`special_tokens(tokenizer).pad`)
(loss mask 0, target -100) to the longest conversation in the batch. Conversations are not packed together:
with right padding and a causal mask, real tokens never see padding, so no attention mask is needed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import islice
from pathlib import Path

import numpy as np
import torch

from lillm.chat import render
from lillm.fileio import utf8_lines
from lillm.instruct import requested_word_positions
from lillm.tokenizer import special_tokens

Messages = list[Mapping[str, str]]
Source = Iterator[tuple[str, Messages]]  # (where it came from, e.g. "chat.jsonl:12", messages)


@dataclass
class SFTDataset:
    """Rendered conversations (ids and mask, one pair of arrays per conversation) and what happened on the way."""

    pad_id: int  # the tokenizer's pad token, what `collate` pads inputs with
    ids: list[np.ndarray] = field(default_factory=list)  # int32 token ids
    masks: list[np.ndarray] = field(default_factory=list)  # loss weights: 1 on assistant tokens (see word_weight)
    conversations: int = 0  # read from the source
    truncated: int = 0  # kept, cut at a turn boundary
    dropped: int = 0  # not even the first assistant reply fits the context

    def __len__(self) -> int:
        return len(self.ids)

    def summary(self) -> str:
        tokens = sum(len(i) for i in self.ids)
        assistant = sum(np.count_nonzero(m) for m in self.masks)
        return (
            f"{len(self)} conversations ({self.truncated} truncated, {self.dropped} dropped of {self.conversations} "
            f"read), {tokens:,} tokens, {assistant:,} assistant tokens ({assistant / max(1, tokens):.0%})"
        )


def read_jsonl_conversations(path: str | os.PathLike, messages_field: str = "messages") -> Source:
    """Conversations from a jsonl file, one `{"messages": [{"role", "content"}, ...]}` object per line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"chat file not found: {path}")
    for line_no, line in utf8_lines(path):
        if not line.strip():
            continue
        try:
            messages = json.loads(line)[messages_field]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path}:{line_no}: expected a JSON object with a {messages_field!r} list ({e})") from None
        yield f"{path}:{line_no}", messages


def hub_conversations(name: str, split: str, messages_field: str = "messages", config: str | None = None) -> Source:
    """Conversations from a Hugging Face chat dataset (e.g. HuggingFaceTB/smoltalk), streamed row by row so a
    large dataset is never held in memory as text."""
    from datasets import load_dataset

    for i, row in enumerate(load_dataset(name, config, split=split, streaming=True)):
        if messages_field not in row:
            raise ValueError(f"{name}[{split}] row {i}: no {messages_field!r} column (columns: {sorted(row)})")
        yield f"{name}[{split}] row {i}", row[messages_field]


def fit_conversation(
    tokenizer, messages: Messages, max_tokens: int, system: str | None = None
) -> tuple[list[int], list[int], bool] | None:
    """(ids, mask, was_truncated) of the longest run of leading whole turns that ends with an assistant reply and
    renders to at most max_tokens tokens; None when not even the first reply fits.

    Rendered length grows with the number of turns kept, so the cut is found by bisection over the assistant
    turns, re-rendering a handful of prefixes rather than all of them."""
    ids, mask = render(tokenizer, messages, system=system)
    if len(ids) <= max_tokens and messages[-1]["role"] == "assistant":
        return ids, mask, False
    ends = [i + 1 for i, m in enumerate(messages) if m["role"] == "assistant" and i + 1 < len(messages)]
    best, lo, hi = None, 0, len(ends) - 1
    while lo <= hi:
        mid = (lo + hi) // 2
        ids, mask = render(tokenizer, messages[: ends[mid]], system=system)
        if len(ids) <= max_tokens:
            best, lo = (ids, mask, True), mid + 1
        else:
            hi = mid - 1
    return best


def build_sft_dataset(
    tokenizer,
    conversations: Source,
    max_seq_len: int,
    overflow: str = "truncate",
    system: str | None = None,
    limit: int | None = None,
    word_weight: float = 1.0,
) -> SFTDataset:
    """Render up to `limit` conversations for a model with a context of max_seq_len tokens (a training sequence
    is max_seq_len inputs plus one more target, so a conversation may have max_seq_len + 1 tokens).
    overflow="drop" skips every conversation that would need cutting; "truncate" keeps its leading turns.
    word_weight: the loss weight of the reply tokens that first use each word a story instruction asked for
    (lillm.instruct.requested_word_positions); every other assistant token weighs 1."""
    if overflow not in ("truncate", "drop"):
        raise ValueError(f"overflow must be 'truncate' or 'drop', got {overflow!r}")
    data = SFTDataset(pad_id=special_tokens(tokenizer).pad)
    for where, messages in islice(conversations, limit):
        data.conversations += 1
        try:
            fitted = fit_conversation(tokenizer, messages, max_seq_len + 1, system)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        if fitted is None or (fitted[2] and overflow == "drop"):
            data.dropped += 1
            continue
        ids, mask, truncated = fitted
        weights = np.asarray(mask, dtype=np.uint8 if word_weight == 1.0 else np.float32)
        if word_weight != 1.0 and not truncated:  # a truncated conversation lost its last reply
            weights[requested_word_positions(tokenizer, messages, system)] = word_weight
        data.ids.append(np.asarray(ids, dtype=np.int32))
        data.masks.append(weights)
        data.truncated += truncated
    if not data.ids:
        raise ValueError(
            f"no usable conversations: {data.conversations} read, {data.dropped} without an assistant reply that "
            f"fits in {max_seq_len + 1} tokens"
        )
    return data


def collate(
    ids: Sequence[np.ndarray], masks: Sequence[np.ndarray], pad_id: int, train_on_inputs: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad to the longest conversation -> (inputs, targets, loss_mask), each (B, T), T = longest - 1.

    Padding: input pad_id, target -100, mask 0. With train_on_inputs every real target counts (system and user
    tokens and headers too), as in plain language modelling."""
    T = max(len(x) for x in ids) - 1
    inputs = torch.full((len(ids), T), pad_id, dtype=torch.long)
    targets = torch.full((len(ids), T), -100, dtype=torch.long)
    loss_mask = torch.zeros((len(ids), T), dtype=torch.float32)
    for row, (x, m) in enumerate(zip(ids, masks)):
        n = len(x) - 1
        inputs[row, :n] = torch.as_tensor(x[:-1], dtype=torch.long)
        targets[row, :n] = torch.as_tensor(x[1:], dtype=torch.long)
        loss_mask[row, :n] = 1.0 if train_on_inputs else torch.as_tensor(m[1:], dtype=torch.float32)
    return inputs, targets, loss_mask


def batch_indices(n: int, batch_size: int, seed: int, step: int, chunk: int, chunks_per_step: int) -> list[int]:
    """Which conversations make micro-batch `chunk` of optimizer step `step`: a walk through a fresh random
    permutation per epoch, as a pure function of its arguments (so a resumed run and N DDP ranks see exactly the
    conversations of one uninterrupted process; chunk = rank * grad_accum + micro_step)."""
    first = (step * chunks_per_step + chunk) * batch_size
    return [int(_epoch_order(n, seed, g // n)[g % n]) for g in range(first, first + batch_size)]


@lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)
