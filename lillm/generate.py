"""Text generation: sampling rules on logits, KV-cache decoding, streaming text, chat replies.

Read top to bottom: the pure sampling functions (repetition penalty -> temperature -> top-k -> top-p -> draw),
then the decoding loop (prefill the prompt once, then one token per step from the KV cache), then the text and
chat layers on top of it.

Context window: positions never go past the model's max_seq_len (RoPE was only trained that far and the KV
cache is allocated to it). A prompt longer than max_seq_len - 1 keeps its last max_seq_len - 1 tokens, and
generation stops when the window is full (stop_reason "context"). Chat prompts are fitted first by dropping
the oldest whole turns (`fit_chat_to_context`), so the system message is never the part that gets cut.
"""

from __future__ import annotations

import codecs
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace

import torch

from lillm.chat import DEFAULT_SYSTEM_PROMPT, render
from lillm.checkpoint import Checkpoint, load_checkpoint
from lillm.devices import resolve_device, resolve_dtype
from lillm.model import KVCache, LilLM
from lillm.tokenizer import _BYTE_TO_CHAR, BPETokenizer, special_tokens

# ---------------------------------------------------------------------------------------------- sampling rules
# Each takes logits of shape (V,) or (B, V) and returns new logits of the same shape; none modifies its input.


def apply_repetition_penalty(logits: torch.Tensor, previous_ids, penalty: float) -> torch.Tensor:
    """CTRL's penalty (Keskar et al. 2019): make every token already present less likely. Positive logits are
    divided by `penalty`, negative ones multiplied, so the token loses probability either way (penalty > 1).
    previous_ids: (L,) for 1-D logits, (B, L) for batched ones; repeated ids are penalised once."""
    if penalty == 1.0:
        return logits
    ids = torch.as_tensor(previous_ids, dtype=torch.long, device=logits.device)
    scores = logits.gather(-1, ids)
    scores = torch.where(scores > 0, scores / penalty, scores * penalty)
    return logits.scatter(-1, ids, scores)


def apply_no_repeat_ngram(logits: torch.Tensor, generated: torch.Tensor, n: int) -> torch.Tensor:
    """Forbid every token that would repeat an n-gram the reply already holds ("jump and jump and jump"), for
    (B, V) logits and the (B, m) ids generated so far. Only the reply counts, not the prompt, so words an
    instruction asks for can still be copied. n <= 0 means off; vectorised, so no host sync."""
    if n <= 0 or generated.size(1) < n:
        return logits
    grams = generated.unfold(1, n, 1)  # (B, m - n + 1, n)
    repeats = (grams[:, :, :-1] == generated[:, None, generated.size(1) - n + 1 :]).all(-1)  # prefix = reply's tail
    hits = torch.zeros(logits.shape, device=logits.device).scatter_add(-1, grams[:, :, -1], repeats.float())
    return logits.masked_fill(hits > 0, float("-inf"))


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits (and any tied with the k-th), set the rest to -inf. k <= 0 means off."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth_largest = logits.topk(k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth_largest, float("-inf"))


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus sampling (Holtzman et al. 2019): keep the smallest set of most probable tokens whose total
    probability is >= p, set the rest to -inf. The most probable token always stays. p >= 1 means off."""
    if p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of the strictly more likely tokens
    drop_sorted = mass_before >= p  # the set already reached p without this token
    drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


def sample_next(
    logits: torch.Tensor,
    temperature: float,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The next token id(s), shape logits.shape[:-1]. temperature 0 is greedy (argmax, top-k/top-p unused);
    otherwise logits / temperature, then top-k, then top-p, then one draw from the softmax."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = apply_top_p(apply_top_k(logits.float() / temperature, top_k), top_p)
    probs = logits.softmax(dim=-1).reshape(-1, logits.shape[-1])
    return torch.multinomial(probs, 1, generator=generator).reshape(logits.shape[:-1])


class GenerationError(ValueError):
    """The model cannot be sampled from (its logits are NaN or infinite): reported in one line, not a torch crash."""


BAD_LOGITS = -1  # the id _decode_steps yields for a row whose logits are not finite


def _check_token(token: int) -> int:
    if token == BAD_LOGITS:
        raise GenerationError("the model's logits are NaN or infinite: its weights are damaged (NaN/inf in "
                              "model.safetensors) or overflow in this dtype; check the checkpoint or try --dtype fp32")
    return token


@dataclass
class SamplingConfig:
    temperature: float = 0.8  # 0 = greedy
    top_k: int = 50  # 0 = off
    top_p: float = 0.95  # 1.0 = off
    repetition_penalty: float = 1.0  # 1.0 = off
    no_repeat_ngram: int = 0  # 0 = off; n: never repeat an n-gram of the reply
    max_new_tokens: int = 256
    # Generation ends at these (they are not returned). None: not chosen yet; the text and chat functions fill
    # in the tokenizer's <|im_end|> and <|endoftext|> (`with_stops`), the id-level ones refuse to guess.
    stop_ids: tuple[int, ...] | None = None
    seed: int | None = None  # fixed seed -> the same sample every time

    def __post_init__(self) -> None:
        checks = {
            "temperature": self.temperature >= 0,
            "top_k": isinstance(self.top_k, int) and self.top_k >= 0,
            "top_p": 0 < self.top_p <= 1,
            "repetition_penalty": self.repetition_penalty > 0,
            "no_repeat_ngram": isinstance(self.no_repeat_ngram, int) and self.no_repeat_ngram >= 0,
            "max_new_tokens": isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1,
        }
        rules = {"temperature": ">= 0", "top_k": "an integer >= 0", "top_p": "in (0, 1]",
                 "repetition_penalty": "> 0", "no_repeat_ngram": "an integer >= 0", "max_new_tokens": "an integer >= 1"}
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"{name} must be {rules[name]}, got {getattr(self, name)!r}")
        if self.stop_ids is not None:
            self.stop_ids = tuple(int(i) for i in self.stop_ids)

    def with_stops(self, tokenizer) -> SamplingConfig:
        """This config, stopping at the tokenizer's end-of-turn and end-of-text tokens unless stops were chosen."""
        if self.stop_ids is not None:
            return self
        return replace(self, stop_ids=special_tokens(tokenizer).chat_stop_ids)

    def checked_stop_ids(self) -> tuple[int, ...]:
        if self.stop_ids is None:
            raise ValueError("SamplingConfig.stop_ids is not set: use cfg.with_stops(tokenizer), or stop_ids=() for none")
        return self.stop_ids


@dataclass
class GenerationStats:
    """Filled in while generate_ids runs, so a caller can show progress and speed mid-stream."""

    prompt_tokens: int = 0  # after cropping to the context window
    new_tokens: int = 0
    seconds: float = 0.0  # wall time since the call started (prefill included)
    stop_reason: str | None = None  # "stop" (a stop id), "max_new_tokens" or "context" (window full)

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


# ---------------------------------------------------------------------------------------------- decoding loop


@torch.no_grad()
def _last_logits(model: LilLM, ids: torch.Tensor, cache: KVCache | None, attention_mask: torch.Tensor | None):
    """Float logits of the last position. no_grad is applied per call, not around the generator: grad mode is
    thread-local, and a server may resume a generator on a different thread at every step."""
    logits, _ = model(ids, cache=cache, attention_mask=attention_mask, last_only=True)
    return logits[:, -1].float()


def _decode_steps(model: LilLM, prompts: Sequence[Sequence[int]], cfg: SamplingConfig, use_cache: bool, budget: int):
    """Yield the (B,) ids chosen at each of up to `budget` steps, for left-padded prompts decoded together.
    The caller reads the ids (its one host sync per token) and stops iterating once every row has stopped.
    Padding repeats each row's first token: it is masked out, so its value never matters, and it is an id the
    vocabulary surely has."""
    device = next(model.parameters()).device
    longest = max(len(p) for p in prompts)
    tokens = torch.tensor([[p[0]] * (longest - len(p)) + list(p) for p in prompts], device=device)
    is_real = torch.tensor([[False] * (longest - len(p)) + [True] * len(p) for p in prompts], device=device)
    padded = any(len(p) < longest for p in prompts)  # from Python lengths, not a device read
    generator = torch.Generator(device=device).manual_seed(cfg.seed) if cfg.seed is not None else None
    cache = None
    if use_cache:
        dtype = next(model.parameters()).dtype
        cache = KVCache(model.config, len(prompts), longest + budget, device=device, dtype=dtype)

    step_input = tokens  # the cache path feeds the whole prompt once, then only the newest token
    for _ in range(budget):
        logits = _last_logits(model, step_input if use_cache else tokens, cache, is_real if padded else None)
        # NaN/inf logits (damaged weights, overflow) would crash torch.multinomial or make argmax pick garbage:
        # such a row yields BAD_LOGITS instead, found when the caller reads the ids (no extra host sync). Checked
        # on the model's own logits: the rules below may set some to -inf on purpose.
        finite = torch.isfinite(logits).all(dim=-1)
        if cfg.repetition_penalty != 1.0:
            # Padding is replaced by the row's newest token (already present) so it never counts as "seen".
            seen = torch.where(is_real, tokens, tokens[:, -1:])
            logits = apply_repetition_penalty(logits, seen, cfg.repetition_penalty)
        if cfg.no_repeat_ngram:
            logits = apply_no_repeat_ngram(logits, tokens[:, longest:], cfg.no_repeat_ngram)
        next_ids = sample_next(torch.where(finite[:, None], logits, 0.0), cfg.temperature, cfg.top_k, cfg.top_p, generator)
        next_ids = torch.where(finite, next_ids, BAD_LOGITS)
        yield next_ids
        tokens = torch.cat([tokens, next_ids[:, None]], dim=1)
        is_real = torch.cat([is_real, torch.ones_like(next_ids[:, None], dtype=torch.bool)], dim=1)
        step_input = next_ids[:, None]


def _fit_window(model: LilLM, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> tuple[list[list[int]], int]:
    """Crop prompts to the last max_seq_len - 1 tokens; return them and how many new tokens still fit."""
    max_seq_len = model.config.max_seq_len
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (e.g. <|endoftext|> to start a fresh document)")
    cropped = [list(p)[-(max_seq_len - 1):] for p in prompts]
    return cropped, min(max_new_tokens, max_seq_len - max(len(p) for p in cropped))


def generate_ids(
    model: LilLM,
    prompt_ids: Sequence[int],
    cfg: SamplingConfig,
    use_cache: bool = True,
    stats: GenerationStats | None = None,
) -> Iterator[int]:
    """Stream the new token ids that follow prompt_ids, one per step, on the model's device.

    use_cache=True prefills the prompt once and then runs one token per step against the KV cache;
    use_cache=False re-runs the whole sequence every step (same tokens, quadratic cost: for comparison).
    Ends at a stop id (not yielded), after cfg.max_new_tokens, or when the context window is full."""
    stats = stats if stats is not None else GenerationStats()
    start = time.perf_counter()
    stop_ids = cfg.checked_stop_ids()
    (prompt,), budget = _fit_window(model, [prompt_ids], cfg.max_new_tokens)
    stats.prompt_tokens, stats.new_tokens, stats.stop_reason = len(prompt), 0, None
    for next_ids in _decode_steps(model, [prompt], cfg, use_cache, budget):
        stats.seconds = time.perf_counter() - start
        token = _check_token(int(next_ids[0]))
        if token in stop_ids:
            stats.stop_reason = "stop"
            return
        stats.new_tokens += 1
        yield token
    stats.seconds = time.perf_counter() - start
    stats.stop_reason = "max_new_tokens" if stats.new_tokens == cfg.max_new_tokens else "context"


def generate_batch(model: LilLM, prompts: Sequence[Sequence[int]], cfg: SamplingConfig) -> list[list[int]]:
    """New token ids for several prompts decoded together (left padding + attention mask, KV cache).

    Greedy results equal generating each prompt alone: padding is masked out and RoPE only sees relative
    distances. The rows share one context window, so the longest prompt sets how many tokens fit."""
    stop_ids = cfg.checked_stop_ids()
    prompts, budget = _fit_window(model, prompts, cfg.max_new_tokens)
    outputs: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    for next_ids in _decode_steps(model, prompts, cfg, use_cache=True, budget=budget):
        for row, token in enumerate(next_ids.tolist()):
            done[row] = done[row] or _check_token(token) in stop_ids
            if not done[row]:
                outputs[row].append(token)
        if all(done):
            break
    return outputs


# ---------------------------------------------------------------------------------------------- text and chat


def _token_bytes_table(tokenizer) -> list[bytes]:
    """The bytes of every token id (control tokens map to b"": they are never shown as text)."""
    control = special_tokens(tokenizer).control
    if isinstance(tokenizer, BPETokenizer):
        return [b"" if i in control else token for i, token in enumerate(tokenizer.vocab)]
    char_to_byte = {char: byte for byte, char in enumerate(_BYTE_TO_CHAR)}  # byte-level BPE's printable stand-ins
    table = []
    for i in range(tokenizer.get_vocab_size()):
        token = tokenizer.id_to_token(i)
        table.append(b"" if i in control or token is None else bytes(char_to_byte[c] for c in token))
    return table


def stream_text(tokenizer, token_ids: Iterable[int]) -> Iterator[str]:
    """Decoded text increments for a stream of token ids.

    A token can end in the middle of a multi-byte UTF-8 character (an emoji is often 2-4 byte tokens), so
    decoding token by token would print U+FFFD. The bytes go through an incremental UTF-8 decoder instead,
    which holds an unfinished character back until its last byte arrives; invalid bytes still become U+FFFD."""
    table = _token_bytes_table(tokenizer)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for token in token_ids:
        text = decoder.decode(table[token])
        if text:
            yield text
    tail = decoder.decode(b"", final=True)
    if tail:
        yield tail


def fit_chat_to_context(
    tokenizer, messages: Sequence[Mapping[str, str]], max_tokens: int, system: str | None = None
) -> list[dict]:
    """Drop the oldest whole turns (a user message and the replies after it) until the conversation, rendered
    with the generation prompt, fits in max_tokens. A leading system message (or `system`) is always kept."""
    head = list(messages[:1]) if messages and messages[0].get("role") == "system" else []
    rest = list(messages[len(head):])
    while True:
        n_tokens = len(render(tokenizer, head + rest, add_generation_prompt=True, system=system)[0])
        if n_tokens <= max_tokens:
            return [dict(m) for m in head + rest]
        next_turn = next((i for i in range(1, len(rest)) if rest[i]["role"] == "user"), None)
        if next_turn is None:
            raise ValueError(
                f"the last message alone needs {n_tokens} tokens with the system message and chat template, "
                f"but only {max_tokens} fit in the context; send a shorter message"
            )
        rest = rest[next_turn:]


def chat_prompt_ids(
    model: LilLM, tokenizer, messages: Sequence[Mapping[str, str]], cfg: SamplingConfig, system: str | None = None
) -> list[int]:
    """Token ids that make the model write the next assistant reply. Room is kept for the reply:
    min(max_new_tokens, half the context), so a long history cannot leave the reply no space."""
    max_seq_len = model.config.max_seq_len
    reply_room = min(cfg.max_new_tokens, max_seq_len // 2)
    fitted = fit_chat_to_context(tokenizer, messages, max_seq_len - reply_room, system)
    return render(tokenizer, fitted, add_generation_prompt=True, system=system)[0]


def chat_reply(
    model: LilLM,
    tokenizer,
    messages: Sequence[Mapping[str, str]],
    cfg: SamplingConfig,
    system: str | None = None,
    stats: GenerationStats | None = None,
) -> Iterator[str]:
    """The assistant's reply to a conversation, streamed as text increments (stops at <|im_end|> unless `cfg`
    names other stop ids)."""
    cfg = cfg.with_stops(tokenizer)
    prompt = chat_prompt_ids(model, tokenizer, messages, cfg, system)
    return stream_text(tokenizer, generate_ids(model, prompt, cfg, stats=stats))


def load_for_inference(checkpoint_dir, device: str = "auto", dtype: str = "auto") -> Checkpoint:
    """A checkpoint ready to generate: on `device` ("auto": cuda > mps > cpu), weights cast to `dtype` ("auto":
    bf16 on GPUs that support it, else fp32). The KV cache takes the weights' dtype."""
    torch_device = resolve_device(device)
    ckpt = load_checkpoint(checkpoint_dir, torch_device)
    ckpt.model.to(resolve_dtype(dtype, torch_device))
    return ckpt


def checkpoint_system_prompt(meta: dict) -> str | None:
    """The system message to chat with: the one the checkpoint was fine-tuned with (meta.json "system_prompt",
    None if it was trained without one), else DEFAULT_SYSTEM_PROMPT. Chatting like training works best."""
    return meta.get("system_prompt", DEFAULT_SYSTEM_PROMPT)
