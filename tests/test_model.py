"""The model's pieces against independent references, and its end-to-end properties."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lillm.model import Attention, KVCache, LilLM, ModelConfig, RMSNorm, RotaryEmbedding, apply_rotary

TINY = dict(vocab_size=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32)


def tiny_model(seed: int = 0, **overrides) -> LilLM:
    torch.manual_seed(seed)
    return LilLM(ModelConfig(**{**TINY, **overrides})).eval()


def reference_attention(attn: Attention, x: torch.Tensor, cos=None, sin=None) -> torch.Tensor:
    """Textbook causal attention, written independently of lillm: explicit repeat of k/v heads, explicit
    softmax(QK^T / sqrt(d) + causal mask) V."""
    B, T, _ = x.shape
    hd = attn.head_dim
    q = (x @ attn.q_proj.weight.T).view(B, T, attn.n_heads, hd).transpose(1, 2)
    k = (x @ attn.k_proj.weight.T).view(B, T, attn.n_kv_heads, hd).transpose(1, 2)
    v = (x @ attn.v_proj.weight.T).view(B, T, attn.n_kv_heads, hd).transpose(1, 2)
    if cos is not None:
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    group = attn.n_heads // attn.n_kv_heads
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = q @ k.transpose(-2, -1) / math.sqrt(hd)
    scores = scores.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
    y = scores.softmax(-1) @ v
    return y.transpose(1, 2).reshape(B, T, -1) @ attn.o_proj.weight.T


def test_rmsnorm_equals_torch():
    torch.manual_seed(0)
    ours, ref = RMSNorm(48, eps=1e-6), torch.nn.RMSNorm(48, eps=1e-6)
    with torch.no_grad():
        ours.weight.normal_()
        ref.weight.copy_(ours.weight)
    x = torch.randn(3, 7, 48) * 5
    torch.testing.assert_close(ours(x), ref(x), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
def test_attention_matches_reference(n_kv_heads):
    """n_kv_heads == n_heads is plain multi-head attention; fewer is GQA (2) or multi-query (1)."""
    torch.manual_seed(0)
    cfg = ModelConfig(**{**TINY, "n_kv_heads": n_kv_heads})
    attn = Attention(cfg, layer_idx=0)
    x = torch.randn(2, 11, cfg.dim)
    rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)
    cos, sin = rotary(torch.arange(11))
    torch.testing.assert_close(attn(x, None, None), reference_attention(attn, x), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(
        attn(x, (cos, sin), None), reference_attention(attn, x, cos, sin), atol=1e-5, rtol=1e-4
    )


def test_rope_preserves_norm_and_depends_on_relative_position():
    torch.manual_seed(0)
    head_dim = 16
    rotary = RotaryEmbedding(head_dim, theta=10000.0)
    q, k = torch.randn(head_dim), torch.randn(head_dim)

    def rotate(vec: torch.Tensor, pos: int) -> torch.Tensor:
        cos, sin = rotary(torch.tensor([pos]))
        return apply_rotary(vec.view(1, 1, 1, -1), cos, sin).view(-1)

    for pos in (0, 1, 17, 1000):
        torch.testing.assert_close(rotate(q, pos).norm(), q.norm(), atol=1e-5, rtol=1e-5)
    dots = [rotate(q, m) @ rotate(k, m - 5) for m in (5, 12, 40, 300)]  # all at distance 5
    for d in dots[1:]:
        torch.testing.assert_close(d, dots[0], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(rotate(q, 12) @ rotate(k, 7), rotate(q, 12) @ rotate(k, 9), atol=1e-3)


@pytest.mark.parametrize("pos_encoding", ["rope", "nope"])
def test_causality(pos_encoding):
    model = tiny_model(pos_encoding=pos_encoding)
    x = torch.randint(0, TINY["vocab_size"], (2, 20))
    changed = x.clone()
    changed[:, 12:] = (changed[:, 12:] + 1) % TINY["vocab_size"]
    logits, _ = model(x)
    logits_changed, _ = model(changed)
    torch.testing.assert_close(logits[:, :12], logits_changed[:, :12], atol=0, rtol=0)
    assert (logits[:, 12:] - logits_changed[:, 12:]).abs().max() > 1e-3


def test_nope_has_no_positional_parameters_or_buffers():
    nope, rope = tiny_model(pos_encoding="nope"), tiny_model(pos_encoding="rope")
    assert nope.rotary is None
    assert not [n for n, _ in nope.named_buffers()]
    assert nope.num_parameters() == rope.num_parameters()  # RoPE adds no parameters either
    assert [n for n, _ in rope.named_buffers()] == ["rotary.inv_freq"]
    assert "rotary.inv_freq" not in rope.state_dict()  # not saved: it is a function of the config


@pytest.mark.parametrize("pos_encoding", ["rope", "nope"])
def test_kv_cache_decoding_equals_full_forward(pos_encoding):
    model = tiny_model(pos_encoding=pos_encoding)
    x = torch.randint(0, TINY["vocab_size"], (3, 24))
    with torch.no_grad():
        full, _ = model(x)
        cache = KVCache(model.config, batch_size=3, max_len=24)
        prefill, _ = model(x[:, :9], cache=cache)  # a prompt, then one token at a time
        steps = [model(x[:, t : t + 1], cache=cache)[0] for t in range(9, 24)]
    torch.testing.assert_close(torch.cat([prefill, *steps], dim=1), full, atol=1e-5, rtol=0)
    assert cache.length == 24


def test_last_only_gives_the_last_positions_logits():
    """Prefill with a cache and a padding mask: the head on the last position alone == the full logits' last row."""
    model = tiny_model()
    x = torch.randint(2, TINY["vocab_size"], (2, 12))
    real = torch.ones(2, 12, dtype=torch.bool)
    real[1, :5] = False
    with torch.no_grad():
        full, _ = model(x, cache=KVCache(model.config, 2, 16), attention_mask=real)
        last, _ = model(x, cache=KVCache(model.config, 2, 16), attention_mask=real, last_only=True)
    assert last.shape == (2, 1, TINY["vocab_size"])
    torch.testing.assert_close(last, full[:, -1:], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="last_only"):
        model(x, targets=x, last_only=True)


def test_logits_at_gives_the_chosen_positions_logits_in_row_order():
    model = tiny_model()
    x = torch.randint(2, TINY["vocab_size"], (3, 10))
    wanted = torch.rand(3, 10) < 0.4
    wanted[1] = False  # a row with no position at all
    wanted[2, -1] = True
    with torch.no_grad():
        full, _ = model(x)
        picked, _ = model(x, logits_at=wanted)
    rows, cols = wanted.nonzero(as_tuple=True)
    assert picked.shape == (int(wanted.sum()), TINY["vocab_size"])
    torch.testing.assert_close(picked, full[rows, cols], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="logits_at"):
        model(x, targets=x, logits_at=wanted)


def test_kv_cache_overflow_is_a_clear_error():
    model = tiny_model()
    cache = KVCache(model.config, batch_size=1, max_len=4)
    with pytest.raises(ValueError, match="KVCache is full"):
        model(torch.zeros(1, 5, dtype=torch.long), cache=cache)


def test_padding_mask_leaves_real_tokens_unchanged():
    """A left-padded row gives the same logits on its real tokens as the unpadded sequence under NoPE (where
    only the visible tokens matter); under RoPE only relative positions matter, so the same holds."""
    for pos_encoding in ("nope", "rope"):
        model = tiny_model(pos_encoding=pos_encoding)
        x = torch.randint(2, TINY["vocab_size"], (1, 10))
        padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), x], dim=1)
        real = torch.cat([torch.zeros(1, 4, dtype=torch.bool), torch.ones(1, 10, dtype=torch.bool)], dim=1)
        with torch.no_grad():
            ref, _ = model(x)
            out, _ = model(padded, attention_mask=real)
        torch.testing.assert_close(out[:, 4:], ref, atol=1e-5, rtol=1e-4)
        assert torch.isfinite(out).all()


def test_loss_mask_excludes_positions():
    model = tiny_model()
    x = torch.randint(0, TINY["vocab_size"], (2, 16))
    y = torch.randint(0, TINY["vocab_size"], (2, 16))
    mask = torch.zeros(2, 16)
    mask[0, 3:9] = 1
    mask[1, 10:] = 1
    logits, loss = model(x, y, loss_mask=mask)
    per_token = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1), reduction="none")
    expected = per_token[mask.view(-1) == 1].mean()
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-6)
    y_changed = y.clone()
    y_changed[mask == 0] = (y_changed[mask == 0] + 1) % TINY["vocab_size"]  # targets outside the mask
    torch.testing.assert_close(model(x, y_changed, loss_mask=mask)[1], loss, atol=0, rtol=0)


def test_config_validation_messages():
    with pytest.raises(ValueError, match="n_heads=6 is not divisible by n_kv_heads=4"):
        ModelConfig(dim=48, n_heads=6, n_kv_heads=4)
    with pytest.raises(ValueError, match="pos_encoding"):
        ModelConfig(pos_encoding="alibi")
    with pytest.raises(ValueError, match="unknown field"):
        ModelConfig.from_dict({"dim": 64, "n_layer": 2})
    cfg = ModelConfig(**TINY)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


def test_tied_embeddings_share_one_matrix():
    tied, untied = tiny_model(tie_embeddings=True), tiny_model(tie_embeddings=False)
    assert tied.lm_head.weight is tied.embed_tokens.weight
    assert untied.num_parameters() - tied.num_parameters() == TINY["vocab_size"] * TINY["dim"]


def test_tiny_model_overfits_one_batch():
    model = tiny_model(n_layers=2).train()
    torch.manual_seed(1)
    batch = torch.randint(0, TINY["vocab_size"], (4, 17))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        _, loss = model(batch[:, :-1], batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1


def test_gradient_checkpointing_gives_same_gradients():
    model = tiny_model().train()
    x = torch.randint(0, TINY["vocab_size"], (2, 12))
    _, loss = model(x[:, :-1], x[:, 1:])
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.gradient_checkpointing = True
    _, loss2 = model(x[:, :-1], x[:, 1:])
    loss2.backward()
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(p.grad, g, atol=1e-6, rtol=1e-5)
