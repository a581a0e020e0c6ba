"""SFT data: assistant-only loss, truncation at turn boundaries, clear errors, deterministic batches."""

from __future__ import annotations

import json

import pytest
import torch

from lillm.chat import DEFAULT_SYSTEM_PROMPT, render
from lillm.model import LilLM, ModelConfig
from lillm.sft_data import batch_indices, build_sft_dataset, collate, read_jsonl_conversations
from lillm.tokenizer import IM_END_ID, PAD_ID, load_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tokenizer_path):
    return load_tokenizer(tokenizer_path)


@pytest.fixture(scope="module")
def val_conversations(data_dir):
    return list(read_jsonl_conversations(data_dir / "chat_val.jsonl"))


def test_masked_loss_equals_hand_computation(tokenizer, val_conversations):
    data = build_sft_dataset(tokenizer, iter(val_conversations[:4]), max_seq_len=512, system=DEFAULT_SYSTEM_PROMPT)
    x, y, mask = collate(data.ids, data.masks)
    torch.manual_seed(0)
    model = LilLM(ModelConfig(vocab_size=1024, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, max_seq_len=512))
    logits, loss = model(x, y, loss_mask=mask)
    log_probs = torch.log_softmax(logits.double(), dim=-1)
    picked = []
    for b in range(x.shape[0]):
        full_ids, full_mask = data.ids[b], data.masks[b]
        for t in range(len(full_ids) - 1):
            if full_mask[t + 1]:  # the target at t is an assistant token
                picked.append(-log_probs[b, t, full_ids[t + 1]])
    assert len(picked) == int(mask.sum()) > 0
    torch.testing.assert_close(loss.double(), torch.stack(picked).mean(), atol=1e-5, rtol=1e-5)


def test_user_and_system_targets_never_change_the_loss(tokenizer, val_conversations):
    data = build_sft_dataset(tokenizer, iter(val_conversations[:3]), max_seq_len=512, system=DEFAULT_SYSTEM_PROMPT)
    x, y, mask = collate(data.ids, data.masks)
    model = LilLM(ModelConfig(vocab_size=1024, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, max_seq_len=512))
    _, loss = model(x, y, loss_mask=mask)
    scrambled = y.clone()
    scrambled[mask == 0] = torch.randint(4, 1024, (int((mask == 0).sum()),))
    assert torch.equal(model(x, scrambled, loss_mask=mask)[1], loss)
    assert not torch.equal(model(x, scrambled, loss_mask=torch.ones_like(mask))[1], model(x, y, loss_mask=torch.ones_like(mask))[1])


def test_collate_pads_and_shifts(tokenizer, val_conversations):
    data = build_sft_dataset(tokenizer, iter(val_conversations[:2]), max_seq_len=1024)
    x, y, mask = collate(data.ids, data.masks)
    short = min(range(2), key=lambda i: len(data.ids[i]))
    n = len(data.ids[short]) - 1
    assert x.shape[1] == max(len(i) for i in data.ids) - 1
    assert x[short, :n].tolist() == data.ids[short][:-1] and y[short, :n].tolist() == data.ids[short][1:]
    assert (x[short, n:] == PAD_ID).all() and (mask[short, n:] == 0).all()
    assert y[short, n - 1] != IM_END_ID or mask[short, n - 1] == 1  # the closing <|im_end|> is learned
    _, _, all_tokens = collate(data.ids, data.masks, train_on_inputs=True)
    assert all_tokens[short, :n].sum() == n and all_tokens[short, n:].sum() == 0


def test_long_conversations_truncate_at_a_turn_boundary_or_drop(tokenizer):
    turn = "word " * 30
    long = [{"role": r, "content": f"{i} {turn}"} for i, r in enumerate(["user", "assistant"] * 4)]
    first = len(render(tokenizer, long[:2])[0])
    data = build_sft_dataset(tokenizer, iter([long]), max_seq_len=first + 5)
    assert (data.truncated, data.dropped, len(data)) == (1, 0, 1)
    assert data.ids[0] == render(tokenizer, long[:2])[0]  # exactly the first exchange, ending with the reply
    dropped = build_sft_dataset(tokenizer, iter([long, long[:2]]), max_seq_len=first + 5, overflow="drop")
    assert (dropped.truncated, dropped.dropped, len(dropped)) == (0, 1, 1)
    with pytest.raises(ValueError, match="no usable conversations"):
        build_sft_dataset(tokenizer, iter([long]), max_seq_len=10)


def test_malformed_lines_are_reported_with_their_line_number(tokenizer, tmp_path):
    path = tmp_path / "chat.jsonl"
    good = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})
    path.write_text(good + "\n\n" + '{"messages": [oops\n')
    with pytest.raises(ValueError, match=rf"{path}:3: expected a JSON object"):
        list(read_jsonl_conversations(path))
    path.write_text(good + "\n" + json.dumps({"messages": [{"role": "robot", "content": "x"}]}) + "\n")
    with pytest.raises(ValueError, match="conversation 2: message 0 has unknown role 'robot'"):
        build_sft_dataset(tokenizer, read_jsonl_conversations(path), max_seq_len=256)


def test_batches_are_deterministic_and_split_like_grad_accumulation():
    one_process = [batch_indices(50, 4, seed=3, step=5, chunk=c, chunks_per_step=2) for c in range(2)]
    assert one_process == [batch_indices(50, 4, seed=3, step=5, chunk=rank, chunks_per_step=2) for rank in range(2)]
    epoch = [i for step in range(0, 50 // 8 + 1) for c in range(2) for i in batch_indices(50, 4, 3, step, c, 2)][:50]
    assert sorted(epoch) == list(range(50))  # every conversation once per epoch
