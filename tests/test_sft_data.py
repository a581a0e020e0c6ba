"""SFT data: the masked loss counts exactly the assistant tokens; truncation, dropping and bad lines."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from lillm.chat import DEFAULT_SYSTEM_PROMPT, render
from lillm.model import LilLM, ModelConfig
from lillm.sft_data import batch_indices, build_sft_dataset, collate, fit_conversation, read_jsonl_conversations
from lillm.tokenizer import load_tokenizer

PAD_ID, IM_END_ID = 1, 3  # lillm's own layout (the tokenizers here are trained by lillm)

EXCHANGES = [
    {"role": "user", "content": "What colour is the sky?"},
    {"role": "assistant", "content": "Blue, on a clear day."},
    {"role": "user", "content": "And at night?"},
    {"role": "assistant", "content": "Dark, with stars when there are no clouds."},
    {"role": "user", "content": "Why are sunsets red?"},
    {"role": "assistant", "content": "Sunlight crosses more air at sunset, and air scatters blue light away."},
]


@pytest.fixture(scope="module")
def tokenizer(tokenizer_path):
    return load_tokenizer(tokenizer_path)


def source(*conversations):
    return ((f"conversation {i}", c) for i, c in enumerate(conversations, 1))


def batch_of(tokenizer, conversations, train_on_inputs=False):
    data = build_sft_dataset(tokenizer, source(*conversations), max_seq_len=256, system=DEFAULT_SYSTEM_PROMPT)
    return collate(data.ids, data.masks, data.pad_id, train_on_inputs)


def test_masked_loss_equals_a_hand_computation_over_assistant_targets(tokenizer):
    inputs, targets, loss_mask = batch_of(tokenizer, [EXCHANGES, EXCHANGES[:2], EXCHANGES[2:4]])
    torch.manual_seed(0)
    model = LilLM(ModelConfig(vocab_size=tokenizer.get_vocab_size(), dim=32, n_layers=1, n_heads=2, n_kv_heads=1))
    logits, loss = model(inputs, targets, loss_mask=loss_mask)

    log_probs = F.log_softmax(logits.double(), dim=-1)
    picked = []
    for b in range(inputs.shape[0]):
        ids, mask = render(tokenizer, [EXCHANGES, EXCHANGES[:2], EXCHANGES[2:4]][b], system=DEFAULT_SYSTEM_PROMPT)
        for t in range(len(ids) - 1):
            if mask[t + 1]:  # the target at position t is an assistant token
                picked.append(-log_probs[b, t, ids[t + 1]])
    assert len(picked) == int(loss_mask.sum()) > 30
    assert loss.item() == pytest.approx(torch.stack(picked).mean().item(), abs=1e-5)


def test_user_and_system_targets_never_change_the_masked_loss(tokenizer):
    inputs, targets, loss_mask = batch_of(tokenizer, [EXCHANGES, EXCHANGES[:2]])
    model = LilLM(ModelConfig(vocab_size=tokenizer.get_vocab_size(), dim=32, n_layers=1, n_heads=2, n_kv_heads=1))
    loss = model(inputs, targets, loss_mask=loss_mask)[1]
    generator = torch.Generator().manual_seed(0)
    scrambled = targets.clone()
    outside = (loss_mask == 0) & (targets != -100)
    scrambled[outside] = torch.randint(4, tokenizer.get_vocab_size(), (int(outside.sum()),), generator=generator)
    assert torch.equal(model(inputs, scrambled, loss_mask=loss_mask)[1], loss)
    # ...whereas training on inputs counts them, so the same change does move that loss
    _, _, all_real = batch_of(tokenizer, [EXCHANGES, EXCHANGES[:2]], train_on_inputs=True)
    assert torch.equal(all_real, (targets != -100).float())
    assert abs(model(inputs, scrambled, loss_mask=all_real)[1] - model(inputs, targets, loss_mask=all_real)[1]) > 1e-3


def test_collate_shifts_by_one_and_pads_right(tokenizer):
    long, short = EXCHANGES, EXCHANGES[:2]
    inputs, targets, loss_mask = batch_of(tokenizer, [long, short])
    ids, mask = render(tokenizer, short, system=DEFAULT_SYSTEM_PROMPT)
    n = len(ids) - 1
    assert inputs[1, :n].tolist() == ids[:-1] and targets[1, :n].tolist() == ids[1:]
    assert loss_mask[1, :n].tolist() == mask[1:]
    assert (inputs[1, n:] == PAD_ID).all() and (targets[1, n:] == -100).all() and (loss_mask[1, n:] == 0).all()
    assert inputs.shape[1] == len(render(tokenizer, long, system=DEFAULT_SYSTEM_PROMPT)[0]) - 1


def test_long_conversations_are_cut_at_a_turn_boundary_or_dropped(tokenizer):
    lengths = [len(render(tokenizer, EXCHANGES[:k])[0]) for k in (2, 4, 6)]
    limit = lengths[1] + 3  # two exchanges fit, three do not
    ids, mask, truncated = fit_conversation(tokenizer, EXCHANGES, limit)
    assert truncated and (ids, mask) == render(tokenizer, EXCHANGES[:4])
    assert ids[-2] == IM_END_ID and mask[-2] == 1  # ends with a whole assistant reply and its <|im_end|>
    assert fit_conversation(tokenizer, EXCHANGES, lengths[0] - 1) is None
    assert fit_conversation(tokenizer, EXCHANGES, lengths[2]) == (*render(tokenizer, EXCHANGES), False)
    # a trailing user turn is never kept: nothing would be learned from it
    assert fit_conversation(tokenizer, EXCHANGES[:5], 10_000) == (*render(tokenizer, EXCHANGES[:4]), True)

    conversations = [EXCHANGES, EXCHANGES[:2], EXCHANGES[:4]]
    truncate = build_sft_dataset(tokenizer, source(*conversations), max_seq_len=limit - 1)
    assert (len(truncate), truncate.truncated, truncate.dropped, truncate.conversations) == (3, 1, 0, 3)
    drop = build_sft_dataset(tokenizer, source(*conversations), max_seq_len=limit - 1, overflow="drop")
    assert (len(drop), drop.truncated, drop.dropped) == (2, 0, 1)
    assert "1 dropped of 3 read" in drop.summary()
    with pytest.raises(ValueError, match="no usable conversations: 3 read, 3 without"):
        build_sft_dataset(tokenizer, source(*conversations), max_seq_len=lengths[0] - 2)


def test_real_chat_data_renders_within_the_context(tokenizer, data_dir):
    data = build_sft_dataset(tokenizer, read_jsonl_conversations(data_dir / "chat_val.jsonl"), 128, limit=200)
    assert data.conversations == 200 and len(data) + data.dropped == 200 and len(data) > 40
    for ids, mask in zip(data.ids, data.masks):
        assert len(ids) <= 129 and ids[-2] == IM_END_ID and mask[-2] == 1 and mask[-1] == 0


def test_malformed_lines_are_reported_with_file_and_line(tokenizer, tmp_path):
    path = tmp_path / "chat.jsonl"
    good = json.dumps({"messages": EXCHANGES[:2]})
    path.write_text(f"{good}\n\n{good}\n{{not json\n")
    with pytest.raises(ValueError, match=r"chat.jsonl:4: expected a JSON object with a 'messages' list"):
        build_sft_dataset(tokenizer, read_jsonl_conversations(path), 256)
    path.write_text(f"{good}\n" + json.dumps({"messages": [{"role": "robot", "content": "hi"}]}) + "\n")
    with pytest.raises(ValueError, match=r"chat.jsonl:2: message 0 has unknown role 'robot'"):
        build_sft_dataset(tokenizer, read_jsonl_conversations(path), 256)
    with pytest.raises(FileNotFoundError, match="chat file not found"):
        next(read_jsonl_conversations(tmp_path / "missing.jsonl"))


def test_batches_walk_each_epoch_once_and_split_exactly_over_ranks():
    n, batch = 10, 3
    first_epoch = [i for step in range(10) for i in batch_indices(n, batch, seed=1, step=step, chunk=0, chunks_per_step=1)]
    assert sorted(first_epoch[:n]) == list(range(n)) and sorted(first_epoch[n : 2 * n]) == list(range(n))
    assert first_epoch[:n] != first_epoch[n : 2 * n]  # a fresh order each epoch
    # the 4 chunks of a step (2 ranks x 2 micro-batches) together are one batch 4 times larger
    chunks = [batch_indices(n, batch, 1, 5, chunk, chunks_per_step=4) for chunk in range(4)]
    assert sum(chunks, []) == batch_indices(n, 4 * batch, 1, 5, chunk=0, chunks_per_step=1)
    assert sum(chunks, []) != batch_indices(n, 4 * batch, 1, 4, chunk=0, chunks_per_step=1)
