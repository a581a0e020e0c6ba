"""The LilLM transformer: a small Llama-style decoder-only language model.

Read top to bottom: ModelConfig -> RMSNorm -> rotary embeddings -> KVCache -> Attention (grouped-query)
-> SwiGLU -> Block -> LilLM. Module names follow the Llama convention (q_proj, gate_proj, ...) so that the
weights map one to one onto other Llama-style implementations.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


@dataclass
class ModelConfig:
    """Every hyper-parameter of the architecture, saved as config.json next to the weights."""

    vocab_size: int = 8192
    dim: int = 256  # width of the residual stream
    n_layers: int = 4
    n_heads: int = 8  # query heads
    n_kv_heads: int = 4  # key/value heads; n_heads must be a multiple (GQA; == n_heads is plain MHA)
    ffn_hidden: int | None = None  # SwiGLU hidden size; None -> about 8/3 * dim, rounded up to 32
    max_seq_len: int = 256  # context length the model is trained for
    pos_encoding: str = "rope"  # "rope" (rotary) or "nope" (no positional information at all)
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    dropout: float = 0.0
    tie_embeddings: bool = True  # share the input embedding matrix with the output head

    def __post_init__(self) -> None:
        if self.ffn_hidden is None:
            self.ffn_hidden = 32 * math.ceil(8 * self.dim / 3 / 32)
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        if self.dim % self.n_heads:
            raise ValueError(f"ModelConfig: dim={self.dim} is not divisible by n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"ModelConfig: n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads} "
                "(each key/value head must serve the same number of query heads)"
            )
        if self.pos_encoding not in ("rope", "nope"):
            raise ValueError(f"ModelConfig.pos_encoding must be 'rope' or 'nope', got {self.pos_encoding!r}")
        if self.pos_encoding == "rope" and self.head_dim % 2:
            raise ValueError(f"ModelConfig: rotary embeddings need an even head_dim, got {self.head_dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"ModelConfig.dropout must be in [0, 1), got {self.dropout!r}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"ModelConfig: unknown field(s) {unknown}; known fields are {sorted(known)}")
        return cls(**d)


class RMSNorm(nn.Module):
    """Scale each vector to unit root-mean-square, then by a learned gain. Cheaper than LayerNorm (no mean,
    no bias) and works as well in practice. Computed in float32 so bf16 activations do not lose precision."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoPE, Su et al. 2021). Pairs of channels are rotated by an angle that grows
    with the position, so the dot product of a query and a key depends only on their distance. No learned
    parameters; the cos/sin table is a non-saved buffer that grows on demand (for longer-than-trained inputs)."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def _apply(self, fn, recurse: bool = True):
        """Follow the model to its device but never to a lower precision: inv_freq in bf16 (8 mantissa bits)
        turns position 1000's angles wrong by tenths of a radian. model.to(torch.bfloat16) casts every floating
        buffer, so the float32 values are put back after any move or cast."""
        inv_freq = self.inv_freq
        super()._apply(fn, recurse)
        self.inv_freq = inv_freq.to(self.inv_freq.device)  # same values, float32, on the new device
        return self

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of shape (len(positions), head_dim), float32, for the given integer positions. Angles are
        float32 whatever the model's dtype (apply_rotary casts the rotated result back)."""
        angles = positions.float()[:, None] * self.inv_freq[None, :]
        angles = torch.cat((angles, angles), dim=-1)  # channel i and i + head_dim/2 share an angle
        return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x of shape (B, heads, T, head_dim): the first half of the channels pairs with the second half."""
    half = x.shape[-1] // 2
    rotated_half = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos + rotated_half * sin).type_as(x)


class KVCache:
    """Keys and values of every layer for the tokens seen so far, so that decoding a new token costs one
    token's worth of compute instead of re-running the whole prefix. Pre-allocated to max_len positions."""

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        shape = (config.n_layers, batch_size, config.n_kv_heads, max_len, config.head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.length = 0  # number of positions already stored

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new keys/values of one layer after the cached ones; return all of them."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KVCache is full: {end} positions needed, only {self.max_len} allocated")
        self.keys[layer, :, :, self.length : end] = k
        self.values[layer, :, :, self.length : end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def advance(self, n: int) -> None:
        """Called once all layers have stored the n new positions."""
        self.length += n

    def rows(self, index: torch.Tensor, extra_positions: int) -> KVCache:
        """A new cache holding the batch rows `index` of this one (a row may repeat) with room for
        extra_positions more: several continuations of one cached prefix, e.g. the choices of a question."""
        def pick(t: torch.Tensor) -> torch.Tensor:
            picked = t[:, index, :, : self.length]
            room = picked.new_zeros((*picked.shape[:3], extra_positions, picked.shape[4]))
            return torch.cat([picked, room], dim=3)

        out = copy.copy(self)
        out.keys, out.values = pick(self.keys), pick(self.values)
        out.max_len = self.length + extra_positions
        return out

    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes


class Attention(nn.Module):
    """Causal self-attention with grouped-query attention (GQA, Ainslie et al. 2023): n_heads query heads
    share n_kv_heads key/value heads, which shrinks the KV cache by n_heads / n_kv_heads."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.dropout = config.dropout
        self.q_proj = nn.Linear(config.dim, config.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.dim, config.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.dim, config.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(config.n_heads * self.head_dim, config.dim, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        mask: torch.Tensor | None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """x: (B, T, dim). mask: None means plain causal; else a bool (B or 1, 1, T, T_keys), True = may attend."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        dropout = self.dropout if self.training else 0.0
        y = grouped_attention(q, k, v, mask, dropout, expand_kv=needs_expanded_kv(q, mask, self.n_heads != self.n_kv_heads))
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


def needs_expanded_kv(q: torch.Tensor, mask: torch.Tensor | None, grouped: bool) -> bool:
    """Should K/V heads be repeated before SDPA? On CUDA, SDPA runs grouped heads (enable_gqa) only in the flash
    kernel, which needs fp16/bf16 and no explicit mask; fp32 (--dtype fp32) or a mask (padding, a cached prefix)
    would fall back to the math kernel, which materialises the whole attention matrix (gigabytes at T=1024).
    Repeated heads let the memory-efficient kernel take those cases. CPU kernels handle grouped heads directly."""
    return grouped and q.is_cuda and (mask is not None or q.dtype == torch.float32)


def grouped_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, dropout: float, expand_kv: bool
) -> torch.Tensor:
    """softmax(q k^T / sqrt(head_dim) + mask) v for q (B, H, T, hd) and k, v (B, H_kv, T_keys, hd), each kv head
    serving H / H_kv query heads. mask None: causal when T > 1; a single query (decoding one unpadded token)
    sees every key, cached ones included, so it needs no mask at all (and stays on the fast kernels)."""
    group = q.shape[1] // k.shape[1]
    if expand_kv and group > 1:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=mask is None and q.shape[2] > 1, dropout_p=dropout,
        enable_gqa=group > 1 and not expand_kv,
    )


class SwiGLU(nn.Module):
    """Gated feed-forward (Shazeer 2020): down(silu(gate(x)) * up(x)). The gate lets each hidden unit switch
    its own input on or off, which trains better than a plain ReLU/GELU MLP of the same parameter count."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """One transformer layer, pre-norm: x + attn(norm(x)), then x + ffn(norm(x)). Normalising the input of
    each branch (not the residual stream itself) keeps a clean identity path, which makes deep stacks stable."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = RMSNorm(config.dim, config.norm_eps)
        self.attn = Attention(config, layer_idx)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn = SwiGLU(config.dim, config.ffn_hidden)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, rope, mask, cache=None) -> torch.Tensor:
        x = x + self.resid_dropout(self.attn(self.attn_norm(x), rope, mask, cache))
        return x + self.resid_dropout(self.ffn(self.ffn_norm(x)))


class LilLM(nn.Module):
    """Token embedding -> n_layers Blocks -> RMSNorm -> linear head over the vocabulary.

    Initialisation: every weight matrix ~ N(0, 0.02); the two projections that write into the residual
    stream (o_proj, down_proj) are scaled by 1/sqrt(2 * n_layers) so the stream's variance does not grow with
    depth (GPT-2); RMSNorm gains start at 1.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta) if config.pos_encoding == "rope" else None
        self.gradient_checkpointing = False  # recompute each Block in backward to save activation memory
        self.apply(self._init_weights)
        residual_std = 0.02 / math.sqrt(2 * config.n_layers)
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=residual_std)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor | None = None,
        loss_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        attention_mask: torch.Tensor | None = None,
        last_only: bool = False,
        logits_at: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """input_ids (B, T) -> logits (B, T, vocab) and, when targets (B, T) are given, the mean cross-entropy
        over positions where loss_mask (B, T) is nonzero (all positions if None; targets of -100 are ignored).

        cache: continue from the positions already in the KV cache (decoding). attention_mask (B, T_keys)
        marks real tokens (True) vs padding (False) over all keys, cached ones included.
        last_only: logits (B, 1, vocab) of the last position alone: a prompt's prefill needs nothing else, and
        the head is the largest matmul of a small model with a big vocabulary.
        logits_at: a bool (B, T) mask; logits (N, vocab) of its N True positions alone, row by row (scoring
        multiple-choice answers needs only theirs, not the padding's).
        """
        if (last_only or logits_at is not None) and targets is not None:
            raise ValueError("last_only / logits_at compute some positions' logits; they cannot give a loss over all targets")
        B, T = input_ids.shape
        start = cache.length if cache is not None else 0
        positions = torch.arange(start, start + T, device=input_ids.device)  # from Python ints: no device sync
        rope = self.rotary(positions) if self.rotary is not None else None
        # No mask when causal order alone decides: a fresh sequence, or one new token after the cache.
        needs_mask = attention_mask is not None or (start > 0 and T > 1)
        mask = self._attention_mask(positions, start + T, attention_mask) if needs_mask else None

        x = self.dropout(self.embed_tokens(input_ids))
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(layer, x, rope, mask, cache, use_reentrant=False)
            else:
                x = layer(x, rope, mask, cache)
        if cache is not None:
            cache.advance(T)
        if last_only:
            x = x[:, -1:]
        elif logits_at is not None:
            x = x[logits_at]
        logits = self.lm_head(self.norm(x))

        if targets is None:
            return logits, None
        per_token = F.cross_entropy(
            logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100, reduction="none"
        )
        weights = (targets.reshape(-1) != -100).float()
        if loss_mask is not None:
            weights = weights * loss_mask.reshape(-1).float()
        return logits, (per_token * weights).sum() / weights.sum().clamp(min=1.0)

    @staticmethod
    def _attention_mask(positions: torch.Tensor, n_keys: int, key_is_real: torch.Tensor | None) -> torch.Tensor:
        """Bool mask (B or 1, 1, T, n_keys): a query sees keys at or before its position that are not padding.
        A query always sees itself, so a padding query never has an all-masked row (which would give NaN)."""
        key_positions = torch.arange(n_keys, device=positions.device)
        causal = key_positions[None, :] <= positions[:, None]  # (T, T_keys)
        if key_is_real is None:
            return causal[None, None]
        is_self = key_positions[None, :] == positions[:, None]
        return causal[None, None] & (key_is_real[:, None, None, :].bool() | is_self[None, None])

    def num_parameters(self) -> int:
        """Unique parameters (a tied embedding/head matrix counts once)."""
        return sum(p.numel() for p in self.parameters())
