"""Closed-form accounting against counts taken from a real model: parameters from its modules, FLOPs measured by
PyTorch's FlopCounterMode on a real forward and backward pass, KV-cache bytes from a real allocation."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from lillm.flops import (
    PEAK_BF16_FLOPS,
    count_parameters,
    flops_per_token,
    kv_cache_bytes_per_token,
    matmul_parameters,
    mfu,
    peak_flops,
    peak_flops_for_name,
)
from lillm.model import KVCache, LilLM, ModelConfig


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"tie_embeddings": False},
        {"n_kv_heads": 1, "ffn_hidden": 100},
        {"n_heads": 8, "n_kv_heads": 8, "n_layers": 3, "pos_encoding": "nope"},
    ],
)
def test_parameter_count_formula(overrides):
    cfg = ModelConfig(**{**dict(vocab_size=101, dim=64, n_layers=2, n_heads=4, n_kv_heads=2), **overrides})
    model = LilLM(cfg)
    assert count_parameters(cfg) == sum(p.numel() for p in model.parameters())
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert matmul_parameters(cfg) == linear  # the head counts once as a matmul even when tied


@pytest.mark.parametrize(
    "overrides, seq_len",
    [
        ({}, 64),
        ({}, 16),  # attention's share changes with the context; the matmul share does not
        ({"tie_embeddings": False}, 32),
        ({"n_kv_heads": 1, "ffn_hidden": 100, "n_layers": 3}, 48),
        ({"n_heads": 8, "n_kv_heads": 8, "pos_encoding": "nope"}, 32),
    ],
)
def test_flops_per_token_equal_flop_counter_measurement(overrides, seq_len):
    """flops_per_token x tokens == the FLOPs PyTorch counts in one training step (forward + backward). SDPA runs
    on its math backend, whose matmuls the counter sees (it does not count the fused CPU kernel); that path computes
    the full T x T square, the convention flops_per_token documents."""
    cfg = ModelConfig(**{**dict(vocab_size=300, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64), **overrides})
    torch.manual_seed(0)
    model = LilLM(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, seq_len))
    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter:
        _, loss = model(ids, ids)
        loss.backward()
    assert counter.get_total_flops() == flops_per_token(cfg, seq_len) * ids.numel()


def test_kv_cache_bytes_match_allocation():
    cfg = ModelConfig(vocab_size=50, dim=64, n_layers=3, n_heads=8, n_kv_heads=2)
    cache = KVCache(cfg, batch_size=1, max_len=100, dtype=torch.bfloat16)
    assert cache.nbytes() == 100 * kv_cache_bytes_per_token(cfg, bytes_per_value=2)
    mha = ModelConfig(vocab_size=50, dim=64, n_layers=3, n_heads=8, n_kv_heads=8)
    assert kv_cache_bytes_per_token(mha) == 4 * kv_cache_bytes_per_token(cfg)  # GQA saves n_heads/n_kv_heads


def test_mfu():
    cfg = ModelConfig(vocab_size=1000, dim=128, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=256)
    assert peak_flops("cpu") is None
    assert mfu(1e5, cfg, 256, peak=None) is None
    assert mfu(1e5, cfg, 256, peak=1e15, n_devices=2) == pytest.approx(1e5 * flops_per_token(cfg) / 2e15)


@pytest.mark.parametrize(
    "name, tflops",
    [
        ("NVIDIA H200", 989.4),  # SXM
        ("NVIDIA H200 NVL", 835.5),  # not the SXM peak although the name starts the same
        ("NVIDIA H100 80GB HBM3", 989.4),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H100 NVL", 835.5),
        ("NVIDIA H800", 989.4),
        ("NVIDIA A800-SXM4-80GB", 312.0),
        ("NVIDIA A100-SXM4-40GB", 312.0),
        ("NVIDIA L40S", 362.05),
        ("NVIDIA L40", 181.05),  # not the L4's 121
        ("NVIDIA L4", 121.0),
        ("NVIDIA A10", 125.0),
    ],
)
def test_peak_table_matches_device_names_exactly(name, tflops):
    assert peak_flops_for_name(name) == pytest.approx(tflops * 1e12)


@pytest.mark.parametrize("name", ["NVIDIA A10G", "NVIDIA H100", "Tesla T4", "NVIDIA GeForce RTX 4090", "H200", ""])
def test_unknown_gpu_has_no_peak(name):
    """A name the table does not hold gives no MFU rather than the peak of a GPU whose name it contains."""
    assert peak_flops_for_name(name) is None

