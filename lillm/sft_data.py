"""Supervised fine-tuning data: conversations -> token ids + assistant-only loss mask, batched with padding.

Every conversation goes through `lillm.chat.render`, which produces the ids and the mask in one pass. The model
reads ids[:-1] and predicts ids[1:]; the loss counts a position only where the *target* token is an assistant
token (mask[1:]), so the model learns to write replies and to end them with <|im_end|>, never to imitate users.

Conversations longer than the context are cut after the last whole user/assistant exchange that fits
(`overflow="truncate"`) or skipped (`overflow="drop"`); both are counted. Batches are right-padded with
<|pad|> (mask 0) to the longest sequence in the batch; conversations are not packed together.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from lillm.chat import render
from lillm.tokenizer import PAD_ID

Messages = list[Mapping[str, str]]


@dataclass
class SFTDataset:
    """Rendered conversations (full ids and mask, one entry per conversation) and what happened on the way."""

    ids: list[list[int]] = field(default_factory=list)
    masks: list[list[int]] = field(default_factory=list)
    conversations: int = 0  # read from the source
    truncated: int = 0
    dropped: int = 0

    def __len__(self) -> int:
        return len(self.ids)

    def summary(self) -> str:
        tokens = sum(len(i) for i in self.ids)
        assistant = sum(sum(m) for m in self.masks)
        return (
            f"{len(self)} conversations ({self.truncated} truncated, {self.dropped} dropped of {self.conversations}), "
            f"{tokens:,} tokens, {assistant:,} assistant tokens ({assistant / max(1, tokens):.0%})"
        )


def read_jsonl_conversations(path: str | os.PathLike, messages_field: str = "messages") -> Iterator[Messages]:
    """Conversations from a jsonl file, one `{"messages": [{"role", "content"}, ...]}` object per line."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"chat file not found: {path}")
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                messages = json.loads(line)[messages_field]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{line_no}: expected a JSON object with a {messages_field!r} list ({e})") from None
            if not isinstance(messages, list):
                raise ValueError(f"{path}:{line_no}: {messages_field!r} must be a list, got {type(messages).__name__}")
            yield messages


def hub_conversations(name: str, split: str, messages_field: str = "messages", config: str | None = None) -> Iterator[Messages]:
    """Conversations from a Hugging Face chat dataset (e.g. HuggingFaceTB/smoltalk), streamed."""
    from datasets import load_dataset

    for row in load_dataset(name, config, split=split, streaming=True):
        yield row[messages_field]


def fit_conversation(
    tokenizer, messages: Messages, max_tokens: int, system: str | None
) -> tuple[list[int], list[int], bool] | None:
    """(ids, mask, was_truncated) of the longest prefix of whole turns that ends with an assistant reply and
    renders to at most max_tokens tokens; None when not even the first exchange fits."""
    ids, mask = render(tokenizer, messages, system=system)
    if len(ids) <= max_tokens:
        return ids, mask, False
    for end in range(len(messages) - 1, 0, -1):
        if messages[end - 1]["role"] == "assistant":
            ids, mask = render(tokenizer, messages[:end], system=system)
            if len(ids) <= max_tokens:
                return ids, mask, True
    return None


def build_sft_dataset(
    tokenizer,
    conversations: Iterator[Messages],
    max_seq_len: int,
    overflow: str = "truncate",
    system: str | None = None,
    where: str = "conversation",
) -> SFTDataset:
    """Render every conversation; a sequence of max_seq_len model inputs needs max_seq_len + 1 tokens."""
    if overflow not in ("truncate", "drop"):
        raise ValueError(f"overflow must be 'truncate' or 'drop', got {overflow!r}")
    data = SFTDataset()
    for i, messages in enumerate(conversations, 1):
        data.conversations += 1
        try:
            if overflow == "drop":
                ids, mask = render(tokenizer, messages, system=system)
                fitted = (ids, mask, False) if len(ids) <= max_seq_len + 1 else None
            else:
                fitted = fit_conversation(tokenizer, messages, max_seq_len + 1, system)
        except ValueError as e:
            raise ValueError(f"{where} {i}: {e}") from None
        if fitted is None:
            data.dropped += 1
            continue
        ids, mask, truncated = fitted
        if sum(mask) == 0:
            raise ValueError(f"{where} {i}: has no assistant reply to learn from")
        data.ids.append(ids)
        data.masks.append(mask)
        data.truncated += truncated
    if not data.ids:
        raise ValueError(f"no usable conversations ({data.conversations} read, {data.dropped} longer than the context)")
    return data


def collate(
    ids: Sequence[list[int]], masks: Sequence[list[int]], train_on_inputs: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad to the longest conversation -> (inputs, targets, loss_mask), each (B, T), T = longest - 1.
    With train_on_inputs every real (non-padding) target counts, as in plain language modelling."""
    T = max(len(x) for x in ids) - 1
    inputs = torch.full((len(ids), T), PAD_ID, dtype=torch.long)
    targets = torch.full((len(ids), T), PAD_ID, dtype=torch.long)
    loss_mask = torch.zeros((len(ids), T), dtype=torch.float32)
    for row, (x, m) in enumerate(zip(ids, masks)):
        n = len(x) - 1
        inputs[row, :n] = torch.tensor(x[:-1])
        targets[row, :n] = torch.tensor(x[1:])
        loss_mask[row, :n] = 1.0 if train_on_inputs else torch.tensor(m[1:], dtype=torch.float32)
    return inputs, targets, loss_mask


def batch_indices(n: int, batch_size: int, seed: int, step: int, chunk: int, chunks_per_step: int) -> list[int]:
    """Which conversations make micro-batch `chunk` of optimizer step `step`: a walk through a fresh random
    permutation per epoch, as a pure function of its arguments (so resume and DDP see the same data)."""
    first = (step * chunks_per_step + chunk) * batch_size
    return [int(_epoch_order(n, seed, g // n)[g % n]) for g in range(first, first + batch_size)]


@lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)
