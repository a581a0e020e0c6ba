"""Story instructions: instruction-following conversations made from plain stories, and their automatic score.

A model pretrained on TinyStories has never seen an instruction. Three fixed templates turn each story into one
(as TinyStories-Instruct does with required words): use some given words, begin with a given sentence, continue
a given first half. The reply is the story (or its rest), so whether a reply followed its instruction can be
checked exactly: every requested word occurs in it as a whole word (case-insensitive: "cat" is not in "catch"),
or it starts with the requested opening.

The requested words are drawn from a story's less common words (never the corpus's few hundred most frequent
ones, nor names), so a model that ignores the instruction almost never uses all of them by chance.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

WORDS_TEMPLATE = "Write a short story that uses the words: {words}."
BEGIN_TEMPLATE = "Write a story that begins with: {opening}"
CONTINUE_TEMPLATE = "Continue this story: {start}"
KINDS = ("words", "begin", "continue")

COMMON_WORDS = 300  # this many most frequent corpus words are never requested
_WORD = re.compile(r"[A-Za-z]+")
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"']?\s+")
_PARSERS = {
    "words": re.compile(r"^Write a short story that uses the words: (.+)\.$", re.S),
    "begin": re.compile(r"^Write a story that begins with: (.+)$", re.S),
    "continue": re.compile(r"^Continue this story: (.+)$", re.S),
}


def word_counts(stories: Iterable[str]) -> Counter:
    """How often each lowercased word occurs over a corpus."""
    counts: Counter = Counter()
    for story in stories:
        counts.update(w.lower() for w in _WORD.findall(story))
    return counts


def common_words(counts: Counter, n: int = COMMON_WORDS) -> frozenset[str]:
    """The n most frequent words (ties broken alphabetically, so the set does not depend on reading order)."""
    return frozenset(w for w, _ in sorted(counts.items(), key=lambda wc: (-wc[1], wc[0]))[:n])


def candidate_words(story: str, common: frozenset[str], within: int | None = None) -> list[str]:
    """The story's requestable words in order of first use: lowercase in the text at least once (so not a
    name), at least 3 letters, not among the corpus's most frequent words; with `within`, only words used
    (in lowercase) among the story's first `within` words."""
    seen: dict[str, None] = {}
    for w in _WORD.findall(story)[:within]:
        if w.islower() and len(w) >= 3 and w not in common:
            seen.setdefault(w, None)
    return list(seen)


def choose_words(
    story: str, common: frozenset[str], n: int, rng: random.Random, within: int | None = None
) -> list[str] | None:
    """n distinct candidate words of the story, listed in the order the story uses them; None if it has fewer."""
    candidates = candidate_words(story, common, within)
    if len(candidates) < n:
        return None
    picked = set(rng.sample(candidates, n))
    return [w for w in candidates if w in picked]


def _whole_word(word: str) -> re.Pattern:
    return re.compile(rf"(?<![A-Za-z]){re.escape(word)}(?![A-Za-z])", re.IGNORECASE)


def contains_word(text: str, word: str) -> bool:
    """Whether `word` occurs in `text` as a whole word, ignoring case ("Cat." yes, "catch" no)."""
    return _whole_word(word).search(text) is not None


def first_sentence(story: str) -> str:
    """The story's first sentence, with its closing quote if it has one ('"Hi!" said Tom.' gives '"Hi!"')."""
    story = story.strip()
    match = _SENTENCE_END.search(story)
    return story[: match.end()].rstrip() if match else story


def split_half(story: str) -> tuple[str, str] | None:
    """(start, rest) cut at the sentence boundary nearest the middle; start + whitespace + rest == story.
    None for a one-sentence story."""
    story = story.strip()
    cuts = [m.end() for m in _SENTENCE_END.finditer(story)]
    if not cuts:
        return None
    cut = min(cuts, key=lambda c: abs(c - len(story) / 2))
    return story[:cut].rstrip(), story[cut:].lstrip()


def cut_story(story: str, max_chars: int) -> str | None:
    """The story's longest start that ends at a sentence end and has at most max_chars characters (the whole
    story if it is short enough); None when even its first sentence is longer."""
    story = story.strip()
    if len(story) <= max_chars:
        return story
    starts = [story[: m.end()].rstrip() for m in _SENTENCE_END.finditer(story)]
    fitting = [s for s in starts if len(s) <= max_chars]
    return fitting[-1] if fitting else None


@dataclass(frozen=True)
class Instruction:
    """What a user turn asks for: kind is "words", "begin" or "continue"; words or opening say what to check."""

    kind: str
    words: tuple[str, ...] = ()
    opening: str = ""


def parse_instruction(text: str) -> Instruction | None:
    """The instruction a templated user turn gives, or None for any other text."""
    for kind, pattern in _PARSERS.items():
        match = pattern.match(text)
        if match:
            if kind == "words":
                return Instruction(kind, words=tuple(w.strip() for w in match.group(1).split(",")))
            return Instruction(kind, opening=match.group(1) if kind == "begin" else "")
    return None


def conversation(
    kind: str, story: str, common: frozenset[str], n_words: int, rng: random.Random, words_within: int | None = None
) -> list[dict] | None:
    """One instruction conversation of the given kind made from a story, or None when the story cannot make it.
    words_within: request only words the story uses among its first that many words (see choose_words)."""
    story = story.strip()
    if kind == "words":
        words = choose_words(story, common, n_words, rng, words_within)
        if words is None:
            return None
        user, reply = WORDS_TEMPLATE.format(words=", ".join(words)), story
    elif kind == "begin":
        opening = first_sentence(story)
        if opening == story:
            return None
        user, reply = BEGIN_TEMPLATE.format(opening=opening), story
    elif kind == "continue":
        halves = split_half(story)
        if halves is None:
            return None
        user, reply = CONTINUE_TEMPLATE.format(start=halves[0]), halves[1]
    else:
        raise ValueError(f"unknown instruction kind {kind!r}; expected one of {', '.join(KINDS)}")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]


def requested_word_positions(tokenizer, messages: Sequence[dict], system: str | None = None) -> list[int]:
    """Where, in the ids `lillm.chat.render(tokenizer, messages, system=system)` gives, the last reply first
    uses each word its user turn asked for: the tokens that overlap the first whole-word occurrence
    (case-insensitive, as contains_word finds it) of each requested word. [] unless the last message is an
    assistant reply to a words instruction. SFT weighs these tokens up (sft_train.py --word_weight): they are
    the few tokens of a long reply that show the instruction was read, the rest is story the model can write
    without reading it. Later uses are not weighed, so the model learns to bring a word in, not to repeat it."""
    from lillm.chat import render

    if len(messages) < 2 or messages[-1]["role"] != "assistant" or messages[-2]["role"] != "user":
        return []
    instruction = parse_instruction(messages[-2]["content"])
    if instruction is None or instruction.kind != "words":
        return []
    if not hasattr(tokenizer, "encode_batch"):  # offsets come from a tokenizers.Tokenizer
        raise ValueError("weighing requested words needs a tokenizers.Tokenizer (tokenizer.json), not a BPETokenizer")
    start = len(render(tokenizer, messages[:-1], add_generation_prompt=True, system=system)[0])
    reply = messages[-1]["content"]
    offsets = tokenizer.encode(reply, add_special_tokens=False).offsets
    firsts = [_whole_word(w).search(reply) for w in instruction.words]
    spans = [m.span() for m in firsts if m is not None]
    return [start + t for t, (a, b) in enumerate(offsets) if any(a < e and s < b for s, e in spans)]


# --------------------------------------------------------------------------------------------- scoring


def words_followed(replies: Sequence[str], word_lists: Sequence[Sequence[str]]) -> dict[str, float]:
    """Share of replies containing every requested word, share of all requested words used, and how many times
    a reply uses a requested word on average (uses_per_word: a story uses each about twice; a reply that stuffs
    the words in, "candy candy candy", scores far more)."""
    if len(replies) != len(word_lists) or not replies:
        raise ValueError(f"need as many word lists as replies (got {len(word_lists)} and {len(replies)}), at least one")
    uses = [[len(_whole_word(w).findall(r)) for w in words] for r, words in zip(replies, word_lists)]
    n_words = sum(map(len, uses))
    return {
        "all_words": sum(all(u) for u in uses) / len(uses),
        "words": sum(sum(map(bool, u)) for u in uses) / n_words,
        "uses_per_word": sum(map(sum, uses)) / n_words,
    }


def openings_followed(replies: Sequence[str], openings: Sequence[str]) -> float:
    """Share of replies that start with their requested opening (leading whitespace ignored)."""
    if len(replies) != len(openings) or not replies:
        raise ValueError(f"need as many openings as replies (got {len(openings)} and {len(replies)}), at least one")
    return sum(r.lstrip().startswith(o) for r, o in zip(replies, openings)) / len(replies)


def shuffled(items: Sequence, offset: int = 1) -> list:
    """Each item replaced by another one (a rotation): the words of a different instruction, for contrast."""
    if len(items) < 2:
        raise ValueError("a contrast needs at least two instructions")
    return [items[(i + offset) % len(items)] for i in range(len(items))]


# --------------------------------------------------------------------------------------------- measuring a model


def held_out_instructions(conversations: Iterable[Sequence[dict]], n: int) -> dict[str, list[tuple[str, Instruction]]]:
    """The first n "words" and the first n "begin" instructions among the conversations' first user turns."""
    found: dict[str, list[tuple[str, Instruction]]] = {"words": [], "begin": []}
    for messages in conversations:
        first = messages[0] if messages[0]["role"] == "user" else messages[1]
        instruction = parse_instruction(first["content"])
        if instruction is not None and instruction.kind in found and len(found[instruction.kind]) < n:
            found[instruction.kind].append((first["content"], instruction))
        if all(len(v) == n for v in found.values()):
            break
    return found


def _replies(model, prompts: list[list[int]], stop_id: int, max_new_tokens: int, batch_size: int = 32,
             no_repeat_ngram: int = 0):
    """Greedy replies (ids, stop cut off) and whether each ended with stop_id, batched by prompt length;
    no_repeat_ngram > 0 forbids repeating an n-gram of the reply (lillm.generate.apply_no_repeat_ngram)."""
    from lillm.generate import SamplingConfig, generate_batch

    replies: list[list[int]] = [[] for _ in prompts]
    ended = [False] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    cfg = SamplingConfig(temperature=0.0, max_new_tokens=max_new_tokens, stop_ids=(stop_id,), no_repeat_ngram=no_repeat_ngram)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        batch = [prompts[i] for i in rows]
        budget = min(max_new_tokens, model.config.max_seq_len - max(len(p) for p in batch))
        for i, reply in zip(rows, generate_batch(model, batch, cfg)):
            replies[i], ended[i] = reply, len(reply) < budget  # a stop id is cut off, so the reply is shorter
    return replies, ended


def instruction_scores(
    model, tokenizer, instructions: dict[str, list[tuple[str, Instruction]]], chat: bool, system: str | None,
    max_new_tokens: int, no_repeat_ngram: int = 0,
) -> tuple[dict[str, float], list[dict]]:
    """Greedy replies to the instructions and how well they follow them.

    chat=True renders each instruction as a user turn (lillm.chat.render); chat=False gives it to the model as
    plain text, a new document (what a base model that never saw the template can use). Returns the shares
    (all_words, words, opening, im_end) and the replies to the words instructions (for contrast and display)."""
    from lillm.chat import render
    from lillm.tokenizer import encode_ordinary, special_tokens

    specials = special_tokens(tokenizer)

    def prompt(text: str) -> list[int]:
        if chat:
            return render(tokenizer, [{"role": "user", "content": text}], add_generation_prompt=True, system=system)[0]
        return [specials.eos, *encode_ordinary(tokenizer, text + "\n")]

    items = instructions["words"] + instructions["begin"]
    replies, ended = _replies(model, [prompt(text) for text, _ in items], specials.im_end, max_new_tokens,
                              no_repeat_ngram=no_repeat_ngram)
    texts = [tokenizer.decode(r[: r.index(specials.eos)] if specials.eos in r else r) for r in replies]
    n_words = len(instructions["words"])
    scores: dict[str, float] = {"im_end": sum(ended) / len(ended)}
    if n_words:
        scores.update(words_followed(texts[:n_words], [i.words for _, i in instructions["words"]]))
    if instructions["begin"]:
        scores["opening"] = openings_followed(texts[n_words:], [i.opening for _, i in instructions["begin"]])
    examples = [{"user": text, "reply": reply, "ended": e} for (text, _), reply, e in zip(items, texts, ended)]
    return scores, examples[:n_words]


def contrast_scores(examples: list[dict], instructions: dict[str, list[tuple[str, Instruction]]]) -> dict[str, float]:
    """The replies to the words instructions scored against the words of a different instruction: what
    following no instruction at all would score."""
    return words_followed([e["reply"] for e in examples], shuffled([i.words for _, i in instructions["words"]]))


def instruction_report(
    model, base_model, tokenizer, instructions: dict, system: str | None, no_repeat_ngram: int = 0
) -> dict:
    """The fine-tuned model's scores, the base model's (instructions as plain text) and the fine-tuned model's
    against shuffled words, with a few example replies: the "instruct" block of the SFT summary. Both models
    decode alike: greedy, and with no_repeat_ngram > 0 never repeating an n-gram of their own reply."""
    budget = model.config.max_seq_len  # as long as the context allows: a reply is a whole story
    sft, examples = instruction_scores(model, tokenizer, instructions, True, system, budget, no_repeat_ngram)
    base, _ = instruction_scores(base_model, tokenizer, instructions, False, system, budget, no_repeat_ngram)
    report = {"n_words": len(instructions["words"]), "n_begin": len(instructions["begin"]),
              "no_repeat_ngram": no_repeat_ngram, "sft": sft, "base": base}
    if len(instructions["words"]) >= 2:
        report["sft_shuffled_words"] = contrast_scores(examples, instructions)
    return {**report, "examples": examples[:3]}


def report_line(report: dict) -> str:
    """The instruction-following numbers of instruction_report in one line."""
    sft, base = report["sft"], report["base"]
    parts = []
    if "all_words" in sft:
        parts.append(f"all {report['n_words']} word sets used {sft['all_words']:.0%} (base {base['all_words']:.0%}"
                     + (f", shuffled {report['sft_shuffled_words']['all_words']:.0%}" if "sft_shuffled_words" in report else "")
                     + f"), words {sft['words']:.0%}"
                     + (f", {sft['uses_per_word']:.1f} uses per word" if "uses_per_word" in sft else ""))
    if "opening" in sft:
        parts.append(f"opening kept {sft['opening']:.0%} of {report['n_begin']} (base {base['opening']:.0%})")
    parts.append(f"<|im_end|> {sft['im_end']:.0%} (base {base['im_end']:.0%})")
    decoding = f" (greedy, no repeated {report['no_repeat_ngram']}-grams)" if report.get("no_repeat_ngram") else ""
    return f"instructions{decoding}: " + ", ".join(parts)
