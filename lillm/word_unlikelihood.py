"""A penalty on requested words stuffed into a reply: token-level unlikelihood (Welleck et al. 2019).

Weighing a requested word's first use (sft_train.py --word_weight) teaches a small model to copy words from a
story instruction, but also to put them anywhere ("She loved to daisy. One day, she daisy was daisy."): the
cross-entropy at the other positions pushes a word's probability down only as hard as any other wrong token.
Unlikelihood adds, at every assistant position after a word's first use whose target is another token,

    -log(1 - p(word's first token))

so a word already brought in is not brought in again where the story does not use it. The words are found
from the loss mask alone: a weighted span (mask > 1) is a requested word's first use, its first target token the
word's first token. So this needs --word_weight > 1 and no extra batch fields.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

MAX_WORDS = 8  # weighted spans per sequence looked at (a story instruction asks for 3 words)


def used_word_tokens(targets: torch.Tensor, loss_mask: torch.Tensor, max_words: int = MAX_WORDS):
    """(token ids, positions, valid), each (B, K): the first target token of each weighted span (loss_mask > 1)
    of each row, at most max_words a row, found without a host sync (topk over a fixed K)."""
    weighted = loss_mask > 1
    starts = weighted & ~F.pad(weighted[:, :-1], (1, 0))
    T = targets.size(1)
    k = min(max_words, T)
    score = starts * (T - torch.arange(T, device=targets.device))  # earlier starts score higher, 0 = no start
    values, positions = score.topk(k, dim=1)
    valid = values > 0
    return torch.where(valid, targets.gather(1, positions), 0), positions, valid  # 0, not padding's -100


def word_unlikelihood(logits: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Mean over assistant positions (loss_mask > 0) of the summed -log(1 - p(w)) for every requested word w
    already used before the position whose token is not the target there."""
    words, positions, valid = used_word_tokens(targets, loss_mask)
    B, T, V = logits.shape
    logp = logits.float().log_softmax(-1).gather(-1, words[:, None, :].expand(B, T, words.size(1)))
    after = torch.arange(T, device=logits.device)[None, :, None] > positions[:, None, :]
    active = valid[:, None, :] & after & (loss_mask > 0)[:, :, None] & (targets[:, :, None] != words[:, None, :])
    penalty = -torch.log1p(-logp.exp().clamp(max=1.0 - 1e-6))
    return (penalty * active).sum() / (loss_mask > 0).sum().clamp(min=1)


class WordUnlikelihoodObjective(nn.Module):
    """The model with SFT's weighted cross-entropy plus `weight` x word_unlikelihood as its forward, so
    `lillm.train.fit` drives it like the model itself: forward(inputs, targets, loss_mask) -> (logits, loss)."""

    def __init__(self, model: nn.Module, weight: float):
        super().__init__()
        if not weight > 0:
            raise ValueError(f"the unlikelihood weight must be positive, got {weight}")
        self.model = model
        self.weight = weight

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor):
        logits, loss = self.model(inputs, targets, loss_mask=loss_mask)
        return logits, loss + self.weight * word_unlikelihood(logits, targets, loss_mask)
