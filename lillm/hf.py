"""Export a RoPE LilLM to the Hugging Face `transformers` Llama format.

LilLM is a Llama-architecture model (pre-norm RMSNorm, half-split RoPE, GQA, SwiGLU, no biases), so its weights
map one to one onto `LlamaForCausalLM`. That makes the reference tests and benchmarks possible, and lets a trained
checkpoint be loaded by any tool that reads Llama checkpoints. `transformers` is optional: it is needed only to
build the model object, not to produce the config and state dict.
"""

from __future__ import annotations

import torch

from lillm.model import LilLM

# LilLM parameter name suffix -> Llama name suffix (per layer); the rest are renamed in llama_state_dict.
_LAYER_RENAMES = {
    "attn.q_proj": "self_attn.q_proj",
    "attn.k_proj": "self_attn.k_proj",
    "attn.v_proj": "self_attn.v_proj",
    "attn.o_proj": "self_attn.o_proj",
    "ffn.gate_proj": "mlp.gate_proj",
    "ffn.up_proj": "mlp.up_proj",
    "ffn.down_proj": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


def llama_config_dict(model: LilLM) -> dict:
    """The `LlamaConfig` fields equivalent to the model's ModelConfig."""
    c = model.config
    if c.pos_encoding != "rope":
        raise ValueError(f"only RoPE models map onto Llama; this one has pos_encoding={c.pos_encoding!r}")
    return dict(
        vocab_size=c.vocab_size,
        hidden_size=c.dim,
        intermediate_size=c.ffn_hidden,
        num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads,
        num_key_value_heads=c.n_kv_heads,
        head_dim=c.head_dim,
        max_position_embeddings=c.max_seq_len,
        rms_norm_eps=c.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
        tie_word_embeddings=c.tie_embeddings,
        attention_bias=False,
        mlp_bias=False,
        attention_dropout=c.dropout,
        hidden_act="silu",
        bos_token_id=None,
        eos_token_id=0,
        pad_token_id=1,
    )


def llama_state_dict(model: LilLM) -> dict[str, torch.Tensor]:
    """LilLM weights under Llama's parameter names."""
    out = {}
    for name, tensor in model.state_dict().items():
        if name.startswith("layers."):
            _, idx, rest = name.split(".", 2)
            module, leaf = rest.rsplit(".", 1)
            out[f"model.layers.{idx}.{_LAYER_RENAMES[module]}.{leaf}"] = tensor
        elif name == "lm_head.weight":
            out[name] = tensor
        else:  # embed_tokens.weight, norm.weight
            out[f"model.{name}"] = tensor
    return out


def to_hf_llama(model: LilLM) -> "transformers.LlamaForCausalLM":  # noqa: F821
    """A `transformers.LlamaForCausalLM` with the same weights (needs `pip install transformers`)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**llama_config_dict(model))
    hf = LlamaForCausalLM(config)
    missing, unexpected = hf.load_state_dict(llama_state_dict(model), strict=False)
    missing = [m for m in missing if not (config.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"weight mapping is incomplete: missing {missing}, unexpected {unexpected}")
    return hf.to(next(model.parameters()).device)
