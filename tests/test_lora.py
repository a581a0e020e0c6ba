"""LoRA: the adapted model starts equal to the base, trains only the adapters, and merges exactly."""

from __future__ import annotations

import pytest
import torch

from lillm.lora import DEFAULT_TARGETS, LoRALinear, apply_lora, lora_state_dict, merge_lora
from lillm.model import LilLM, ModelConfig

CONFIG = ModelConfig(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32)


def make_model(seed: int = 0) -> LilLM:
    torch.manual_seed(seed)
    return LilLM(CONFIG).eval()


def train_a_little(model: LilLM, steps: int = 3) -> None:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(steps):
        x = torch.randint(0, CONFIG.vocab_size, (4, 16))
        model(x[:, :-1], x[:, 1:])[1].backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def test_adapted_model_starts_equal_to_base():
    model = make_model()
    x = torch.randint(0, CONFIG.vocab_size, (2, 16))
    before = model(x)[0]
    apply_lora(model, rank=4, alpha=8)
    assert torch.equal(model(x)[0], before)  # B starts at 0, so the update is exactly zero


def test_only_adapters_train_and_base_weights_stay_frozen():
    model = make_model()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    rank = 4
    trainable = apply_lora(model, rank=rank, alpha=8)
    adapted = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert len(adapted) == len(DEFAULT_TARGETS) * CONFIG.n_layers
    assert trainable == sum(rank * (m.base.in_features + m.base.out_features) for m in adapted)
    assert trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)

    train_a_little(model)
    state = model.state_dict()
    for name, value in base.items():
        is_target = name.split(".")[-2] in DEFAULT_TARGETS
        assert torch.equal(state[name.replace(".weight", ".base.weight") if is_target else name], value), name
    assert all(v.abs().sum() > 0 for k, v in lora_state_dict(model).items() if k.endswith("lora_b"))


def test_merge_gives_the_same_logits_as_the_adapted_model():
    model = make_model()
    base_logits = model(x := torch.randint(0, CONFIG.vocab_size, (2, 24)))[0]
    apply_lora(model, rank=8, alpha=16)
    train_a_little(model)
    adapted_logits = model(x)[0]
    assert (adapted_logits - base_logits).abs().max() > 1e-2  # training moved the model, so the check has teeth

    merged = merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    torch.testing.assert_close(merged(x)[0], adapted_logits, atol=1e-5, rtol=0)
    plain = LilLM(CONFIG)
    plain.load_state_dict(merged.state_dict())  # a plain LilLM: same keys, same shapes
    torch.testing.assert_close(plain.eval()(x)[0], adapted_logits, atol=1e-5, rtol=0)


def test_bad_rank_and_unknown_targets_are_rejected():
    with pytest.raises(ValueError, match="rank must be >= 1"):
        apply_lora(make_model(), rank=0, alpha=1)
    with pytest.raises(ValueError, match="no Linear named"):
        apply_lora(make_model(), rank=2, alpha=1, targets=("qkv",))
