"""Which requested words a fine-tuned story model copies: by their place in the instruction's list, and by whether
the tokenizer keeps them as one token.

    python bench/instruct_word_positions.py --checkpoint speedrun/sft --val_file speedrun/story_instruct/story_instruct_val.jsonl
    python bench/instruct_word_positions.py ... --no_repeat_ngram 3    # the same, decoded without repeated trigrams

The same greedy replies as the SFT summary's instruction score (lillm.instruct.instruction_scores on the first
--n held-out words and begin instructions, the checkpoint's system message, the whole context); prints the
scores, then how often the 1st, 2nd, ... listed word is used, the share of one-token and split words used, and
how many times the held-out stories themselves use each of their requested words (against the replies' uses_per_word).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lillm.checkpoint import load_checkpoint  # noqa: E402  (after the path insert)
from lillm.generate import checkpoint_system_prompt  # noqa: E402
from lillm.instruct import contains_word, held_out_instructions, instruction_scores, words_followed  # noqa: E402
from lillm.sft_data import read_jsonl_conversations  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True, help="a fine-tuned checkpoint folder")
    p.add_argument("--val_file", type=Path, required=True, help="held-out story instructions (chat jsonl)")
    p.add_argument("--n", type=int, default=100, help="words and begin instructions scored (as sft_train.py's default)")
    p.add_argument("--no_repeat_ngram", type=int, default=0, help="decode without repeating an n-gram of the reply (0 = plain greedy)")
    args = p.parse_args()

    ckpt = load_checkpoint(args.checkpoint)
    conversations = [m for _, m in read_jsonl_conversations(args.val_file)]
    instructions = held_out_instructions(conversations, args.n)
    stories = {m[0]["content"]: m[-1]["content"] for m in conversations}
    scores, examples = instruction_scores(ckpt.model, ckpt.tokenizer, instructions, True,
                                          checkpoint_system_prompt(ckpt.meta), ckpt.config.max_seq_len,
                                          no_repeat_ngram=args.no_repeat_ngram)
    used_at: list[int] = []
    used = {True: [0, 0], False: [0, 0]}  # one token? -> [used, requested]
    for example, (_, instruction) in zip(examples, instructions["words"]):
        for place, word in enumerate(instruction.words):
            hit = contains_word(example["reply"], word)
            used_at.extend([0] * (place + 1 - len(used_at)))
            used_at[place] += hit
            tally = used[len(ckpt.tokenizer.encode(" " + word).ids) == 1]
            tally[0] += hit
            tally[1] += 1
    story_uses = words_followed([stories[text] for text, _ in instructions["words"]],
                                [i.words for _, i in instructions["words"]])["uses_per_word"]
    print(json.dumps({"scores": scores, "used_by_place": used_at, "one_token_words_used": used[True],
                      "split_words_used": used[False], "held_out_stories_uses_per_word": story_uses}))


if __name__ == "__main__":
    main()
