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
    restored = load_trainer_state(tmp_path / "ckpt", schema={"step": int, "rng": torch.Tensor})
    assert restored["step"] == 7 and torch.equal(restored["rng"], state["rng"])
    assert loaded.tokenizer.get_vocab_size() == 1024


def test_broken_checkpoints_fail_clearly(tmp_path, tokenizer_path):
    with pytest.raises(CheckpointError, match="checkpoint folder not found"):
        load_checkpoint(tmp_path / "nope")
    model = LilLM(ModelConfig(vocab_size=1024, dim=32, n_layers=1, n_heads=2, n_kv_heads=1))
    ckpt = save_checkpoint(tmp_path / "ckpt", model, tokenizer_path)
    (ckpt / "model.safetensors").write_bytes((ckpt / "model.safetensors").read_bytes()[:100])
    with pytest.raises(CheckpointError, match="model.safetensors is damaged .*truncated"):
        load_checkpoint(ckpt)
    (ckpt / "config.json").write_text(json.dumps({**model.config.to_dict(), "vocab_size": 500}))
    with pytest.raises(CheckpointError, match="tokenizer has 1024 tokens but the model's vocab_size is 500"):
        load_checkpoint(ckpt)
    (ckpt / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load_checkpoint(ckpt)


@pytest.mark.parametrize("crash_at", ["torch.save", "fsync", "first rename", "second rename"])
def test_interrupted_save_leaves_the_previous_checkpoint_loadable(tmp_path, tokenizer_path, monkeypatch, crash_at):
    import os

    import lillm.checkpoint as ckpt_module

    torch.manual_seed(0)
    config = ModelConfig(vocab_size=1024, dim=32, n_layers=1, n_heads=2, n_kv_heads=1)
    old, new = LilLM(config), LilLM(config)
    target = save_checkpoint(tmp_path / "ckpt", old, tokenizer_path, meta={"step": 1}, trainer_state={"step": 1})

    class Crash(RuntimeError):
        pass

    renames = []
    real_rename = os.rename

    def rename(src, dst):
        renames.append(src)
        if (crash_at == "first rename" and len(renames) == 1) or (crash_at == "second rename" and len(renames) == 2):
            raise Crash()
        real_rename(src, dst)

    def crash(*args, **kwargs):
        raise Crash()

    monkeypatch.setattr(ckpt_module.os, "rename", rename)
    if crash_at == "torch.save":
        monkeypatch.setattr(ckpt_module.torch, "save", crash)
    if crash_at == "fsync":
        monkeypatch.setattr(ckpt_module, "_fsync_tree", crash)
    with pytest.raises(Crash):
        save_checkpoint(target, new, tokenizer_path, meta={"step": 2}, trainer_state={"step": 2})
    monkeypatch.undo()

    loaded = load_checkpoint(target)  # falls back to ckpt.old when the crash hit between the renames
    assert loaded.meta == {"step": 1} and load_trainer_state(target, schema={"step": int})["step"] == 1
    for name, tensor in old.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], tensor), name
    save_checkpoint(target, new, tokenizer_path, meta={"step": 2})  # and the next save still works
    assert load_checkpoint(target).meta == {"step": 2} and not (tmp_path / "ckpt.old").exists()
