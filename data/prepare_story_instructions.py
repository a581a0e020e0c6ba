"""Turn TinyStories into instruction-following chat data for sft_train.py.

    python data/prepare_story_instructions.py --out_dir data/story_instruct     # stories from ../shared/data
    python data/prepare_story_instructions.py --train_file a.txt --val_file b.txt --n_words 2 --out_dir DIR

Writes DIR/story_instruct_train.jsonl and DIR/story_instruct_val.jsonl, one conversation a line:
{"messages": [{"role": "user", ...}, {"role": "assistant", ...}], "source": "story_instruct/<kind>"}.
Every story becomes a "words" conversation ("Write a short story that uses the words: ...", the reply is the
story) and one of "begin" ("Write a story that begins with: <first sentence>", the reply is the story) or
"continue" ("Continue this story: <first half>", the reply is the rest). The held-out file is made only from
--val_file's stories, and a training story identical to a held-out one is skipped. The output depends only on
the inputs and the flags (seeded per story), so two runs write identical bytes. --words_within N requests only
words from a story's first N words; --words_draws K gives each training story up to K distinct word sets;
--cut_chars N cuts each training story longer than N characters after its last sentence within N, so long
stories are used too (held-out stories over --max_chars are always skipped, so the held-out set does not change).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lillm.corpus import check_files, read_txt  # noqa: E402
from lillm.instruct import COMMON_WORDS, common_words, conversation, cut_story, word_counts  # noqa: E402
from lillm.paths import default_data_file  # noqa: E402
from lillm.tokenizer import atomic_write_text  # noqa: E402


def story_conversations(
    stories: list[str], common: frozenset[str], n_words: int, seed: int, split: str,
    words_within: int | None = None, words_draws: int = 1,
) -> list[str]:
    """jsonl lines: up to words_draws words conversations per story (each its own draw of words; a draw that
    repeats an earlier one is dropped), then begin or continue (chosen by a seeded draw)."""
    lines = []
    for i, story in enumerate(stories):
        rng = random.Random(f"{seed}:{split}:{i}")  # per story, so one story's draws never shift another's
        made: set[str] = set()
        for kind in ("words",) * words_draws + (rng.choice(("begin", "continue")),):
            messages = conversation(kind, story, common, n_words, rng, words_within)
            if messages is not None and messages[0]["content"] not in made:
                made.add(messages[0]["content"])
                lines.append(json.dumps({"messages": messages, "source": f"story_instruct/{kind}"}, ensure_ascii=False))
    return lines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train_file", type=Path, help="stories separated by blank lines (default: TinyStories train)")
    p.add_argument("--val_file", type=Path, help="held-out stories (default: TinyStories val)")
    p.add_argument("--out_dir", type=Path, default=Path("data/story_instruct"))
    p.add_argument("--n_words", type=int, default=3, help="words requested per story")
    p.add_argument("--words_within", type=int,
                   help="request only words a story uses among its first N words (default: anywhere in it)")
    p.add_argument("--words_draws", type=int, default=1,
                   help="words conversations per training story, each with its own words (held-out: always 1)")
    p.add_argument("--max_chars", type=int, default=800,
                   help="skip longer stories (800 characters fit a 256-token context with a 2048-token tokenizer)")
    p.add_argument("--cut_chars", type=int,
                   help="cut each training story longer than N characters after its last sentence within N, instead "
                        "of skipping those over --max_chars (held-out stories over --max_chars are still skipped)")
    p.add_argument("--common_words", type=int, default=COMMON_WORDS, help="never request the N most frequent words")
    p.add_argument("--seed", type=int, default=1337)
    args = p.parse_args(argv)
    try:
        for name in ("n_words", "max_chars", "cut_chars", "words_within", "words_draws"):
            if getattr(args, name) is not None and getattr(args, name) < 1:
                raise ValueError(f"--{name} must be positive, got {getattr(args, name)}")
        train_file = args.train_file or default_data_file("pretrain_tinystories_train.txt")
        val_file = args.val_file or default_data_file("pretrain_tinystories_val.txt")
        check_files([train_file, val_file])
        train_all = list(read_txt(train_file))
        common = common_words(word_counts(train_all), args.common_words)
        val = [s for s in read_txt(val_file) if len(s) <= args.max_chars]
        held_out = set(val)
        train = [s for s in train_all if s not in held_out]
        if args.cut_chars is not None:
            train = [c for c in (cut_story(s, args.cut_chars) for s in train) if c is not None]
        else:
            train = [s for s in train if len(s) <= args.max_chars]
        out = {}
        for split, stories in (("train", train), ("val", val)):
            draws = args.words_draws if split == "train" else 1
            lines = story_conversations(stories, common, args.n_words, args.seed, split, args.words_within, draws)
            if not lines:
                raise ValueError(f"no story of {train_file if split == 'train' else val_file} has at most --max_chars {args.max_chars} characters")
            out[split] = lines
        args.out_dir.mkdir(parents=True, exist_ok=True)
        for split, lines in out.items():
            atomic_write_text(args.out_dir / f"story_instruct_{split}.jsonl", "\n".join(lines) + "\n")
            print(f"wrote {args.out_dir / f'story_instruct_{split}.jsonl'}: {len(lines):,} conversations")
    except (ValueError, FileNotFoundError) as e:  # CorpusError is a ValueError
        print(f"prepare_story_instructions.py: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
