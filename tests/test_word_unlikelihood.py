"""The penalty on requested words used again (lillm.word_unlikelihood), on hand-made probabilities."""

import math

import pytest
import torch

from lillm.word_unlikelihood import WordUnlikelihoodObjective, used_word_tokens, word_unlikelihood


def logits_with(probs: list[list[float]]) -> torch.Tensor:
    """(1, T, V) logits whose softmax is exactly `probs` (rows summing to 1)."""
    return torch.tensor(probs).log()[None]


def test_penalty_counts_only_later_positions_where_the_word_is_not_the_target():
    # Position 1 is a requested word's first use (weight 30, token 2); position 3 uses it again (no penalty there),
    # positions 2 and 4 do not: p(2) is 0.5 and 0.75 there. Position 0 is a prompt token (mask 0).
    targets = torch.tensor([[0, 2, 1, 2, 3]])
    mask = torch.tensor([[0.0, 30.0, 1.0, 1.0, 1.0]])
    probs = [[0.25, 0.25, 0.25, 0.25], [0.1, 0.1, 0.7, 0.1], [0.25, 0.25, 0.5, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.75, 0.25]]
    got = word_unlikelihood(logits_with(probs), targets, mask)
    assert got.item() == pytest.approx((math.log(2) + math.log(4)) / 4, rel=1e-5)  # 4 assistant positions


def test_a_word_of_several_tokens_is_guarded_by_its_first_token_and_rows_without_words_add_nothing():
    targets = torch.tensor([[5, 6, 7, 8, 9, 5], [5, 6, 7, 8, -100, -100]])  # row 1 is padded (collate's -100)
    mask = torch.tensor([[1.0, 30.0, 30.0, 1.0, 30.0, 1.0], [1.0, 1.0, 1.0, 1.0, 0.0, 0.0]])
    words, positions, valid = used_word_tokens(targets, mask)
    found = [(w, p) for w, p, v in zip(words[0].tolist(), positions[0].tolist(), valid[0].tolist()) if v]
    assert sorted(found, key=lambda x: x[1]) == [(6, 1), (9, 4)]  # token 7 continues the word that starts with 6
    assert not valid[1].any() and (words >= 0).all()  # an id that indexes the vocabulary even where no word is
    uniform = torch.zeros(2, 6, 10)
    # Row 0: token 6 is guarded at positions 2..5 (4 of them), token 9 at 5; each costs -log(1 - 1/10); 6 + 4
    # assistant positions.
    assert word_unlikelihood(uniform, targets, mask).item() == pytest.approx(5 * -math.log(0.9) / 10, rel=1e-5)


def test_objective_adds_the_weighted_penalty_to_the_model_loss():
    class Fixed(torch.nn.Module):
        def forward(self, inputs, targets, loss_mask):
            return torch.zeros(1, 3, 4), torch.tensor(2.0)

    targets, mask = torch.tensor([[1, 1, 2]]), torch.tensor([[30.0, 1.0, 1.0]])
    _, loss = WordUnlikelihoodObjective(Fixed(), 3.0)(torch.zeros(1, 3, dtype=torch.long), targets, mask)
    assert loss.item() == pytest.approx(2.0 + 3.0 * -math.log(0.75) / 3, rel=1e-5)  # only position 2 (target 2)
    with pytest.raises(ValueError):
        WordUnlikelihoodObjective(Fixed(), 0.0)
