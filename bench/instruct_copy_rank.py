"""How strongly a fine-tuned story model copies requested words, with no sampling in the way: teacher-forced on
held-out words conversations (the instruction, then the true story), is a requested word's first token the
model's top prediction at the place where the story first uses the word?

    python bench/instruct_copy_rank.py --checkpoint speedrun/sft --val_file speedrun/story_instruct/story_instruct_val.jsonl

Measured twice per story: after its own instruction, and after a different instruction's (a rotation, as the
SFT summary's contrast does), so the second number is what the story alone predicts. Uses the checkpoint's
system message; words whose first use falls past the context are skipped. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lillm.chat import render  # noqa: E402  (after the path insert)
from lillm.checkpoint import load_checkpoint  # noqa: E402
from lillm.generate import checkpoint_system_prompt  # noqa: E402
from lillm.instruct import WORDS_TEMPLATE, held_out_instructions, requested_word_positions, shuffled  # noqa: E402
from lillm.sft_data import read_jsonl_conversations  # noqa: E402


def reply_start(tokenizer, user: str, system: str | None) -> int:
    """Index of a reply's first token after this user turn."""
    return len(render(tokenizer, [{"role": "user", "content": user}], add_generation_prompt=True, system=system)[0])


def first_use(tokenizer, word: str, story: str, system: str | None) -> int:
    """The story's first token of `word`'s first use, counted from the reply's start."""
    messages = [{"role": "user", "content": WORDS_TEMPLATE.format(words=word)}, {"role": "assistant", "content": story}]
    return min(requested_word_positions(tokenizer, messages, system)) - reply_start(tokenizer, messages[0]["content"], system)


@torch.no_grad()
def top1(model, tokenizer, user: str, story: str, offsets: list[int], system: str | None) -> list[bool]:
    """For each reply offset inside the context: whether the model's argmax there is the story's token."""
    ids, _ = render(tokenizer, [{"role": "user", "content": user}, {"role": "assistant", "content": story}], system=system)
    start, n = reply_start(tokenizer, user, system), model.config.max_seq_len
    logits, _ = model(torch.tensor([ids[:n]]))
    return [int(logits[0, start + o - 1].argmax()) == ids[start + o] for o in offsets if start + o < n]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True, help="a fine-tuned checkpoint folder")
    p.add_argument("--val_file", type=Path, required=True, help="held-out story instructions (chat jsonl)")
    p.add_argument("--n", type=int, default=100, help="words conversations measured (as sft_train.py's default)")
    args = p.parse_args()

    ckpt = load_checkpoint(args.checkpoint)
    model, tokenizer, system = ckpt.model.eval(), ckpt.tokenizer, checkpoint_system_prompt(ckpt.meta)
    conversations = [m for _, m in read_jsonl_conversations(args.val_file)]
    story_of = {m[0]["content"]: m[1]["content"] for m in conversations}
    items = held_out_instructions(conversations, args.n)["words"]
    own_hits, other_hits = [], []
    for (user, instruction), other in zip(items, shuffled([user for user, _ in items])):
        story = story_of[user]
        offsets = [first_use(tokenizer, w, story, system) for w in instruction.words]
        own_hits += top1(model, tokenizer, user, story, offsets, system)
        other_hits += top1(model, tokenizer, other, story, offsets, system)
    print(json.dumps({"stories": len(items), "words": len(own_hits),
                      "top1_own_instruction": sum(own_hits) / len(own_hits),
                      "top1_other_instruction": sum(other_hits) / len(other_hits)}))


if __name__ == "__main__":
    main()
