"""inference.py as a user runs it: a subprocess on a real (tiny) pretrained checkpoint."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from lillm.checkpoint import load_checkpoint
from lillm.generate import SamplingConfig, generate_ids, stream_text
from lillm.tokenizer import encode_ordinary

EOS_ID = 0  # lillm's own layout (the tokenizers here are trained by lillm)

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # a tiny model decodes fastest on one thread


def run(repo_root, *args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(repo_root / "inference.py"), *args],
        input=stdin, capture_output=True, text=True, env=ENV, cwd=repo_root, timeout=120,
    )


def test_prompt_streams_the_greedy_completion(repo_root, base_checkpoint):
    prompt = "Once upon a time, there was a"
    result = run(repo_root, "--checkpoint", str(base_checkpoint), "--prompt", prompt,
                 "--temperature", "0", "--max_new_tokens", "24", "--no_cache")
    assert result.returncode == 0, result.stderr
    ckpt = load_checkpoint(base_checkpoint)
    ids = generate_ids(ckpt.model, [EOS_ID, *encode_ordinary(ckpt.tokenizer, prompt)],
                       SamplingConfig(temperature=0.0, max_new_tokens=24).with_stops(ckpt.tokenizer))
    expected = prompt + "".join(stream_text(ckpt.tokenizer, ids)) + "\n"
    assert result.stdout == expected and len(expected) > len(prompt) + 10
    assert "tokens/s" in result.stderr


def test_no_repeat_ngram_reaches_the_sampler(base_checkpoint, capsys):
    import inference  # in-process: the flag's path, not the process start, is what is tested

    prompt = "Once upon a time, there was a"
    inference.main(["--checkpoint", str(base_checkpoint), "--prompt", prompt, "--temperature", "0",
                    "--max_new_tokens", "64", "--no_repeat_ngram", "2"])
    ckpt = load_checkpoint(base_checkpoint)
    cfg = SamplingConfig(temperature=0.0, max_new_tokens=64, no_repeat_ngram=2).with_stops(ckpt.tokenizer)
    ids = list(generate_ids(ckpt.model, [EOS_ID, *encode_ordinary(ckpt.tokenizer, prompt)], cfg))
    bigrams = list(zip(ids, ids[1:]))
    assert capsys.readouterr().out == prompt + "".join(stream_text(ckpt.tokenizer, ids)) + "\n"
    assert len(set(bigrams)) == len(bigrams) > 20


def test_chat_reads_turns_from_stdin_until_eof(repo_root, base_checkpoint):
    # same first message before and after /reset, greedy: the two replies must be identical
    stdin = "Hello, who are you?\nTell me more.\n/reset\nHello, who are you?\n"
    result = run(repo_root, "--checkpoint", str(base_checkpoint), "--chat", "--temperature", "0",
                 "--max_new_tokens", "16", "--system", "Be brief.", stdin=stdin)
    assert result.returncode == 0, result.stderr
    replies = [line.split("assistant> ", 1)[1] for line in result.stdout.splitlines() if "assistant> " in line]
    assert len(replies) == 3 and replies[0] == replies[2] and replies[0].strip()
    assert "(new conversation)" in result.stdout
    assert "not chat-tuned" in result.stderr  # a base checkpoint says so
    assert result.stderr.count("tokens/s") == 3


def test_errors_are_one_line_and_exit_2(repo_root, base_checkpoint, tmp_path, capsys):
    result = run(repo_root, "--checkpoint", str(tmp_path / "missing"), "--prompt", "hi")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == f"inference.py: error: checkpoint folder not found: {tmp_path / 'missing'}\n"

    import inference  # the other errors in-process: a subprocess costs seconds on a busy 2-core machine

    for args, message in (
        (["--top_p", "1.5"], "top_p must be in (0, 1], got 1.5"),
        (["--max_new_tokens", "0"], "max_new_tokens must be an integer >= 1, got 0"),
        (["--no_repeat_ngram", "-2"], "no_repeat_ngram must be an integer >= 0, got -2"),
        (["--dtype", "fp8"], "unknown dtype 'fp8'"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            inference.main(["--checkpoint", str(base_checkpoint), "--prompt", "hi", *args])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2
        assert err.startswith("inference.py: error: ") and message in err and err.count("\n") == 1
