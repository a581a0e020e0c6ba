"""dpo_train.py end to end on a tiny SFT model: its summary is what the saved weights measure, LoRA saves a plain
model that changed only the adapted weights, resume is bit-exact, DDP equals gradient accumulation, and bad input
fails with one line."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

import dpo_train
from lillm.checkpoint import load_checkpoint
from lillm.dpo import build_preference_data, preference_metrics, read_preference_pairs
from lillm.train import DistInfo

REPO = Path(__file__).resolve().parents[1]
QUICK = ["--batch_size", "4", "--max_pairs", "200", "--val_pairs", "40", "--eval_samples", "0", "--log_interval", "1",
         "--device", "cpu", "--dtype", "fp32"]
CPU = DistInfo(0, 0, 1, torch.device("cpu"))


@pytest.fixture(scope="module")
def dpo_run(sft_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("dpo")
    dpo_train.main(["--init", str(sft_checkpoint), "--out_dir", str(out / "dpo"), "--log_dir", str(out / "runs"),
                    *QUICK, "--max_steps", "24", "--eval_interval", "12", "--ckpt_interval", "24", "--lr", "2e-3", "--max_pairs", "16",
                    "--warmup_steps", "2", "--beta", "0.5", "--eval_samples", "3", "--sample_max_tokens", "16"])
    return out


def test_summary_is_what_the_saved_model_measures_on_held_out_pairs(dpo_run, sft_checkpoint, data_dir):
    dpo, init = load_checkpoint(dpo_run / "dpo"), load_checkpoint(sft_checkpoint)
    meta, summary = dpo.meta, dpo.meta["summary"]
    assert meta["stage"] == "dpo" and meta["init"] == str(sft_checkpoint)
    assert meta["system_prompt"] == init.meta["system_prompt"]
    val = build_preference_data(init.tokenizer, read_preference_pairs(data_dir / "prefs_val.jsonl"), 128,
                                system=meta["system_prompt"], limit=40)
    assert summary["val_pairs"] == len(val)
    reference, counts = dpo_train.held_out_logps(init.model, val, CPU, 4)
    logps, _ = dpo_train.held_out_logps(dpo.model, val, CPU, 4)
    before = preference_metrics(reference, reference, counts, 0.5)
    after = preference_metrics(logps, reference, counts, 0.5)
    assert before["reward_accuracy"] == 0.0  # the untrained policy ties everywhere, and ties count as wrong
    assert summary["val_ll_prefers_chosen_before"] == before["ll_prefers_chosen"]
    assert summary["val_reward_accuracy"] == pytest.approx(after["reward_accuracy"], abs=1.01 / len(val))
    assert summary["val_ll_prefers_chosen"] == pytest.approx(after["ll_prefers_chosen"], abs=1.01 / len(val))
    assert summary["val_margin"] == pytest.approx(after["margin"], abs=1e-4)
    assert after["margin"] != 0.0 and summary["train_pairs_seen"] == 24 * 4  # 16 pairs, 6 epochs
    assert len(summary["examples"]) == 3 and all({"user", "before", "after"} <= set(e) for e in summary["examples"])


def test_training_pairs_are_learned_and_curves_are_written(dpo_run):
    with open(dpo_run / "runs" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train_reward_accuracy")]
    assert [int(float(r["step"])) for r in rows] == [12, 24]
    assert float(rows[-1]["train_reward_accuracy"]) >= 0.8  # 16 pairs, 6 epochs; observed: 0.85 at step 12, 1.00 at 24
    assert float(rows[-1]["train_margin"]) > 0
    for png in ("loss.png", "reward_accuracy.png"):
        assert (dpo_run / "runs" / png).stat().st_size > 10_000


def test_lora_run_saves_a_plain_model_that_changed_only_adapted_weights(sft_checkpoint, tmp_path):
    dpo_train.main(["--init", str(sft_checkpoint), "--out_dir", str(tmp_path / "lora"), "--log_dir", str(tmp_path / "runs"),
                    *QUICK, "--max_steps", "6", "--eval_interval", "6", "--ckpt_interval", "6", "--lr", "1e-2",
                    "--lora_rank", "4", "--lora_targets", "q_proj,v_proj", "--lora_layers", "1"])
    base, lora = load_file(sft_checkpoint / "model.safetensors"), load_file(tmp_path / "lora" / "model.safetensors")
    assert sorted(lora) == sorted(base)  # no adapter tensors
    changed = {name for name in base if not np.array_equal(base[name], lora[name])}
    assert changed == {"layers.1.attn.q_proj.weight", "layers.1.attn.v_proj.weight"}  # the last block only


def test_resume_continues_exactly(sft_checkpoint, tmp_path):
    # a constant learning rate makes the first 4 steps of a 4-step run those of an 8-step run
    common = ["--init", str(sft_checkpoint), *QUICK, "--lr", "1e-3", "--min_lr", "1e-3", "--warmup_steps", "0",
              "--eval_interval", "4", "--ckpt_interval", "4"]
    dpo_train.main([*common, "--max_steps", "8", "--out_dir", str(tmp_path / "straight"), "--log_dir", str(tmp_path / "l1")])
    dpo_train.main([*common, "--max_steps", "4", "--out_dir", str(tmp_path / "resumed"), "--log_dir", str(tmp_path / "l2")])
    dpo_train.main([*common, "--max_steps", "8", "--out_dir", str(tmp_path / "resumed"), "--log_dir", str(tmp_path / "l2"),
                    "--resume"])
    straight, resumed = load_file(tmp_path / "straight" / "model.safetensors"), load_file(tmp_path / "resumed" / "model.safetensors")
    for name in straight:
        np.testing.assert_array_equal(resumed[name], straight[name], err_msg=name)


def run_script(args: list[str], nproc: int = 1) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else [sys.executable]
    return subprocess.run([*launcher, "dpo_train.py", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.distributed
def test_two_process_ddp_equals_one_process_with_grad_accum(sft_checkpoint, tmp_path):
    common = ["--init", str(sft_checkpoint), *QUICK, "--max_steps", "4", "--eval_interval", "4", "--ckpt_interval", "4"]
    dpo_train.main([*common, "--grad_accum", "2", "--out_dir", str(tmp_path / "one"), "--log_dir", str(tmp_path / "l1")])
    result = run_script([*common, "--out_dir", str(tmp_path / "two"), "--log_dir", str(tmp_path / "l2")], nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    for name in one:
        np.testing.assert_allclose(two[name], one[name], atol=1e-5, err_msg=name)
    s1, s2 = (json.loads((tmp_path / d / "meta.json").read_text())["summary"] for d in ("one", "two"))
    assert s2["val_margin"] == pytest.approx(s1["val_margin"], abs=1e-5)
    assert s2["val_reward_accuracy"] == s1["val_reward_accuracy"]


GOOD = {"prompt": [{"role": "user", "content": "Hi"}], "chosen": "Hello! How can I help?", "rejected": "Go away."}


def test_malformed_line_fails_with_one_line_naming_file_and_line(sft_checkpoint, tmp_path):
    bad = tmp_path / "prefs.jsonl"
    bad.write_text(f"{json.dumps(GOOD)}\n{json.dumps(GOOD)}\n" + '{"prompt": [{"role": "user", "content": "Hi"}]\n')
    result = run_script(["--init", str(sft_checkpoint), "--train_file", str(bad), "--out_dir", str(tmp_path / "out")])
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"dpo_train.py: error: {bad}:3: not valid JSON")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "pair, flags, message",
    [
        ({**GOOD, "rejected": GOOD["chosen"]}, [], "{file}:2: 'chosen' and 'rejected' are the same reply"),
        ({"prompt": GOOD["prompt"], "chosen": "Hi"}, [], "{file}:2: missing field(s) 'rejected'"),
        (GOOD, ["--beta", "0"], "--beta must be positive, got 0.0"),
        (GOOD, ["--max_seq_len", "4096"], "--max_seq_len 4096 must be in 2..128"),
        (GOOD, ["--val_file", "{tmp}/missing.jsonl"], "preference file not found: {tmp}/missing.jsonl"),
    ],
)
def test_bad_input_exits_2_with_a_clear_message(sft_checkpoint, tmp_path, capsys, pair, flags, message):
    path = tmp_path / "prefs.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps(pair) + "\n")
    flags = [f.format(tmp=tmp_path) for f in flags]
    with pytest.raises(SystemExit) as exit_info:
        dpo_train.main(["--init", str(sft_checkpoint), "--train_file", str(path), "--out_dir", str(tmp_path / "out"), *flags])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"dpo_train.py: error: {message.format(file=path, tmp=tmp_path)}")
    assert not (tmp_path / "out").exists()
