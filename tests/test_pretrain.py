"""pretrain.py end to end: DDP equals gradient accumulation, kill -9 then --resume is bit-exact, bad input fails clearly."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

import pretrain

REPO = Path(__file__).resolve().parents[1]
TINY = ["--dim", "32", "--n_layers", "2", "--n_heads", "2", "--n_kv_heads", "1", "--max_seq_len", "32",
        "--warmup_steps", "5", "--eval_batches", "2", "--log_interval", "1", "--device", "cpu", "--dtype", "fp32"]


def run_script(args: list[str], nproc: int = 1, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else [sys.executable]
    result = subprocess.run([*launcher, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300, **kwargs)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def train_losses(log_dir: Path, column: str = "train_loss") -> list[float]:
    with open(log_dir / "metrics.csv") as f:
        return [float(r[column]) for r in csv.DictReader(f) if r.get(column)]


@pytest.mark.distributed
def test_two_process_ddp_equals_one_process_with_grad_accum(shards_dir, tmp_path):
    common = ["pretrain.py", "--data_dir", str(shards_dir), *TINY, "--max_steps", "12", "--eval_interval", "12",
              "--ckpt_interval", "12", "--batch_size", "4"]
    run_script([*common, "--grad_accum", "2", "--out_dir", str(tmp_path / "one"), "--log_dir", str(tmp_path / "log1")])
    run_script([*common, "--grad_accum", "1", "--out_dir", str(tmp_path / "two"), "--log_dir", str(tmp_path / "log2")], nproc=2)
    one, two = train_losses(tmp_path / "log1"), train_losses(tmp_path / "log2")
    assert len(one) == len(two) == 12
    np.testing.assert_allclose(two, one, atol=1e-5, rtol=0)
    assert one[-1] < one[0] - 0.2  # and it learned something
    norms_one, norms_two = train_losses(tmp_path / "log1", "grad_norm"), train_losses(tmp_path / "log2", "grad_norm")
    np.testing.assert_allclose(norms_two, norms_one, rtol=1e-4)  # the global norm, not summed over ranks
    w1, w2 = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    for name in w1:
        np.testing.assert_allclose(w2[name], w1[name], atol=1e-5, err_msg=name)


def test_kill_then_resume_is_bit_exact(shards_dir, tmp_path):
    common = ["pretrain.py", "--data_dir", str(shards_dir), *TINY, "--max_steps", "150", "--eval_interval", "50",
              "--ckpt_interval", "10", "--batch_size", "4", "--dropout", "0.1"]  # dropout: the RNG state matters
    run_script([*common, "--out_dir", str(tmp_path / "full"), "--log_dir", str(tmp_path / "log_full")])

    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, *common, "--out_dir", str(out), "--log_dir", str(tmp_path / "log_k")],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / "meta.json").is_file() and not (out.parent / "killed.old").is_dir() and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = json.loads(((out if out.is_dir() else out.parent / "killed.old") / "meta.json").read_text())["step"]
    assert killed_at < 150, "the run finished before it could be killed"

    run_script([*common, "--out_dir", str(out), "--log_dir", str(tmp_path / "log_k"), "--resume"])
    assert json.loads((out / "meta.json").read_text())["step"] == 150
    full, resumed = load_file(tmp_path / "full" / "model.safetensors"), load_file(out / "model.safetensors")
    for name in full:
        assert np.array_equal(full[name], resumed[name]), f"{name} differs after resume (killed at step {killed_at})"


def pretrain_fails(capsys, *argv) -> str:
    """pretrain.main in-process (the same code path as the CLI): exit code 2 and a one-line error. Returns it."""
    import pretrain

    with pytest.raises(SystemExit) as exit_info:
        pretrain.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("pretrain.py: error: ") and err.count("\n") == 1, err
    return err


def test_cli_error_is_one_line_with_exit_code_2(shards_dir, tmp_path):
    data = tmp_path / "shards"
    shutil.copytree(shards_dir, data)
    (data / "train.bin").write_bytes((data / "train.bin").read_bytes()[:-1])
    result = run_script(["pretrain.py", "--data_dir", str(data), *TINY, "--out_dir", str(tmp_path / "o")], check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr == f"pretrain.py: error: corrupt shard {data / 'train.bin'}: {(data / 'train.bin').stat().st_size} bytes is not a multiple of the uint16 item size\n"
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "break_it, extra, message",
    [
        (lambda d: (d / "train.bin").write_bytes((d / "train.bin").read_bytes()[:-1]), [], "is not a multiple of the uint16 item size"),
        (lambda d: (d / "val.bin").unlink(), [], "shard not found"),
        (lambda d: shutil.rmtree(d), [], "meta.json not found (run data/prepare_pretrain.py"),
        (lambda d: (d / "meta.json").write_text(json.dumps({**json.loads((d / "meta.json").read_text()), "vocab_size": 70000})),
         [], "vocab_size 70000 does not fit the shard dtype uint16"),
        (lambda d: (d / "tokenizer.json").write_text((d / "tokenizer.json").read_text().replace('"<|pad|>"', '"<|pad|>" ', 1)),
         [], "is not the tokenizer the shards"),
        (lambda d: None, ["--tokenizer", "missing.json"], "tokenizer file not found: missing.json"),
        (lambda d: None, ["--vocab_size", "500"], "--vocab_size 500 is smaller than the tokenizer's vocabulary (1024 tokens)"),
        (lambda d: None, ["--batch_size", "0"], "--batch_size must be at least 1, got 0"),
        (lambda d: None, ["--resume"], "checkpoint folder not found"),
    ],
    ids=["corrupt-shard", "missing-val", "missing-dir", "vocab-too-large-for-dtype", "other-tokenizer", "missing-tokenizer",
         "model-vocab-too-small", "zero-batch", "resume-without-checkpoint"],
)
def test_bad_input_fails_clearly(shards_dir, tmp_path, capsys, break_it, extra, message):
    data = tmp_path / "shards"
    shutil.copytree(shards_dir, data)
    break_it(data)
    err = pretrain_fails(capsys, "--data_dir", data, *TINY, "--max_steps", 2, "--out_dir", tmp_path / "o", *extra)
    assert message in err
    assert not (tmp_path / "o").exists()


def test_resume_with_another_seed_fails(shards_dir, base_checkpoint, capsys):
    err = pretrain_fails(capsys, "--data_dir", shards_dir, "--out_dir", base_checkpoint, "--resume", "--seed", 7, "--max_steps", 300)
    assert "was trained with --seed 1337; resume with the same seed" in err


def test_token_budget_sets_steps_and_run_writes_checkpoint_csv_and_plot(shards_dir, tmp_path):
    from lillm.checkpoint import load_checkpoint, load_trainer_state

    # 3 steps of 4 x 32 tokens = 384 tokens: a budget of 300 rounds up to 3 steps
    pretrain.main(["--data_dir", str(shards_dir), *TINY, "--batch_size", "4", "--max_tokens", "300",
                   "--eval_interval", "2", "--out_dir", str(tmp_path / "ckpt"), "--log_dir", str(tmp_path / "runs")])
    ckpt = load_checkpoint(tmp_path / "ckpt")
    assert ckpt.meta["step"] == 3 and ckpt.meta["tokens_seen"] == 384 and ckpt.config.dim == 32
    assert load_trainer_state(tmp_path / "ckpt")["data"] == {"seed": 1337, "next_step": 3}
    shard_meta = json.loads((shards_dir / "meta.json").read_text())
    metrics = ckpt.meta["metrics"]
    bpb = metrics["val_loss"] / np.log(2) * shard_meta["val_tokens"] / shard_meta["val_bytes"]
    assert metrics["val_bpb"] == pytest.approx(bpb, rel=1e-12)
    with open(tmp_path / "runs" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows if r["val_loss"]] == [2, 3] and len(train_losses(tmp_path / "runs")) == 3
    assert (tmp_path / "runs" / "loss.png").read_bytes()[:4] == b"\x89PNG"
