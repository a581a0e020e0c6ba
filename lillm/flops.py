"""Back-of-the-envelope accounting: parameters, training FLOPs per token, KV-cache memory, and MFU.

MFU (model FLOPs utilisation, PaLM appendix B) = achieved model FLOP/s / the accelerator's peak FLOP/s. It
counts the FLOPs the model needs, not the ones the hardware happened to do, so recomputation (activation
checkpointing) does not inflate it.
"""

from __future__ import annotations

import torch

from lillm.model import ModelConfig

# Dense (no sparsity) peak bf16 tensor-core FLOP/s per GPU, keyed by the exact name torch.cuda.get_device_name()
# reports. Exact keys, not substrings: "NVIDIA L40" is not an "NVIDIA L4", an H200 NVL is not an H200 SXM.
# Sources: NVIDIA's data sheets, which quote bf16 "with sparsity"; the dense peak is half of that figure.
H100_SXM, H100_PCIE, H100_NVL = 989.4e12, 756.0e12, 835.5e12  # H100 data sheet: 1,979 / 1,513 / 1,671 TFLOPS sparse
H200_SXM, H200_NVL = 989.4e12, 835.5e12  # H200 data sheet: 1,979 (SXM) / 1,671 (NVL) TFLOPS sparse
A100 = 312.0e12  # A100 data sheet: 312 TFLOPS dense (624 sparse), SXM4 and PCIe alike
PEAK_BF16_FLOPS: dict[str, float] = {
    "NVIDIA B200": 2250e12,  # HGX B200 data sheet: 36 PFLOPS sparse for 8 GPUs -> 4.5 sparse, 2.25 dense each
    "NVIDIA H200": H200_SXM,
    "NVIDIA H200 NVL": H200_NVL,
    "NVIDIA GH200 480GB": 989.4e12,  # GH200 data sheet: the same Hopper GPU as H100 SXM (1,979 sparse)
    "NVIDIA H100 80GB HBM3": H100_SXM,  # how the SXM5 board names itself
    "NVIDIA H100 PCIe": H100_PCIE,
    "NVIDIA H100 NVL": H100_NVL,
    "NVIDIA H800": H100_SXM,  # H800 SXM5 data sheet: H100 SXM's tensor cores with less NVLink bandwidth
    "NVIDIA H800 PCIe": H100_PCIE,  # H800 PCIe data sheet: 1,513 TFLOPS sparse, like H100 PCIe
    "NVIDIA A100-SXM4-40GB": A100,
    "NVIDIA A100-SXM4-80GB": A100,
    "NVIDIA A100-PCIE-40GB": A100,
    "NVIDIA A100 80GB PCIe": A100,
    "NVIDIA A800-SXM4-80GB": A100,  # A800 data sheet: A100's compute with less interconnect bandwidth
    "NVIDIA A800 80GB PCIe": A100,
    "NVIDIA L40S": 362.05e12,  # L40S data sheet: 362.05 dense (733 sparse)
    "NVIDIA L40": 181.05e12,  # L40 data sheet: 181.05 dense (362.1 sparse)
    "NVIDIA L4": 121.0e12,  # L4 data sheet: 121 dense (242 sparse)
    "NVIDIA A10": 125.0e12,  # A10 data sheet: 125 dense (250 sparse)
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


def peak_flops_for_name(device_name: str) -> float | None:
    """Peak dense bf16 FLOP/s of the GPU named exactly device_name; None for a name the table does not hold."""
    return PEAK_BF16_FLOPS.get(device_name.strip())


def peak_flops(device: torch.device | str) -> float | None:
    """Peak dense bf16 FLOP/s of a CUDA device from the table above; None for CPUs, MPS and unknown GPUs
    (MFU is then not reported rather than computed against a guessed peak)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return peak_flops_for_name(torch.cuda.get_device_name(device))


def mfu(tokens_per_second: float, config: ModelConfig, seq_len: int, peak: float | None, n_devices: int = 1) -> float | None:
    """Fraction of the peak used by training at tokens_per_second (summed over n_devices); None without a peak."""
    if peak is None:
        return None
    return tokens_per_second * flops_per_token(config, seq_len) / (peak * n_devices)
