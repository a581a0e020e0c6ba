"""lillm.generate: sampling rules on hand-made distributions, cached vs uncached decoding, batching, stops,
context fitting and UTF-8-safe streaming."""

from __future__ import annotations

import math

import pytest
import torch

from lillm.checkpoint import load_checkpoint
from lillm.generate import (
    GenerationStats,
    SamplingConfig,
    apply_no_repeat_ngram,
    apply_repetition_penalty,
    apply_top_k,
    apply_top_p,
    chat_reply,
    fit_chat_to_context,
    generate_batch,
    generate_ids,
    sample_next,
    stream_text,
)
from lillm.chat import render
from lillm.tokenizer import encode_ordinary, load_tokenizer

EOS_ID = 0  # lillm's own layout (the tokenizers here are trained by lillm)

GREEDY = SamplingConfig(temperature=0.0, max_new_tokens=48, stop_ids=())


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models decode fastest on one thread; two thrash when the 2-core machine is busy (10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base(base_checkpoint):
    return load_checkpoint(base_checkpoint)


def story_prompt(ckpt, text="Once upon a time, there was a little girl named") -> list[int]:
    return [EOS_ID, *encode_ordinary(ckpt.tokenizer, text)]


def kept(logits: torch.Tensor) -> list[int]:
    return torch.isfinite(logits).nonzero().flatten().tolist()


# ---------------------------------------------------------------------------------------------- sampling rules


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])  # sorted: 1 (0.5), 3 (0.3), 2 (0.15), 0 (0.05)
    logits = probs.log()
    assert kept(apply_top_p(logits, 0.4)) == [1]
    assert kept(apply_top_p(logits, 0.79)) == [1, 3]
    assert kept(apply_top_p(logits, 0.81)) == [1, 2, 3]
    assert kept(apply_top_p(logits, 0.96)) == [0, 1, 2, 3]
    assert kept(apply_top_p(logits, 1.0)) == [0, 1, 2, 3]
    # batched rows are independent; kept logits are unchanged
    batch = torch.stack([logits, torch.tensor([0.9, 0.04, 0.03, 0.03]).log()])
    out = apply_top_p(batch, 0.85)
    assert kept(out[0]) == [1, 2, 3] and kept(out[1]) == [0]
    assert torch.equal(out[0, 1:], batch[0, 1:])


def test_top_k_keeps_the_k_largest():
    logits = torch.tensor([[1.0, 4.0, 3.0, -2.0], [0.0, -1.0, 5.0, 2.0]])
    out = apply_top_k(logits, 2)
    assert kept(out[0]) == [1, 2] and kept(out[1]) == [2, 3]
    assert torch.equal(apply_top_k(logits, 0), logits)


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0])
    out = apply_repetition_penalty(logits, [0, 1, 1], penalty=2.0)  # a repeated id is penalised once
    assert out.tolist() == [1.0, -2.0, 0.5, 3.0]
    batch = apply_repetition_penalty(torch.stack([logits, logits]), torch.tensor([[3, 3], [2, 1]]), 4.0)
    assert batch.tolist() == [[2.0, -1.0, 0.5, 0.75], [2.0, -4.0, 0.125, 3.0]]
    assert logits.tolist() == [2.0, -1.0, 0.5, 3.0]  # input untouched


def test_no_repeat_ngram_bans_exactly_the_tokens_that_would_repeat_an_ngram_of_the_reply():
    logits = torch.zeros(2, 6)
    generated = torch.tensor([[1, 2, 3, 1, 2], [4, 4, 5, 4, 4]])
    # Row 0 ends with (1, 2), which (1, 2, 3) began: 3 is banned. Row 1 ends with (4, 4), followed by 5 before.
    assert kept(apply_no_repeat_ngram(logits, generated, 3)[0]) == [0, 1, 2, 4, 5]
    assert kept(apply_no_repeat_ngram(logits, generated, 3)[1]) == [0, 1, 2, 3, 4]
    # Bigrams: row 0's last token 2 was followed by 3; row 1's 4 by 4 and by 5.
    assert [kept(row) for row in apply_no_repeat_ngram(logits, generated, 2)] == [[0, 1, 2, 4, 5], [0, 1, 2, 3]]
    assert apply_no_repeat_ngram(logits, generated[:, :2], 3).equal(logits)  # too short to repeat anything
    assert apply_no_repeat_ngram(logits, generated, 0).equal(logits) and logits.eq(0).all()  # off; input untouched


def test_temperature_reshapes_the_sampled_distribution():
    probs = torch.tensor([0.5, 0.3, 0.2])
    logits = probs.log().expand(40_000, 3)
    generator = torch.Generator().manual_seed(0)
    for temperature, expected in ((1.0, probs), (0.5, probs**2 / (probs**2).sum())):
        draws = sample_next(logits, temperature, generator=generator)
        freq = torch.bincount(draws, minlength=3).float() / len(draws)
        assert torch.allclose(freq, expected, atol=0.01), (temperature, freq, expected)
    assert sample_next(probs.log(), 0.0).item() == 0  # greedy on a 1-D input


def test_sampling_config_rejects_bad_values():
    for bad in (dict(temperature=-1), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-1), dict(max_new_tokens=0),
                dict(repetition_penalty=0), dict(no_repeat_ngram=-1)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SamplingConfig(**bad)


# ---------------------------------------------------------------------------------------------- decoding


def test_greedy_with_and_without_cache_identical(base):
    prompt = story_prompt(base)
    with_cache = list(generate_ids(base.model, prompt, GREEDY))
    without = list(generate_ids(base.model, prompt, GREEDY, use_cache=False))
    assert len(with_cache) == GREEDY.max_new_tokens
    assert len(set(with_cache)) > 3  # a real continuation, not one repeated token
    assert with_cache == without


def test_top_k_1_equals_greedy_and_seed_repeats(base):
    prompt = story_prompt(base)
    greedy = list(generate_ids(base.model, prompt, GREEDY))
    top1 = SamplingConfig(temperature=1.0, top_k=1, top_p=1.0, max_new_tokens=48, stop_ids=(), seed=123)
    assert list(generate_ids(base.model, prompt, top1)) == greedy
    sampled = SamplingConfig(temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=48, stop_ids=(), seed=7)
    first = list(generate_ids(base.model, prompt, sampled))
    assert first == list(generate_ids(base.model, prompt, sampled)) != greedy


def test_stop_ids_max_new_tokens_and_context_window(base):
    prompt = story_prompt(base)
    greedy = list(generate_ids(base.model, prompt, GREEDY))
    stop = greedy[5]
    stats = GenerationStats()
    stopped = list(generate_ids(base.model, prompt, SamplingConfig(temperature=0.0, stop_ids=(stop,)), stats=stats))
    assert stopped == greedy[: greedy.index(stop)] and stats.stop_reason == "stop"

    list(generate_ids(base.model, prompt, SamplingConfig(temperature=0.0, max_new_tokens=7, stop_ids=()), stats=stats))
    assert (stats.new_tokens, stats.stop_reason) == (7, "max_new_tokens") and stats.tokens_per_second > 0

    max_seq_len = base.config.max_seq_len
    long_prompt = (prompt * max_seq_len)[: max_seq_len + 30]  # longer than the window: keeps its last tokens
    out = list(generate_ids(base.model, long_prompt, GREEDY, stats=stats))
    assert (stats.prompt_tokens, stats.new_tokens, stats.stop_reason) == (max_seq_len - 1, 1, "context")
    assert out == list(generate_ids(base.model, long_prompt[-(max_seq_len - 1):], GREEDY))


def test_greedy_with_no_repeat_ngram_leaves_a_reply_without_repeats_and_changes_nothing_else(base):
    prompt = story_prompt(base)
    guard = lambda n_tokens: SamplingConfig(temperature=0.0, max_new_tokens=n_tokens, stop_ids=(), no_repeat_ngram=3)  # noqa: E731
    plain = list(generate_ids(base.model, prompt, SamplingConfig(temperature=0.0, max_new_tokens=96, stop_ids=())))
    trigrams = lambda ids: [tuple(ids[i : i + 3]) for i in range(len(ids) - 2)]  # noqa: E731
    repeat = next(i for i, g in enumerate(trigrams(plain)) if g in trigrams(plain)[:i])  # this small model loops
    earlier = trigrams(plain).index(trigrams(plain)[repeat])
    guarded = list(generate_ids(base.model, prompt, guard(96)))
    assert len(set(trigrams(guarded))) == len(trigrams(guarded))  # no trigram of the reply twice
    assert guarded[: repeat + 2] == plain[: repeat + 2] and guarded[repeat + 2] != plain[repeat + 2]  # greedy until it would repeat
    # The same trigram is free to repeat once it is the prompt's: only the reply counts (instructions get copied).
    assert earlier + 3 <= repeat
    assert list(generate_ids(base.model, prompt + plain[:repeat], guard(3))) == plain[repeat : repeat + 3]


def test_batch_equals_single(base):
    prompts = [story_prompt(base, text) for text in ("Tom had a red ball.", "One day", "The cat sat on the mat and")]
    assert len({len(p) for p in prompts}) == 3  # really left-padded
    for cfg in (SamplingConfig(temperature=0.0, max_new_tokens=32), SamplingConfig(temperature=0.0, max_new_tokens=64, no_repeat_ngram=2)):
        cfg = cfg.with_stops(base.tokenizer)
        assert generate_batch(base.model, prompts, cfg) == [list(generate_ids(base.model, p, cfg)) for p in prompts]


# ---------------------------------------------------------------------------------------------- chat and text


def test_fit_chat_to_context_drops_oldest_turns_and_keeps_system(tokenizer_path):
    tokenizer = load_tokenizer(tokenizer_path)
    system = {"role": "system", "content": "You are a terse assistant."}
    turns = []
    for i in range(4):
        turns += [{"role": "user", "content": f"Question number {i} about the weather?"},
                  {"role": "assistant", "content": f"Answer number {i}: it is sunny today."}]
    messages = [system, *turns, {"role": "user", "content": "And tomorrow?"}]
    full = len(render(tokenizer, messages, add_generation_prompt=True)[0])
    assert fit_chat_to_context(tokenizer, messages, full) == messages

    fitted = fit_chat_to_context(tokenizer, messages, full - 1)
    assert fitted == [system, *turns[2:], messages[-1]]  # exactly one whole turn dropped
    minimal = [system, messages[-1]]
    n_minimal = len(render(tokenizer, minimal, add_generation_prompt=True)[0])
    assert fit_chat_to_context(tokenizer, messages, n_minimal) == minimal
    with pytest.raises(ValueError, match="last message alone needs"):
        fit_chat_to_context(tokenizer, messages, n_minimal - 1)
    # a system message given separately is kept too
    no_system = messages[1:]
    assert fit_chat_to_context(tokenizer, no_system, n_minimal, system=system["content"]) == [messages[-1]]


def test_stream_text_never_splits_a_utf8_character(tokenizer_path):
    tokenizer = load_tokenizer(tokenizer_path)
    text = "Hello 👋 world, café, 日本語, naïve ✓ 🦜🦜!"
    ids = encode_ordinary(tokenizer, text)
    # meaningful only if some tokens end inside a character
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)
    chunks = list(stream_text(tokenizer, ids))
    assert "".join(chunks) == text
    assert not any("\ufffd" in chunk for chunk in chunks)
    assert len(chunks) > 5  # really streamed
    # a character cut off by the end of the stream is shown as U+FFFD, not dropped silently
    truncated = encode_ordinary(tokenizer, "ok 🦜")
    cut = "".join(stream_text(tokenizer, truncated[:-1]))
    assert cut.startswith("ok") and cut.endswith("\ufffd")


def test_chat_reply_streams_text(base):
    messages = [{"role": "user", "content": "Tell me a story about a dog."}]
    stats = GenerationStats()
    cfg = SamplingConfig(temperature=0.0, max_new_tokens=20)
    reply = "".join(chat_reply(base.model, base.tokenizer, messages, cfg, system="Be kind.", stats=stats))
    assert 0 < stats.new_tokens <= 20 and stats.stop_reason in ("stop", "max_new_tokens")
    assert reply.strip() and math.isfinite(stats.tokens_per_second)
