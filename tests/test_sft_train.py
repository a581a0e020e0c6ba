"""sft_train.py end to end: it learns the assistant turns and to stop, LoRA saves a plain model, resume is exact,
DDP equals gradient accumulation, bad input fails with one clear line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

import sft_train
from lillm.chat import CHAT_TEMPLATE_VERSION, DEFAULT_SYSTEM_PROMPT
from lillm.checkpoint import load_checkpoint
from lillm.model import LilLM
from lillm.sft_data import build_sft_dataset, read_jsonl_conversations
from lillm.train import DistInfo

REPO = Path(__file__).resolve().parents[1]
QUICK = ["--batch_size", "4", "--warmup_steps", "2", "--eval_samples", "0", "--val_conversations", "20",
         "--max_conversations", "200", "--log_interval", "1", "--device", "cpu", "--dtype", "fp32"]


def held_out_loss(model: LilLM, tokenizer, data_dir: Path, max_seq_len: int) -> float:
    val = build_sft_dataset(tokenizer, read_jsonl_conversations(data_dir / "chat_val.jsonl"), max_seq_len,
                            system=DEFAULT_SYSTEM_PROMPT)
    with torch.no_grad():
        return sft_train.assistant_loss(model, val, DistInfo(0, 0, 1, torch.device("cpu")), batch_size=16)


def test_sft_lowers_held_out_assistant_loss_and_teaches_the_model_to_stop(sft_checkpoint, base_checkpoint, data_dir):
    sft = load_checkpoint(sft_checkpoint)
    meta, summary = sft.meta, sft.meta["summary"]
    assert meta["stage"] == "sft" and meta["chat_template_version"] == CHAT_TEMPLATE_VERSION
    assert meta["system_prompt"] == DEFAULT_SYSTEM_PROMPT and meta["args"]["init"] == str(base_checkpoint)
    # the reported numbers are those of the saved weights, measured on the whole held-out file
    base = load_checkpoint(base_checkpoint)
    before = held_out_loss(base.model, base.tokenizer, data_dir, base.config.max_seq_len)
    after = held_out_loss(sft.model, sft.tokenizer, data_dir, sft.config.max_seq_len)
    assert before == pytest.approx(summary["val_loss_before"], abs=1e-4)
    assert after == pytest.approx(summary["val_loss"], abs=1e-4)
    assert after < before - 1.0  # observed: 5.90 -> ~4.4 nats/token

    # most greedy replies to held-out prompts end with <|im_end|>; the base model, never trained on the
    # template, ends none of the same prompts
    assert summary["im_end_samples"] == 30 and summary["im_end_rate"] >= 0.6  # observed: 0.83-1.00 over 4 runs
    prompts = sft_train.held_out_prompts(base.tokenizer, read_jsonl_conversations(data_dir / "chat_val.jsonl"), 30,
                                         summary["sample_max_tokens"], base.config.max_seq_len, DEFAULT_SYSTEM_PROMPT)
    base_rate, _ = sft_train.im_end_rate(base.model, base.tokenizer, prompts, summary["sample_max_tokens"])
    assert base_rate <= 0.1


def test_lora_run_trains_adapters_only_and_saves_a_plain_merged_model(base_checkpoint, data_dir, tmp_path):
    out = tmp_path / "lora"
    sft_train.main(["--init", str(base_checkpoint), "--out_dir", str(out), "--log_dir", str(tmp_path / "runs"), *QUICK,
                    "--max_steps", "30", "--eval_interval", "30", "--ckpt_interval", "30", "--lr", "1e-2",
                    "--lora_rank", "4", "--lora_targets", "q_proj,v_proj"])
    base, lora = load_file(base_checkpoint / "model.safetensors"), load_file(out / "model.safetensors")
    assert sorted(lora) == sorted(base)  # a plain LilLM, no adapter tensors
    changed = {name for name in base if not np.array_equal(base[name], lora[name])}
    assert changed == {f"layers.{i}.attn.{p}.weight" for i in range(2) for p in ("q_proj", "v_proj")}
    summary = json.loads((out / "meta.json").read_text())["summary"]
    assert summary["val_loss"] < summary["val_loss_before"] - 0.1
    assert (tmp_path / "runs" / "loss.png").stat().st_size > 0 and (tmp_path / "runs" / "metrics.csv").is_file()


def test_resume_continues_exactly(base_checkpoint, tmp_path):
    # a constant learning rate makes the first 10 steps of a 10-step run those of a 20-step run
    common = ["--init", str(base_checkpoint), *QUICK, "--lr", "3e-3", "--min_lr", "3e-3", "--warmup_steps", "0",
              "--eval_interval", "10", "--ckpt_interval", "10", "--lora_rank", "4"]
    sft_train.main([*common, "--max_steps", "20", "--out_dir", str(tmp_path / "straight"), "--log_dir", str(tmp_path / "l1")])
    sft_train.main([*common, "--max_steps", "10", "--out_dir", str(tmp_path / "resumed"), "--log_dir", str(tmp_path / "l2")])
    sft_train.main([*common, "--max_steps", "20", "--out_dir", str(tmp_path / "resumed"), "--log_dir", str(tmp_path / "l2"),
                    "--resume"])
    straight, resumed = load_file(tmp_path / "straight" / "model.safetensors"), load_file(tmp_path / "resumed" / "model.safetensors")
    for name in straight:
        np.testing.assert_array_equal(resumed[name], straight[name], err_msg=name)


def run_script(args: list[str], nproc: int = 1) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else [sys.executable]
    return subprocess.run([*launcher, "sft_train.py", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_malformed_chat_file_fails_with_one_line_naming_file_and_line(base_checkpoint, tmp_path):
    bad = tmp_path / "chat.jsonl"
    good = json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]})
    bad.write_text(f"{good}\n{good}\n" + '{"messages": [{"role": "user", "content": "Hi"}]\n')
    result = run_script(["--init", str(base_checkpoint), "--train_file", str(bad), "--out_dir", str(tmp_path / "out")])
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"sft_train.py: error: {bad}:3: expected a JSON object with a 'messages' list")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--init", "{tmp}/nowhere"], "checkpoint folder not found: {tmp}/nowhere"),
        (["--max_seq_len", "4096"], "--max_seq_len 4096 must be in 2..128"),
        (["--lora_rank", "-1"], "--lora_rank must be >= 0, got -1"),
        (["--word_weight", "0"], "--word_weight must be a positive number, got 0.0"),
        (["--word_weight", "nan"], "--word_weight must be a positive number, got nan"),
        (["--word_weight", "30", "--train_on_inputs"], "--word_weight has no effect with --train_on_inputs"),
        (["--word_unlikelihood", "-1"], "--word_unlikelihood must be a number >= 0, got -1.0"),
        (["--instruct_no_repeat_ngram", "-1"], "--instruct_no_repeat_ngram must be >= 0, got -1"),
        (["--word_unlikelihood", "1"], "--word_unlikelihood finds the requested words by their --word_weight"),
        (["--sample_max_tokens", "127"], "no held-out prompt leaves room for a 127-token reply in 128 tokens"),
        (["--train_file", "{tmp}/missing.jsonl"], "chat file not found: {tmp}/missing.jsonl"),
    ],
)
def test_bad_input_exits_2_with_a_clear_message(base_checkpoint, tmp_path, capsys, flags, message):
    flags = [f.format(tmp=tmp_path) for f in flags]
    with pytest.raises(SystemExit) as exit_info:
        sft_train.main(["--init", str(base_checkpoint), "--out_dir", str(tmp_path / "out"), *flags])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"sft_train.py: error: {message.format(tmp=tmp_path)}")


@pytest.mark.distributed
def test_two_process_ddp_equals_one_process_with_grad_accum(base_checkpoint, tmp_path):
    common = ["--init", str(base_checkpoint), *QUICK, "--max_steps", "6", "--eval_interval", "6", "--ckpt_interval", "6"]
    sft_train.main([*common, "--grad_accum", "2", "--out_dir", str(tmp_path / "one"), "--log_dir", str(tmp_path / "l1")])
    result = run_script([*common, "--out_dir", str(tmp_path / "two"), "--log_dir", str(tmp_path / "l2")], nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    for name in one:
        np.testing.assert_allclose(two[name], one[name], atol=1e-5, err_msg=name)
    meta_one, meta_two = (json.loads((tmp_path / d / "meta.json").read_text()) for d in ("one", "two"))
    assert meta_two["summary"]["val_loss"] == pytest.approx(meta_one["summary"]["val_loss"], abs=1e-5)
