"""Direct Preference Optimization (Rafailov et al. 2023): learn from pairs "this reply is better than that one".

Under the Bradley-Terry model a person prefers reply y_c over y_r with probability sigmoid(r(y_c) - r(y_r)) for
some reward r. DPO never fits r: it uses the policy's own log-probability ratio against a frozen reference
model as an implicit reward, r(y) = beta * (log pi(y | x) - log pi_ref(y | x)), and maximises the likelihood of
the human choices under that reward:

    loss = -log sigmoid(beta * ((log pi(y_c) - log pi_ref(y_c)) - (log pi(y_r) - log pi_ref(y_r))))

log pi(y | x) is the sum of the log-probabilities of the reply's tokens only (the assistant mask from
`lillm.chat.render`, as in SFT): the prompt is given, not chosen by the model. The reference never changes, so
its log-probabilities are computed once per pair, before training.

Data: a jsonl file of `{"prompt": [messages ending with a user turn], "chosen": str, "rejected": str}` lines.
A pair longer than the context loses its oldest whole turns from the prompt's left, or is dropped.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from lillm.chat import render
from lillm.fileio import utf8_lines
from lillm.tokenizer import special_tokens

Messages = list[Mapping[str, str]]

# ---------------------------------------------------------------------------------------------- the loss


def sequence_logps(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log pi(reply | prompt) per row: the sum of log p(target token) over positions where mask is 1.

    logits (N, T, V) predict targets (N, T); mask (N, T) is 1 on reply tokens (and the <|im_end|> that closes
    the reply), 0 on the prompt, the headers and padding, so those positions contribute nothing at all."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 logits are too coarse for sums
    token_logps = -F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
    return (token_logps.view_as(targets) * mask).sum(-1)


@dataclass
class DPOOutput:
    """The loss and what people watch while it trains (all per pair, except the loss)."""

    loss: torch.Tensor  # mean over the pairs
    chosen_rewards: torch.Tensor  # beta * (log pi(y_c) - log pi_ref(y_c)), detached
    rejected_rewards: torch.Tensor

    @property
    def margins(self) -> torch.Tensor:
        return self.chosen_rewards - self.rejected_rewards

    @property
    def accuracy(self) -> torch.Tensor:
        """1 where the implicit reward ranks chosen above rejected; a tie counts as wrong, so the untrained
        policy (equal to the reference, every reward 0) scores exactly 0."""
        return (self.margins > 0).float()


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float,
) -> DPOOutput:
    """The DPO loss from sequence log-probs (each (B,)). beta scales the implicit reward: a small beta lets the
    policy move far from the reference before the loss saturates, a large one keeps it close."""
    chosen_logratio = policy_chosen - reference_chosen
    rejected_logratio = policy_rejected - reference_rejected
    loss = -F.logsigmoid(beta * (chosen_logratio - rejected_logratio)).mean()
    return DPOOutput(loss, (beta * chosen_logratio).detach(), (beta * rejected_logratio).detach())


class DPOObjective(nn.Module):
    """The policy with the DPO loss as its forward, so the shared training loop can drive it like a language
    model: forward(ids, reference, loss_mask) -> (margins, loss), the (inputs, targets, loss_mask) call of
    `lillm.train.fit` with other contents.

    ids (2B, L): B chosen sequences then their B rejected ones, right-padded; reference (B, 2): the frozen
    reference's log-probs of (chosen, rejected); loss_mask (2B, L): 1 on reply tokens. While training it also
    keeps running sums of the metrics, read (and reset) by `take_stats`."""

    STATS = ("reward_accuracy", "margin", "chosen_reward", "rejected_reward")

    def __init__(self, policy: nn.Module, beta: float):
        super().__init__()
        if beta <= 0:
            raise ValueError(f"beta must be positive, got {beta}")
        self.policy = policy
        self.beta = beta
        # On the policy's device (moved there by the first step), read once per eval; float32, not float64, which MPS
        # lacks; not a buffer, so DDP never syncs it.
        self._sums = torch.zeros(len(self.STATS) + 1)

    def forward(self, ids: torch.Tensor, reference: torch.Tensor, loss_mask: torch.Tensor):
        logits, _ = self.policy(ids[:, :-1])
        logps = sequence_logps(logits, ids[:, 1:], loss_mask[:, 1:])
        B = ids.size(0) // 2
        out = dpo_loss(logps[:B], logps[B:], reference[:, 0], reference[:, 1], self.beta)
        if self.training:
            rows = torch.stack([out.accuracy, out.margins, out.chosen_rewards, out.rejected_rewards]).detach()
            sums = torch.cat([rows.sum(1), rows.new_tensor([B])]).float()
            self._sums = self._sums.to(sums.device) + sums  # no host sync per micro-step
        return out.margins, out.loss

    def take_stats(self) -> list[float]:
        """[sum of each STATS value, number of pairs] since the last call (sums, so ranks can add them)."""
        sums, self._sums = self._sums.tolist(), torch.zeros_like(self._sums)
        return sums


# ---------------------------------------------------------------------------------------------- data


@dataclass
class PreferenceData:
    """Rendered pairs: for each, the chosen and the rejected conversation's ids and reply masks."""

    pad_id: int  # the tokenizer's pad token (never an assumed id)
    chosen: list[np.ndarray] = field(default_factory=list)  # int32 ids of prompt + chosen reply
    chosen_masks: list[np.ndarray] = field(default_factory=list)  # uint8, 1 on the reply's tokens
    rejected: list[np.ndarray] = field(default_factory=list)
    rejected_masks: list[np.ndarray] = field(default_factory=list)
    prompts: list[Messages] = field(default_factory=list)  # the (possibly shortened) prompt of each pair
    pairs: int = 0  # read from the source
    truncated: int = 0  # kept with the oldest turns of the prompt removed
    dropped: int = 0  # not even the last user turn and the replies fit

    def __len__(self) -> int:
        return len(self.chosen)

    def length(self, i: int) -> int:
        return max(len(self.chosen[i]), len(self.rejected[i]))

    def summary(self) -> str:
        tokens = sum(len(c) + len(r) for c, r in zip(self.chosen, self.rejected))
        reply = sum(int(c.sum() + r.sum()) for c, r in zip(self.chosen_masks, self.rejected_masks))
        return (
            f"{len(self)} pairs ({self.truncated} with the prompt cut at the left, {self.dropped} dropped of "
            f"{self.pairs} read), {tokens:,} tokens, {reply:,} reply tokens"
        )


PairSource = Iterator[tuple[str, Messages, str, str]]  # (where, prompt, chosen, rejected)


def read_preference_pairs(path: str | os.PathLike) -> PairSource:
    """Pairs from a jsonl file; a bad line raises ValueError naming file:line and what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"preference file not found: {path}")
    for line_no, line in utf8_lines(path):
        if not line.strip():
            continue
        where = f"{path}:{line_no}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e})") from None
        yield (where, *_checked_pair(row, where))


def _checked_pair(row, where: str) -> tuple[Messages, str, str]:
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object with 'prompt', 'chosen' and 'rejected'")
    missing = [k for k in ("prompt", "chosen", "rejected") if k not in row]
    if missing:
        raise ValueError(f"{where}: missing field(s) {', '.join(map(repr, missing))}; each line needs "
                         "'prompt' (a list of messages), 'chosen' and 'rejected' (strings)")
    prompt, chosen, rejected = row["prompt"], row["chosen"], row["rejected"]
    if not isinstance(prompt, list) or not prompt or not isinstance(prompt[-1], dict) or prompt[-1].get("role") != "user":
        raise ValueError(f"{where}: 'prompt' must be a non-empty list of messages ending with a user turn")
    for name, reply in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(reply, str) or not reply.strip():
            raise ValueError(f"{where}: {name!r} must be a non-empty string")
    if chosen == rejected:
        raise ValueError(f"{where}: 'chosen' and 'rejected' are the same reply; a pair needs two different ones")
    return prompt, chosen, rejected


def render_pair(
    tokenizer, prompt: Messages, chosen: str, rejected: str, max_tokens: int, system: str | None = None
) -> tuple[Messages, list[int], list[int], list[int], list[int]] | None:
    """(prompt kept, chosen ids, chosen mask, rejected ids, rejected mask) with both conversations at most
    max_tokens long: the oldest whole turns (a user message and the replies after it) are dropped from the
    prompt's left until both fit. A leading system message is kept. None when the last user turn alone does not
    leave room for the longer reply."""
    head = list(prompt[:1]) if prompt[0].get("role") == "system" else []
    rest = list(prompt[len(head):])
    while True:
        c_ids, c_mask = render(tokenizer, [*head, *rest, {"role": "assistant", "content": chosen}], system=system)
        r_ids, r_mask = render(tokenizer, [*head, *rest, {"role": "assistant", "content": rejected}], system=system)
        if max(len(c_ids), len(r_ids)) <= max_tokens:
            return head + rest, c_ids, c_mask, r_ids, r_mask
        next_turn = next((i for i in range(1, len(rest)) if rest[i]["role"] == "user"), None)
        if next_turn is None:
            return None
        rest = rest[next_turn:]


def build_preference_data(
    tokenizer,
    source: PairSource,
    max_seq_len: int,
    overflow: str = "truncate",
    system: str | None = None,
    limit: int | None = None,
) -> PreferenceData:
    """Render up to `limit` pairs for a model with a context of max_seq_len (a sequence may have max_seq_len + 1
    tokens: inputs plus the last target). overflow="drop" skips every pair that would need its prompt cut."""
    if overflow not in ("truncate", "drop"):
        raise ValueError(f"overflow must be 'truncate' or 'drop', got {overflow!r}")
    data = PreferenceData(pad_id=special_tokens(tokenizer).pad)
    for where, prompt, chosen, rejected in islice(source, limit):
        data.pairs += 1
        try:
            fitted = render_pair(tokenizer, prompt, chosen, rejected, max_seq_len + 1, system)
        except ValueError as e:  # a bad message inside the prompt
            raise ValueError(f"{where}: {e}") from None
        if fitted is None or (overflow == "drop" and len(fitted[0]) < len(prompt)):
            data.dropped += 1
            continue
        kept, c_ids, c_mask, r_ids, r_mask = fitted
        data.prompts.append(kept)
        data.chosen.append(np.asarray(c_ids, dtype=np.int32))
        data.chosen_masks.append(np.asarray(c_mask, dtype=np.uint8))
        data.rejected.append(np.asarray(r_ids, dtype=np.int32))
        data.rejected_masks.append(np.asarray(r_mask, dtype=np.uint8))
        data.truncated += len(kept) < len(prompt)
    if not data.chosen:
        raise ValueError(f"no usable pairs: {data.pairs} read, {data.dropped} too long for {max_seq_len + 1} tokens")
    return data


def collate_pairs(data: PreferenceData, rows: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, reply_mask), each (2B, L): the chosen sequences of `rows`, then their rejected ones, right-padded
    with the pad token to the longest (mask 0 on padding). The model reads ids[:, :-1] and predicts ids[:, 1:];
    with right padding and a causal mask, real tokens never see padding."""
    seqs = [data.chosen[i] for i in rows] + [data.rejected[i] for i in rows]
    masks = [data.chosen_masks[i] for i in rows] + [data.rejected_masks[i] for i in rows]
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), data.pad_id, dtype=torch.long)
    reply_mask = torch.zeros((len(seqs), L), dtype=torch.float32)
    for row, (s, m) in enumerate(zip(seqs, masks)):
        ids[row, : len(s)] = torch.as_tensor(s, dtype=torch.long)
        reply_mask[row, : len(s)] = torch.as_tensor(m, dtype=torch.float32)
    return ids, reply_mask


@torch.no_grad()
def pair_logps(model: nn.Module, data: PreferenceData, rows: Sequence[int], device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence log-probs (B, 2) of (chosen, rejected) for `rows` in one batch, and their reply token counts
    (B, 2). The batch is padded as in training, so a reference computed here equals the policy's at step 0."""
    ids, reply_mask = (t.to(device) for t in collate_pairs(data, rows))
    logits, _ = model(ids[:, :-1])
    logps = sequence_logps(logits, ids[:, 1:], reply_mask[:, 1:]).double().cpu()
    counts = reply_mask[:, 1:].sum(-1).double().cpu()
    B = len(rows)
    return torch.stack([logps[:B], logps[B:]], 1), torch.stack([counts[:B], counts[B:]], 1)


def preference_metrics(
    logps: torch.Tensor, reference: torch.Tensor, counts: torch.Tensor, beta: float
) -> dict[str, float]:
    """Held-out numbers for (N, 2) policy and reference log-probs of (chosen, rejected):

    reward_accuracy: share of pairs whose implicit reward ranks chosen strictly above rejected;
    loss, margin, chosen_reward, rejected_reward: means over the pairs;
    ll_prefers_chosen: share where the policy's own length-normalised log-likelihood (mean log-prob per reply
    token) is higher for chosen: the model's preference without any reference."""
    out = dpo_loss(logps[:, 0], logps[:, 1], reference[:, 0], reference[:, 1], beta)
    per_token = logps / counts
    return {
        "loss": float(out.loss),
        "reward_accuracy": float(out.accuracy.mean()),
        "margin": float(out.margins.mean()),
        "chosen_reward": float(out.chosen_rewards.mean()),
        "rejected_reward": float(out.rejected_rewards.mean()),
        "ll_prefers_chosen": float((per_token[:, 0] > per_token[:, 1]).double().mean()),
    }
