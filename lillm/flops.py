"""Back-of-the-envelope accounting: parameters, training FLOPs per token, KV-cache memory, and MFU.

MFU (model FLOPs utilisation, PaLM appendix B) = achieved model FLOP/s / the accelerator's peak FLOP/s. It
counts the FLOPs the model needs, not the ones the hardware happened to do, so recomputation (activation
checkpointing) does not inflate it.
"""

from __future__ import annotations

import torch

from lillm.model import ModelConfig

# Dense (no sparsity) peak bf16 tensor-core FLOP/s from the vendors' data sheets. Matched in order against
# torch.cuda.get_device_name(), so more specific names come first ("H100 PCIe" before "H100", "A100" before "A10").
PEAK_BF16_FLOPS: dict[str, float] = {
    "B200": 2250e12,
    "H200": 989e12,
    "GH200": 989e12,
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H100": 989e12,  # SXM
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10": 125e12,
}


def count_parameters(config: ModelConfig, include_embedding: bool = True) -> int:
    """Closed-form parameter count; equals sum(p.numel()) of LilLM(config)."""
    d, hd = config.dim, config.head_dim
    attention = d * config.n_heads * hd + 2 * d * config.n_kv_heads * hd + config.n_heads * hd * d
    ffn = 3 * d * config.ffn_hidden
    norms = 2 * d
    per_layer = attention + ffn + norms
    total = config.n_layers * per_layer + d  # + final norm
    embedding = config.vocab_size * d
    head = 0 if config.tie_embeddings else config.vocab_size * d
    return total + head + (embedding if include_embedding else 0)


def matmul_parameters(config: ModelConfig) -> int:
    """Parameters that take part in a matrix multiply per token: every Linear, the output head included; not
    the embedding lookup (a gather) nor the norm gains (elementwise)."""
    d = config.dim
    norms = config.n_layers * 2 * d + d
    return count_parameters(config, include_embedding=False) - norms + config.vocab_size * d * config.tie_embeddings


def flops_per_token(config: ModelConfig, seq_len: int | None = None) -> float:
    """Training FLOPs per token (forward + backward = 3x forward): 6 per matmul parameter, plus attention's
    scores and weighted sum, 2 matmuls of T x head_dim per head and layer (12 * L * H * hd * T, counting the
    full T x T square as PaLM does, although causal masking could skip half)."""
    T = seq_len or config.max_seq_len
    attention = 12 * config.n_layers * config.n_heads * config.head_dim * T
    return 6 * matmul_parameters(config) + attention


def kv_cache_bytes_per_token(config: ModelConfig, bytes_per_value: int = 2) -> int:
    """Memory a KV cache needs per token of context: keys and values, per layer, per key/value head."""
    return 2 * config.n_layers * config.n_kv_heads * config.head_dim * bytes_per_value


def peak_flops(device: torch.device | str) -> float | None:
    """Peak dense bf16 FLOP/s of a CUDA device from the table above; None for CPUs, MPS and unknown GPUs."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_BF16_FLOPS.items():
        if key in name:
            return flops
    return None


def mfu(tokens_per_second: float, config: ModelConfig, seq_len: int, peak: float | None, n_devices: int = 1) -> float | None:
    """Fraction of the peak used by training at tokens_per_second (summed over n_devices); None without a peak."""
    if peak is None:
        return None
    return tokens_per_second * flops_per_token(config, seq_len) / (peak * n_devices)
