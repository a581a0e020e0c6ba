"""Take the README's chat screenshot: serve inference_gradio.py's page for a checkpoint, send one message from a
headless Chromium with greedy sampling, and save the page once the reply has finished streaming.

    python misc/screenshot_chat.py --checkpoint speedrun/sft \
        --message "Write a short story that uses the words: kite, rain, bread." --out misc/gradio_chat.png

Greedy, so the reply on the page is the one `inference.py --chat --temperature 0` prints for the same message.
"""

from __future__ import annotations

import argparse
import re
import socket
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lillm import cli  # noqa: E402  (after the path insert, so the script runs from anywhere)

CHROMIUM = "/usr/bin/chromium"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def set_slider(page, label: str, value: int) -> None:
    """Type a value into a sidebar slider's number box and wait until the page's state holds it."""
    from playwright.sync_api import expect

    number = page.get_by_label(f"number input for {label}")
    number.fill(str(value))
    number.press("Enter")
    expect(page.get_by_label(f"range slider for {label}")).to_have_value(str(value))


def greedy_reply(checkpoint: Path, message: str, max_new_tokens: int) -> str:
    """The reply the page must show: lillm.generate's greedy reply with the checkpoint's system message."""
    from lillm.checkpoint import load_checkpoint
    from lillm.generate import SamplingConfig, chat_reply, checkpoint_system_prompt

    ckpt = load_checkpoint(checkpoint)
    cfg = SamplingConfig(temperature=0.0, max_new_tokens=max_new_tokens)
    messages = [{"role": "user", "content": message}]
    return "".join(chat_reply(ckpt.model, ckpt.tokenizer, messages, cfg, system=checkpoint_system_prompt(ckpt.meta)))


def letters(text: str) -> str:
    """The page renders the reply as markdown (quotes and spacing may change): compare letters and digits."""
    return re.sub(r"[^A-Za-z0-9]", "", text)


def screenshot(url: str, message: str, max_new_tokens: int, expected: str, out: Path) -> None:
    """Chat once on the page at url, wait until the reply shown is `expected` in full, save the screenshot."""
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 800})
            page.goto(url, wait_until="load")
            box = page.locator("#message textarea")
            box.wait_for(timeout=30_000)
            set_slider(page, "Temperature (0 = greedy)", 0)
            set_slider(page, "Max new tokens", max_new_tokens)
            box.fill(message)
            box.press("Enter")
            page.wait_for_function(  # the reply has streamed in completely
                "want => { const m = document.querySelector('[data-testid=bot]');"
                " return m !== null && m.innerText.replace(/[^A-Za-z0-9]/g, '') === want; }",
                arg=letters(expected), timeout=120_000,
            )
            expect(page.locator('button[aria-label="Stop"]')).to_have_count(0, timeout=30_000)
            expect(page.locator("#speed")).to_contain_text("tokens/s", timeout=30_000)
            out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(out), full_page=True)
        finally:
            browser.close()


@cli.error_boundary("screenshot_chat.py")  # a missing or broken checkpoint: one line, exit status 2
def main(argv: list[str] | None = None) -> None:
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True, help="checkpoint folder to serve")
    p.add_argument("--message", required=True, help="the user message to send")
    p.add_argument("--max_new_tokens", type=int, default=128, help="the page's Max new tokens slider")
    p.add_argument("--out", type=Path, default=Path("misc/gradio_chat.png"), help="PNG to write")
    args = p.parse_args(argv)
    if not Path(CHROMIUM).is_file():
        p.error(f"{CHROMIUM} is missing: apt-get install chromium")

    from inference_gradio import build_demo

    demo = build_demo(args.checkpoint, device="cpu")
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)
    expected = greedy_reply(args.checkpoint, args.message, args.max_new_tokens)
    try:
        screenshot(url, args.message, args.max_new_tokens, expected, args.out)
    finally:
        demo.close()
    print(f"wrote {args.out}; the reply on the page:\n{expected}")


if __name__ == "__main__":
    main()
