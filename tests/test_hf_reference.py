"""LilLM against an independent implementation: transformers' LlamaForCausalLM with the same weights."""

from __future__ import annotations

import pytest
import torch

from lillm.hf import llama_state_dict, to_hf_llama
from lillm.model import LilLM, ModelConfig

transformers = pytest.importorskip("transformers")  # in requirements-dev.txt, so CI runs this


@pytest.mark.parametrize("overrides", [{}, {"tie_embeddings": False, "n_kv_heads": 1}, {"n_kv_heads": 4}])
def test_logits_equal_hf_llama(overrides):
    torch.manual_seed(0)
    cfg = ModelConfig(**{**dict(vocab_size=211, dim=64, n_layers=3, n_heads=4, n_kv_heads=2, max_seq_len=64), **overrides})
    ours = LilLM(cfg).eval()
    reference = to_hf_llama(ours).eval()
    x = torch.randint(0, cfg.vocab_size, (2, 40))
    with torch.no_grad():
        expected = reference(input_ids=x).logits
        logits, _ = ours(x)
    torch.testing.assert_close(logits, expected, atol=2e-5, rtol=1e-4)


def test_nope_cannot_be_exported():
    with pytest.raises(ValueError, match="only RoPE"):
        to_hf_llama(LilLM(ModelConfig(vocab_size=50, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, pos_encoding="nope")))


def test_state_dict_names_cover_every_weight():
    model = LilLM(ModelConfig(vocab_size=50, dim=32, n_layers=2, n_heads=2, n_kv_heads=1))
    names = llama_state_dict(model)
    assert len(names) == len(model.state_dict())
    assert "model.layers.1.mlp.down_proj.weight" in names and "model.norm.weight" in names
