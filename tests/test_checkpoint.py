"""Checkpoint folders round-trip exactly and fail clearly when broken."""

from __future__ import annotations

import json

import pytest
import torch

from lillm.checkpoint import CheckpointError, load_checkpoint, load_trainer_state, save_checkpoint
from lillm.model import LilLM, ModelConfig


@pytest.mark.parametrize("tie_embeddings", [True, False])
def test_round_trip_is_exact(tmp_path, tokenizer_path, tie_embeddings):
    torch.manual_seed(0)
    model = LilLM(ModelConfig(vocab_size=1024, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, tie_embeddings=tie_embeddings))
    state = {"step": 7, "rng": torch.get_rng_state(), "optimizer": {"lr": 0.1}}
    save_checkpoint(tmp_path / "ckpt", model, tokenizer_path, meta={"stage": "base"}, trainer_state=state)
    loaded = load_checkpoint(tmp_path / "ckpt")
    assert loaded.config == model.config and loaded.meta == {"stage": "base"}
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.model.state_dict().items()):
        assert torch.equal(a, b), name
    if tie_embeddings:
        assert loaded.model.lm_head.weight is loaded.model.embed_tokens.weight
    restored = load_trainer_state(tmp_path / "ckpt")
    assert restored["step"] == 7 and torch.equal(restored["rng"], state["rng"])
    assert loaded.tokenizer.get_vocab_size() == 1024


def test_broken_checkpoints_fail_clearly(tmp_path, tokenizer_path):
    with pytest.raises(CheckpointError, match="checkpoint folder not found"):
        load_checkpoint(tmp_path / "nope")
    model = LilLM(ModelConfig(vocab_size=1024, dim=32, n_layers=1, n_heads=2, n_kv_heads=1))
    ckpt = save_checkpoint(tmp_path / "ckpt", model, tokenizer_path)
    (ckpt / "model.safetensors").write_bytes((ckpt / "model.safetensors").read_bytes()[:100])
    with pytest.raises(CheckpointError, match="cannot read model.safetensors"):
        load_checkpoint(ckpt)
    (ckpt / "config.json").write_text(json.dumps({**model.config.to_dict(), "vocab_size": 500}))
    with pytest.raises(CheckpointError, match="tokenizer has 1024 tokens but the model's vocab_size is 500"):
        load_checkpoint(ckpt)
    (ckpt / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load_checkpoint(ckpt)
