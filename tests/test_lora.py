"""LoRA: starts equal to the base, trains only the adapters, merges to identical logits."""

from __future__ import annotations

import torch

from lillm.lora import LoRALinear, apply_lora, lora_state_dict, merge_lora
from lillm.model import LilLM, ModelConfig

CFG = ModelConfig(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32)


def test_lora_starts_equal_trains_adapters_only_and_merges_exactly():
    torch.manual_seed(0)
    base = LilLM(CFG).eval()
    x = torch.randint(0, 97, (2, 16))
    reference, _ = base(x)
    model = LilLM(CFG).eval()
    model.load_state_dict(base.state_dict())
    trainable = apply_lora(model, rank=4, alpha=8.0)
    assert trainable == sum(4 * (m.base.in_features + m.base.out_features) for m in model.modules() if isinstance(m, LoRALinear))
    torch.testing.assert_close(model(x)[0], reference, atol=0, rtol=0)  # B = 0 at the start

    frozen = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(5):
        _, loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    for k, v in model.state_dict().items():
        if "lora_" not in k:
            assert torch.equal(v, frozen[k]), f"{k} changed although it is frozen"
    adapted, _ = model(x)
    assert (adapted - reference).abs().max() > 1e-3
    assert set(lora_state_dict(model)) == {k for k in model.state_dict() if "lora_" in k}

    merged = merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    assert set(merged.state_dict()) == set(base.state_dict())  # a plain LilLM again
    torch.testing.assert_close(merged(x)[0], adapted, atol=1e-5, rtol=1e-5)
