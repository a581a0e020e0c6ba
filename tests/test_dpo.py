"""lillm.dpo: the loss against hand-written values, reply-only log-probs, the zero-gradient fixed point, LoRA with
DPO, and the preference data reader (truncation, drops, bad lines)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from lillm.chat import render
from lillm.dpo import (
    DPOObjective,
    build_preference_data,
    collate_pairs,
    dpo_loss,
    pair_logps,
    preference_metrics,
    read_preference_pairs,
    sequence_logps,
)
from lillm.lora import apply_lora, merge_lora
from lillm.model import LilLM, ModelConfig
from lillm.tokenizer import encode_ordinary, load_tokenizer, special_tokens

# Four pairs of hand-made sequence log-probs (policy chosen, policy rejected, reference chosen, reference rejected)
POLICY_CHOSEN = [-12.0, -30.5, -7.25, -20.0]
POLICY_REJECTED = [-14.0, -29.0, -7.25, -18.0]
REFERENCE_CHOSEN = [-13.0, -30.0, -8.0, -20.0]
REFERENCE_REJECTED = [-13.5, -29.5, -7.0, -18.0]
BETA = 0.1
# TRL's sigmoid DPO loss, -logsigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))), per pair, computed separately with
# Python's math.log1p(math.exp(-z)) for z = 0.15, -0.1, 0.1, 0.0 (the last pair: policy == reference, a tie)
TRL_LOSSES = [0.6209570477895321, 0.744396660073571, 0.6443966600735709, 0.6931471805599453]
TRL_MEAN_LOSS = 0.6757243871241548


def tensors():
    return [torch.tensor(v, dtype=torch.float64) for v in (POLICY_CHOSEN, POLICY_REJECTED, REFERENCE_CHOSEN, REFERENCE_REJECTED)]


def test_loss_equals_the_formula_by_hand_and_published_values():
    out = dpo_loss(*tensors(), beta=BETA)
    by_hand = []
    for pc, pr, rc, rr in zip(POLICY_CHOSEN, POLICY_REJECTED, REFERENCE_CHOSEN, REFERENCE_REJECTED):
        z = BETA * ((pc - rc) - (pr - rr))
        by_hand.append(-math.log(1 / (1 + math.exp(-z))))  # -log sigmoid(z)
    assert by_hand == pytest.approx(TRL_LOSSES, abs=1e-12)
    assert float(out.loss) == pytest.approx(sum(by_hand) / 4, abs=1e-12)
    assert float(out.loss) == pytest.approx(TRL_MEAN_LOSS, abs=1e-12)
    assert out.chosen_rewards.tolist() == pytest.approx([0.1, -0.05, 0.075, 0.0], abs=1e-12)
    assert out.rejected_rewards.tolist() == pytest.approx([-0.05, 0.05, -0.025, 0.0], abs=1e-12)
    assert out.margins.tolist() == pytest.approx([0.15, -0.1, 0.1, 0.0], abs=1e-12)
    assert out.accuracy.tolist() == [1.0, 0.0, 1.0, 0.0]  # the tie counts as wrong


def test_held_out_metrics_from_log_probs():
    pc, pr, rc, rr = tensors()
    counts = torch.tensor([[4.0, 8.0], [10.0, 5.0], [1.0, 1.0], [5.0, 4.0]], dtype=torch.float64)
    m = preference_metrics(torch.stack([pc, pr], 1), torch.stack([rc, rr], 1), counts, BETA)
    assert m["reward_accuracy"] == 0.5 and m["loss"] == pytest.approx(TRL_MEAN_LOSS, abs=1e-12)
    assert m["margin"] == pytest.approx(0.15 / 4, abs=1e-12)
    # per reply token: -3.0 vs -1.75 (no), -3.05 vs -5.8 (yes), -7.25 vs -7.25 (tie: no), -4.0 vs -4.5 (yes)
    assert m["ll_prefers_chosen"] == 0.5


def test_sequence_logps_count_reply_tokens_only():
    torch.manual_seed(0)
    logits = torch.randn(2, 7, 11)
    targets = torch.randint(0, 11, (2, 7))
    mask = torch.tensor([[0, 0, 1, 1, 1, 0, 0], [0, 0, 0, 1, 1, 1, 1]], dtype=torch.float32)
    logp = F.log_softmax(logits, -1)
    by_hand = [sum(float(logp[b, t, targets[b, t]]) for t in range(7) if mask[b, t]) for b in range(2)]
    assert sequence_logps(logits, targets, mask).tolist() == pytest.approx(by_hand, abs=1e-5)
    changed = logits.clone()
    changed[mask == 0] = 100 * torch.randn(int((mask == 0).sum()), 11)  # prompt and padding positions
    assert torch.equal(sequence_logps(changed, targets, mask), sequence_logps(logits, targets, mask))


@pytest.fixture(scope="module")
def tokenizer(tokenizer_path):
    return load_tokenizer(tokenizer_path)


def tiny_model(vocab_size: int, seed: int = 0) -> LilLM:
    torch.manual_seed(seed)
    return LilLM(ModelConfig(vocab_size=vocab_size, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128)).eval()


def write_pairs(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


PROMPT = [{"role": "user", "content": "How do I boil an egg?"}]
PAIR = {"prompt": PROMPT, "chosen": "Put it in boiling water for eight minutes.", "rejected": "I don't know."}


def test_reply_mask_and_padding_do_not_change_a_pairs_log_probs(tokenizer, tmp_path):
    long = {"prompt": [{"role": "user", "content": "Tell me everything you know about cats and dogs, please. " * 3}],
            "chosen": "Cats purr and dogs bark, and both like to sleep in the sun for most of the day.", "rejected": "No."}
    write_pairs(tmp_path / "p.jsonl", [PAIR, long])
    data = build_preference_data(tokenizer, read_preference_pairs(tmp_path / "p.jsonl"), 127)
    # the mask covers exactly the reply's tokens and the <|im_end|> that closes it
    ids, mask = data.chosen[0], data.chosen_masks[0]
    assert ids[mask == 1].tolist() == encode_ordinary(tokenizer, PAIR["chosen"]) + [special_tokens(tokenizer).im_end]
    assert ids.tolist() == render(tokenizer, [*PROMPT, {"role": "assistant", "content": PAIR["chosen"]}])[0]
    # padding is the tokenizer's pad token and changes nothing: alone vs next to a longer pair
    batch_ids, batch_mask = collate_pairs(data, [0, 1])
    assert (batch_ids[0, len(data.chosen[0]):] == special_tokens(tokenizer).pad).all()
    assert (batch_mask[0, len(data.chosen[0]):] == 0).all()
    model = tiny_model(tokenizer.get_vocab_size())
    alone, _ = pair_logps(model, data, [0])
    padded, counts = pair_logps(model, data, [0, 1])
    torch.testing.assert_close(padded[0], alone[0], atol=1e-5, rtol=0)
    assert counts[0].tolist() == [float(data.chosen_masks[0].sum()), float(data.rejected_masks[0].sum())]


def objective_grads(objective: DPOObjective, ids, reference, mask) -> list[torch.Tensor]:
    objective.zero_grad(set_to_none=True)
    _, loss = objective(ids, reference, mask)
    loss.backward()
    return [p.grad for p in objective.parameters() if p.grad is not None], loss


def test_gradient_is_zero_when_policy_is_reference_and_chosen_equals_rejected(tokenizer):
    model = tiny_model(tokenizer.get_vocab_size()).double()  # float64, so rounding cannot hide a real gradient
    same = render(tokenizer, [*PROMPT, {"role": "assistant", "content": PAIR["chosen"]}])
    other = render(tokenizer, [*PROMPT, {"role": "assistant", "content": PAIR["rejected"]}])

    def batch(chosen, rejected):
        L = max(len(chosen[0]), len(rejected[0]))
        ids = torch.full((2, L), special_tokens(tokenizer).pad)
        mask = torch.zeros(2, L, dtype=torch.float64)
        for row, (i, m) in enumerate((chosen, rejected)):
            ids[row, : len(i)], mask[row, : len(m)] = torch.tensor(i), torch.tensor(m, dtype=torch.float64)
        with torch.no_grad():
            logps = sequence_logps(model(ids[:, :-1])[0], ids[:, 1:], mask[:, 1:])
        return ids, logps.view(1, 2), mask  # the reference is the policy itself

    objective = DPOObjective(model, beta=0.1).train()
    grads, loss = objective_grads(objective, *batch(same, same))
    assert loss.detach().item() == pytest.approx(math.log(2), abs=1e-12)
    assert max(float(g.abs().max()) for g in grads) < 1e-12
    grads, _ = objective_grads(objective, *batch(same, other))  # different replies: a real gradient
    assert max(float(g.abs().max()) for g in grads) > 1e-4


def test_lora_dpo_trains_adapters_only_and_merges_exactly(tokenizer, data_dir):
    data = build_preference_data(tokenizer, read_preference_pairs(data_dir / "prefs_train.jsonl"), 127, limit=40)
    model = tiny_model(tokenizer.get_vocab_size())
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    rows = list(range(8))
    reference, _ = pair_logps(model, data, rows)
    apply_lora(model, rank=4, alpha=8.0)
    objective = DPOObjective(model, beta=0.5).train()
    optimizer = torch.optim.AdamW([p for p in objective.parameters() if p.requires_grad], lr=1e-2)
    ids, mask = collate_pairs(data, rows)
    for _ in range(15):
        _, loss = objective(ids, reference.float(), mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for name, value in model.state_dict().items():
        if not name.endswith(("lora_a", "lora_b")):
            assert torch.equal(value, frozen[name.replace(".base.", ".")]), name
    objective.eval()
    adapted, _ = pair_logps(model, data, rows)
    metrics = preference_metrics(adapted, reference, torch.ones_like(adapted), 0.5)
    assert metrics["reward_accuracy"] >= 0.75 and metrics["loss"] < math.log(2) - 0.1  # it learned these pairs
    merged = merge_lora(model)
    assert not any("lora" in name for name in merged.state_dict())
    torch.testing.assert_close(pair_logps(merged, data, rows)[0], adapted, atol=1e-4, rtol=0)


def test_long_prompts_lose_their_oldest_turns_and_unfittable_pairs_are_dropped(tokenizer, tmp_path):
    turns = []
    for i in range(6):
        turns += [{"role": "user", "content": f"Question number {i} is about the weather today."},
                  {"role": "assistant", "content": f"Answer number {i}: it is sunny and warm outside."}]
    long_prompt = {"prompt": [*turns, {"role": "user", "content": "And tomorrow?"}], "chosen": "Rain.", "rejected": "Snow."}
    huge_reply = {"prompt": PROMPT, "chosen": "word " * 300, "rejected": "No."}
    write_pairs(tmp_path / "p.jsonl", [PAIR, long_prompt, huge_reply])
    data = build_preference_data(tokenizer, read_preference_pairs(tmp_path / "p.jsonl"), 100)
    assert (len(data), data.pairs, data.truncated, data.dropped) == (2, 3, 1, 1)
    kept = data.prompts[1]
    assert kept[0]["role"] == "user" and kept == long_prompt["prompt"][-len(kept):] and len(kept) < 13
    assert max(len(data.chosen[1]), len(data.rejected[1])) <= 101
    one_more_turn = render(tokenizer, [*long_prompt["prompt"][-len(kept) - 2:], {"role": "assistant", "content": "Snow."}])[0]
    assert len(one_more_turn) > 101  # the cut keeps as many whole turns as fit
    dropped = build_preference_data(tokenizer, read_preference_pairs(tmp_path / "p.jsonl"), 100, overflow="drop")
    assert (len(dropped), dropped.truncated, dropped.dropped) == (1, 0, 2)


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"prompt": [{"role": "user", "content": "Hi"}], "chosen": "Hello"', "not valid JSON"),
        ('{"prompt": [{"role": "user", "content": "Hi"}], "chosen": "Hello"}', "missing field(s) 'rejected'"),
        ('{"prompt": [{"role": "user", "content": "Hi"}], "chosen": "Same", "rejected": "Same"}',
         "'chosen' and 'rejected' are the same reply"),
        ('{"prompt": [{"role": "assistant", "content": "Hi"}], "chosen": "a", "rejected": "b"}', "ending with a user turn"),
        ('{"prompt": [{"role": "user", "content": "Hi"}], "chosen": "", "rejected": "b"}', "'chosen' must be a non-empty string"),
    ],
)
def test_bad_lines_name_the_file_and_line(tmp_path, line, message):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(PAIR) + "\n\n" + line + "\n")
    with pytest.raises(ValueError) as e:
        list(read_preference_pairs(path))
    assert str(e.value).startswith(f"{path}:3: ") and message in str(e.value)
