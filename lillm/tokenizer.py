"""Byte-level BPE tokenizers: one written by hand (chapter 01) and one trained with Hugging Face `tokenizers`.

Both share the same vocabulary layout and the same pre-tokenization, so a `tokenizer.json` exported from the
hand-written `BPETokenizer` encodes every text exactly like the hand-written encoder:

    ids 0..3     the special tokens <|endoftext|> <|pad|> <|im_start|> <|im_end|>
    ids 4..259   the 256 single bytes (in byte order for BPETokenizer; `tokenizers` orders them by character)
    ids 260..    merges, in the order they were learned

That layout is checked when lillm trains a tokenizer, but nothing else relies on it: code asks the tokenizer for
its control tokens by name (`special_tokens`), so a real model's byte-level BPE `tokenizer.json` (SmolLM2:
<|endoftext|>=0, <|im_start|>=1, <|im_end|>=2, no pad) loads and chats the same way.

Text never becomes a special token: a literal "<|im_end|>" inside a string is encoded as ordinary bytes. Only
`lillm.chat.render` emits special-token ids, which is what stops a user from typing a fake turn boundary.
"""

from __future__ import annotations

import heapq
import json
import os
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import regex
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from lillm.fileio import atomic_write_text

EOS_TOKEN, PAD_TOKEN, IM_START_TOKEN, IM_END_TOKEN = "<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (EOS_TOKEN, PAD_TOKEN, IM_START_TOKEN, IM_END_TOKEN)  # lillm's own layout: ids 0..3 in this order
BYTE_OFFSET = len(SPECIAL_TOKENS)  # id of byte 0 in lillm's own tokenizers
MIN_VOCAB_SIZE = BYTE_OFFSET + 256 + 1  # specials + bytes + at least one merge

# GPT-4's split pattern: contractions, words with one optional leading non-letter (usually a space), numbers of at
# most 3 digits, punctuation runs, newlines, other whitespace. BPE merges never cross these chunk boundaries,
# which keeps tokens "word-like" and makes training a matter of counting unique chunks once.
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
    r"""|\s*[\r\n]|\s+(?!\S)|\s+"""
)
_SPLIT_RE = regex.compile(SPLIT_PATTERN)
_FORMAT = "lillm-bpe"
_FORMAT_VERSION = 1


def _byte_to_char() -> list[str]:
    """The printable stand-in character for each byte used by byte-level `tokenizer.json` files.

    JSON vocabularies hold strings, not bytes, so every byte gets a visible character: printable Latin-1 bytes
    stand for themselves and the rest (controls, space, ...) are shifted to code points 256 and up, in byte order.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, shifted = [""] * 256, 0
    for byte in range(256):
        if byte in printable:
            chars[byte] = chr(byte)
        else:
            chars[byte] = chr(256 + shifted)
            shifted += 1
    return chars


_BYTE_TO_CHAR = _byte_to_char()


def _merge_pair(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """Replace every non-overlapping occurrence of `pair` in `ids` (left to right) by `new_id`."""
    first, second = pair
    merged, i, n = [], 0, len(ids)
    while i < n:
        if ids[i] == first and i + 1 < n and ids[i + 1] == second:
            merged.append(new_id)
            i += 2
        else:
            merged.append(ids[i])
            i += 1
    return merged


class BPETokenizer:
    """Byte-level BPE written by hand: train, encode, decode, save/load, export to `tokenizers`."""

    def __init__(self) -> None:
        self.merges: list[tuple[int, int]] = []  # in rank order: merges[r] is applied before merges[r + 1]
        self._rebuild()

    def _rebuild(self) -> None:
        """Derive the vocabulary and merge tables from `self.merges`.

        Two different merges can spell the same bytes (e.g. "a"+"bc" and "ab"+"c"); the second one reuses the
        first one's id, exactly as `tokenizers` does, so every token in the exported vocabulary is unique.
        """
        self.vocab: list[bytes] = [s.encode("utf-8") for s in SPECIAL_TOKENS] + [bytes([b]) for b in range(256)]
        self._id_of: dict[bytes, int] = {tok: i for i, tok in enumerate(self.vocab) if i >= BYTE_OFFSET}
        self._rank: dict[tuple[int, int], int] = {}
        self._merged_id: list[int] = []
        for rank, pair in enumerate(self.merges):
            self._rank[pair] = rank
            self._merged_id.append(self._add_token(self.vocab[pair[0]] + self.vocab[pair[1]]))
        self._cache: dict[str, list[int]] = {}

    def _add_token(self, token: bytes) -> int:
        token_id = self._id_of.get(token)
        if token_id is None:
            token_id = self._id_of[token] = len(self.vocab)
            self.vocab.append(token)
        return token_id

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    # ---------------------------------------------------------------------------------------------- training
    def train(self, texts: Iterable[str], vocab_size: int, verbose: bool = False) -> None:
        """Learn merges until the vocabulary has `vocab_size` tokens (or no adjacent pair is left to merge).

        Efficient because the corpus is reduced to its unique pre-tokenized chunks ("words") with counts, and
        each merge only touches the words that contain the merged pair: a `pair -> words` index finds them, the
        pair counts are updated by the difference between each word before and after, and a max-heap with lazy
        deletion finds the next most frequent pair. Ties go to the smallest pair of ids, so training is
        deterministic.
        """
        if vocab_size < MIN_VOCAB_SIZE:
            raise ValueError(f"vocab_size must be at least {MIN_VOCAB_SIZE} (4 special + 256 bytes + 1), got {vocab_size}")
        _check_texts(texts)
        word_counts: Counter[str] = Counter()
        for text in texts:
            word_counts.update(_SPLIT_RE.findall(text))
        words = [[BYTE_OFFSET + b for b in word.encode("utf-8")] for word in word_counts]
        counts = list(word_counts.values())

        pair_counts: dict[tuple[int, int], int] = defaultdict(int)
        words_with: dict[tuple[int, int], set[int]] = defaultdict(set)
        for w, (ids, count) in enumerate(zip(words, counts)):
            for pair in zip(ids, ids[1:]):
                pair_counts[pair] += count
                words_with[pair].add(w)
        heap = [(-count, pair) for pair, count in pair_counts.items()]
        heapq.heapify(heap)

        self.merges = []
        self._rebuild()
        progress = _progress_bar(total=vocab_size - self.vocab_size, desc="bpe merges", disable=not verbose)
        while self.vocab_size < vocab_size and heap:
            neg_count, pair = heapq.heappop(heap)
            if pair_counts.get(pair) != -neg_count:
                continue  # stale heap entry: the pair's count changed after it was pushed
            size_before = self.vocab_size
            new_id = self._add_token(self.vocab[pair[0]] + self.vocab[pair[1]])
            self._rank[pair] = len(self.merges)
            self._merged_id.append(new_id)
            self.merges.append(pair)

            delta: dict[tuple[int, int], int] = defaultdict(int)
            for w in words_with.pop(pair):
                ids = words[w]
                merged = _merge_pair(ids, pair, new_id)
                if len(merged) == len(ids):
                    continue  # the index is append-only, so it may list words that no longer hold the pair
                count = counts[w]
                for old in zip(ids, ids[1:]):
                    delta[old] -= count
                for new in zip(merged, merged[1:]):
                    delta[new] += count
                    if new_id in new:
                        words_with[new].add(w)
                words[w] = merged
            for changed, diff in delta.items():
                if diff:
                    count = pair_counts[changed] + diff
                    if count > 0:
                        pair_counts[changed] = count
                        heapq.heappush(heap, (-count, changed))
                    else:
                        del pair_counts[changed]
            progress.update(self.vocab_size - size_before)
        progress.close()
        self._cache.clear()

    # ---------------------------------------------------------------------------------------------- encode/decode
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`. Special-token strings in `text` are ordinary text (never control ids)."""
        ids: list[int] = []
        for word in _SPLIT_RE.findall(text):
            cached = self._cache.get(word)
            if cached is None:
                cached = self._encode_word(word)
                if len(self._cache) >= 100_000:
                    self._cache.clear()  # bound memory on huge corpora; common words come right back
                self._cache[word] = cached
            ids.extend(cached)
        return ids

    def _encode_word(self, word: str) -> list[int]:
        """Apply merges by rank, one occurrence at a time, lowest rank and then leftmost first.

        One-at-a-time (rather than "all occurrences of the best pair") is what `tokenizers` does; the two only
        differ when a reused id makes a lower-ranked pair appear mid-way, but matching it exactly is free.
        """
        ids = [BYTE_OFFSET + b for b in word.encode("utf-8")]
        rank_of = self._rank
        while len(ids) > 1:
            best_rank, best_pos = len(rank_of), -1
            for pos in range(len(ids) - 1):
                rank = rank_of.get((ids[pos], ids[pos + 1]), best_rank)
                if rank < best_rank:
                    best_rank, best_pos = rank, pos
            if best_pos < 0:
                break
            ids[best_pos : best_pos + 2] = [self._merged_id[best_rank]]
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; byte sequences that are not valid UTF-8 become U+FFFD (errors="replace")."""
        if ids and not (0 <= min(ids) and max(ids) < self.vocab_size):
            raise ValueError(f"token ids must be in [0, {self.vocab_size}), got min {min(ids)} max {max(ids)}")
        return b"".join(self.vocab[i] for i in ids).decode("utf-8", errors="replace")

    # ---------------------------------------------------------------------------------------------- save/load
    def save(self, path: str | os.PathLike) -> None:
        """Write a readable JSON file: the merges as id pairs plus every token's text for humans to browse.

        The "tokens" list is informational only; `load` rebuilds the vocabulary from the merges.
        """
        state = {
            "format": _FORMAT,
            "version": _FORMAT_VERSION,
            "pattern": SPLIT_PATTERN,
            "special_tokens": list(SPECIAL_TOKENS),
            "merges": [list(pair) for pair in self.merges],
            "tokens": [token.decode("utf-8", errors="replace") for token in self.vocab],
        }
        atomic_write_text(path, json.dumps(state, ensure_ascii=False, indent=None) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> BPETokenizer:
        try:
            state = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read BPE tokenizer file {path}: {e}") from e
        if not isinstance(state, dict) or state.get("format") != _FORMAT:
            raise ValueError(f"{path} is not a {_FORMAT} file (did you mean lillm.tokenizer.load_tokenizer?)")
        if state.get("pattern") != SPLIT_PATTERN or tuple(state.get("special_tokens", ())) != SPECIAL_TOKENS:
            raise ValueError(f"{path} was saved with a different split pattern or special tokens")
        tokenizer = cls()
        tokenizer.merges = [(int(a), int(b)) for a, b in state["merges"]]
        for rank, (a, b) in enumerate(tokenizer.merges):
            if not (BYTE_OFFSET <= a < BYTE_OFFSET + 256 + rank and BYTE_OFFSET <= b < BYTE_OFFSET + 256 + rank):
                raise ValueError(f"{path}: merge {rank} refers to a token that does not exist yet: {a}, {b}")
        tokenizer._rebuild()
        return tokenizer

    # ---------------------------------------------------------------------------------------------- export
    def to_hf(self) -> Tokenizer:
        """The same tokenizer as a `tokenizers.Tokenizer`: the same ids for every text, with one caveat.

        The split regex runs on Oniguruma there and on Python's `regex` here; they agree on every character
        assigned in Unicode 14, but may classify characters assigned later differently.
        """
        vocab = {_token_string(token): i for i, token in enumerate(self.vocab) if i >= BYTE_OFFSET}
        vocab.update({token: i for i, token in enumerate(SPECIAL_TOKENS)})
        merges = [(_token_string(self.vocab[a]), _token_string(self.vocab[b])) for a, b in self.merges]
        return _with_lillm_pipeline(models.BPE(vocab=vocab, merges=merges, ignore_merges=False))

    def export_hf(self, path: str | os.PathLike) -> None:
        save_tokenizer(self.to_hf(), path)


def _token_string(token: bytes) -> str:
    return "".join(_BYTE_TO_CHAR[b] for b in token)


def _progress_bar(total: int, desc: str, disable: bool):
    from tqdm.auto import tqdm  # imported lazily: only training shows progress

    return tqdm(total=total, desc=desc, disable=disable, unit="tok")


# ------------------------------------------------------------------------------------------ `tokenizers` side
def _with_lillm_pipeline(model: models.Model) -> Tokenizer:
    """Wrap a BPE model with our pre-tokenization (GPT-4 split, then bytes), byte decoder and special tokens."""
    tokenizer = Tokenizer(model)
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    tokenizer.encode_special_tokens = True
    return tokenizer


def train_hf_tokenizer(texts: Iterable[str], vocab_size: int, show_progress: bool = False) -> Tokenizer:
    """Train the same kind of byte-level BPE with the fast Rust `BpeTrainer` (what the scripts use)."""
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be at least {MIN_VOCAB_SIZE} (4 special + 256 bytes + 1), got {vocab_size}")
    _check_texts(texts)
    tokenizer = _with_lillm_pipeline(models.BPE(ignore_merges=False))
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    length = len(texts) if isinstance(texts, Sequence) else None
    tokenizer.train_from_iterator(texts, trainer, length=length)
    _check_special_tokens(tokenizer, "trained tokenizer")
    tokenizer.encode_special_tokens = True
    return tokenizer


def _check_texts(texts: Iterable[str]) -> None:
    if isinstance(texts, str):  # a str is iterable too, and would train on single characters
        raise TypeError("texts must be an iterable of strings (documents), not a single string")


def _check_special_tokens(tokenizer: Tokenizer, where: str) -> None:
    """lillm's own layout (ids 0..3), required of the tokenizers lillm trains."""
    found = [tokenizer.token_to_id(token) for token in SPECIAL_TOKENS]
    if found != list(range(len(SPECIAL_TOKENS))):
        expected = ", ".join(f"{t}={i}" for i, t in enumerate(SPECIAL_TOKENS))
        raise ValueError(f"{where} must have the special tokens {expected}; found ids {found}")


@dataclass(frozen=True)
class SpecialTokens:
    """The control-token ids of one vocabulary, found by name. pad is eos when the vocabulary has no <|pad|>
    (padding is always masked out, so any id that exists would do; eos is the usual choice)."""

    eos: int
    pad: int
    im_start: int
    im_end: int
    control: frozenset[int]  # every special or added token: never shown as text, never produced from text

    @property
    def chat_stop_ids(self) -> tuple[int, ...]:
        """Where a reply ends: the <|im_end|> that closes a turn, or <|endoftext|>."""
        return (self.im_end, self.eos)


def special_tokens(tokenizer: Tokenizer | BPETokenizer) -> SpecialTokens:
    """The control tokens of `tokenizer`, looked up by name (ValueError if a ChatML token is missing)."""
    if isinstance(tokenizer, BPETokenizer):
        eos, pad, im_start, im_end = range(len(SPECIAL_TOKENS))
        return SpecialTokens(eos, pad, im_start, im_end, frozenset(range(len(SPECIAL_TOKENS))))
    ids = {token: tokenizer.token_to_id(token) for token in SPECIAL_TOKENS}
    missing = [token for token in (EOS_TOKEN, IM_START_TOKEN, IM_END_TOKEN) if ids[token] is None]
    if missing:
        raise ValueError(f"the tokenizer has no {', '.join(missing)} token: it cannot render ChatML conversations")
    pad = ids[PAD_TOKEN] if ids[PAD_TOKEN] is not None else ids[EOS_TOKEN]
    control = frozenset(tokenizer.get_added_tokens_decoder())
    return SpecialTokens(ids[EOS_TOKEN], pad, ids[IM_START_TOKEN], ids[IM_END_TOKEN], control)


def _check_loadable(tokenizer: Tokenizer, path: Path) -> None:
    """Any byte-level BPE tokenizer.json whose ChatML tokens exist and are special loads; say what is off."""
    spec = json.loads(tokenizer.to_str())
    if (spec.get("model") or {}).get("type") != "BPE" or "ByteLevel" not in json.dumps(spec.get("decoder")):
        raise ValueError(f"{path} is not a byte-level BPE tokenizer (lillm streams text through its byte table)")
    special = {t["content"] for t in spec.get("added_tokens", []) if t.get("special")}
    not_special = [token for token in (EOS_TOKEN, IM_START_TOKEN, IM_END_TOKEN) if token not in special]
    if not_special:
        raise ValueError(
            f"{path} lacks the ChatML control tokens {', '.join(not_special)} (they must exist and be special); "
            "lillm needs <|endoftext|>, <|im_start|> and <|im_end|>"
        )


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load a `tokenizer.json` so that special-token strings in text are encoded as ordinary text.

    `encode_special_tokens` is not stored in tokenizer.json (tokenizers 0.23), so it is switched on here; load
    tokenizers through this function, not `Tokenizer.from_file`.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"tokenizer file not found: {path} (train one with train_custom_tokenizer.py)")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for malformed files
        raise ValueError(f"{path} is not a valid tokenizer.json: {e}") from e
    _check_loadable(tokenizer, path)
    tokenizer.encode_special_tokens = True
    return tokenizer


def save_tokenizer(tokenizer: Tokenizer, path: str | os.PathLike) -> None:
    """Write a `tokenizers.Tokenizer` as tokenizer.json, atomically."""
    atomic_write_text(path, tokenizer.to_str(pretty=True))


def encode_ordinary(tokenizer: Tokenizer | BPETokenizer, text: str) -> list[int]:
    """Ids of `text` with either tokenizer type, refusing a `tokenizers.Tokenizer` that would turn text into
    control tokens (one loaded with `Tokenizer.from_file` instead of `load_tokenizer`)."""
    if isinstance(tokenizer, BPETokenizer):
        return tokenizer.encode(text)
    if not tokenizer.encode_special_tokens:
        raise ValueError(
            "this tokenizers.Tokenizer would encode '<|im_end|>' typed in text as a control token; "
            "load it with lillm.tokenizer.load_tokenizer (or set encode_special_tokens = True)"
        )
    return tokenizer.encode(text, add_special_tokens=False).ids


def bytes_per_token(tokenizer: Tokenizer, texts: Sequence[str]) -> float:
    """UTF-8 bytes per token over `texts`: the compression figure reported when comparing tokenizers."""
    n_bytes = sum(len(text.encode("utf-8")) for text in texts)
    n_tokens = sum(len(encoding.ids) for encoding in tokenizer.encode_batch(list(texts), add_special_tokens=False))
    if n_tokens == 0:
        raise ValueError("cannot measure bytes/token on empty text")
    return n_bytes / n_tokens
