"""FSDP (lillm.sharding) end to end on gloo: the same training as DDP and as gradient accumulation, exact resume,
checkpoints any single process reads, two "nodes" (two torchrun launchers) == one node, and half the parameter
memory per rank at 2 ranks; lillm.memory's activation count against torch's saved-tensor hooks."""

from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from test_pretrain import REPO, TINY, pretrain_fails, run_script, train_losses

# Constant learning rate (min_lr == lr, no warm-up): the schedule then does not depend on --max_steps, so a run
# stopped at step 6 and resumed to 12 must equal a run of 12. Micro-batches of 2: rank r's micro-step m reads chunk
# r * grad_accum + m, so 2 ranks x grad_accum 2 and 1 rank x grad_accum 4 see the same 8 sequences per step.
# 3 validation batches: rank 0 evaluates 2, rank 1 one, and under FSDP joins rank 0's second forward idly.
# --grad_clip 0.3 is below every step's gradient norm here (0.5-0.7): each step clips, with the norm over all shards.
COMMON = ["pretrain.py", *TINY, "--batch_size", "2", "--lr", "3e-3", "--min_lr", "3e-3", "--warmup_steps", "0",
          "--eval_interval", "6", "--ckpt_interval", "6", "--eval_batches", "3", "--grad_clip", "0.3"]


def free_port() -> int:
    """A port nobody listens on right now (the OS picks it), for the rendezvous endpoint."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def weights(out_dir: Path) -> dict[str, np.ndarray]:
    return load_file(out_dir / "model.safetensors")


@pytest.fixture(scope="module")
def runs(shards_dir, tmp_path_factory) -> Path:
    """The same 12 steps three ways: 1 process x grad_accum 4, 2-process DDP and 2-process FSDP x grad_accum 2."""
    root = tmp_path_factory.mktemp("fsdp_runs")
    common = [*COMMON, "--data_dir", str(shards_dir), "--max_steps", "12"]
    for name, nproc, extra in [("accum", 1, ["--grad_accum", "4"]), ("ddp", 2, ["--grad_accum", "2"]),
                               ("fsdp", 2, ["--grad_accum", "2", "--fsdp"])]:
        result = run_script([*common, *extra, "--out_dir", str(root / name), "--log_dir", str(root / f"log_{name}")], nproc=nproc)
        (root / f"{name}.stdout").write_text(result.stdout)
    return root


@pytest.mark.distributed
def test_fsdp_equals_ddp_equals_grad_accum(runs):
    accum, ddp, fsdp = (train_losses(runs / f"log_{name}") for name in ("accum", "ddp", "fsdp"))
    assert len(accum) == len(ddp) == len(fsdp) == 12
    np.testing.assert_allclose(fsdp, accum, atol=1e-5, rtol=0)
    np.testing.assert_allclose(fsdp, ddp, atol=1e-5, rtol=0)
    assert accum[-1] < accum[0] - 0.2  # it learned something
    with open(runs / "log_accum" / "metrics.csv") as f:
        assert min(float(r["grad_norm"]) for r in csv.DictReader(f) if r.get("grad_norm")) > 0.3  # so every step clipped
    w_accum, w_ddp, w_fsdp = (weights(runs / name) for name in ("accum", "ddp", "fsdp"))
    assert sorted(w_fsdp) == sorted(w_accum)  # same file layout: the tied embedding/head matrix stored once
    for name in w_accum:
        np.testing.assert_allclose(w_fsdp[name], w_accum[name], atol=1e-5, rtol=0, err_msg=name)
        np.testing.assert_allclose(w_fsdp[name], w_ddp[name], atol=1e-5, rtol=0, err_msg=name)
    val = [json.loads((runs / name / "meta.json").read_text())["metrics"]["val_loss"] for name in ("accum", "ddp", "fsdp")]
    assert val[2] == pytest.approx(val[0], abs=1e-5) and val[2] == pytest.approx(val[1], abs=1e-5)
    assert "FSDP: rank 0 holds" in (runs / "fsdp.stdout").read_text()


@pytest.mark.distributed
def test_fsdp_sft_equals_one_process_with_grad_accum(base_checkpoint, tmp_path):
    import sft_train
    from test_sft_train import QUICK

    # 17 held-out conversations in batches of 4: rank 0 has 3 batches, rank 1 two (plus one idle forward)
    common = ["--init", str(base_checkpoint), *QUICK, "--val_conversations", "17", "--instruct_eval", "0",
              "--max_steps", "6", "--eval_interval", "3", "--ckpt_interval", "6"]
    sft_train.main([*common, "--grad_accum", "2", "--out_dir", str(tmp_path / "one"), "--log_dir", str(tmp_path / "l1")])
    run_script(["sft_train.py", *common, "--fsdp", "--out_dir", str(tmp_path / "fsdp"), "--log_dir", str(tmp_path / "l2")], nproc=2)
    np.testing.assert_allclose(train_losses(tmp_path / "l2"), train_losses(tmp_path / "l1"), atol=1e-5, rtol=0)
    one, fsdp = weights(tmp_path / "one"), weights(tmp_path / "fsdp")
    for name in one:
        np.testing.assert_allclose(fsdp[name], one[name], atol=1e-5, rtol=0, err_msg=name)
    meta_one, meta_fsdp = (json.loads((tmp_path / d / "meta.json").read_text()) for d in ("one", "fsdp"))
    assert meta_fsdp["summary"]["val_loss"] == pytest.approx(meta_one["summary"]["val_loss"], abs=1e-5)


@pytest.mark.distributed
def test_fsdp_checkpoint_resumes_bit_exactly_also_without_fsdp(runs, shards_dir, tmp_path):
    from lillm.checkpoint import load_trainer_state

    common = [*COMMON, "--data_dir", str(shards_dir), "--grad_accum", "2", "--fsdp", "--log_dir", str(tmp_path / "log")]
    run_script([*common, "--max_steps", "6", "--out_dir", str(tmp_path / "half")], nproc=2)
    # The saved optimizer state is the unsharded one: every moment has its parameter's full shape.
    state = load_trainer_state(tmp_path / "half")["optimizer"]
    shapes = {name: arr.shape for name, arr in weights(tmp_path / "half").items()}
    assert sorted(state["state"]) == list(range(len(shapes)))  # ids 0..n-1, as a plain optimizer numbers them
    assert sorted(tuple(s["exp_avg"].shape) for s in state["state"].values()) == sorted(shapes.values())
    shutil.copytree(tmp_path / "half", tmp_path / "as_ddp")
    run_script([*common, "--max_steps", "12", "--out_dir", str(tmp_path / "half"), "--resume"], nproc=2)
    straight, resumed = weights(runs / "fsdp"), weights(tmp_path / "half")
    for name in straight:
        assert np.array_equal(straight[name], resumed[name]), f"{name} differs after resume"
    assert train_losses(tmp_path / "log") == train_losses(runs / "log_fsdp")
    # The same checkpoint resumed without --fsdp (DDP): the folder does not depend on how it was trained.
    ddp = [a for a in common if a != "--fsdp"]
    run_script([*ddp, "--max_steps", "12", "--out_dir", str(tmp_path / "as_ddp"), "--log_dir", str(tmp_path / "log_ddp"), "--resume"], nproc=2)
    for name, value in weights(tmp_path / "as_ddp").items():
        np.testing.assert_allclose(value, straight[name], atol=1e-5, rtol=0, err_msg=name)


def test_fsdp_checkpoint_loads_in_inference_on_one_process(runs, capsys):
    import inference
    from lillm.checkpoint import load_checkpoint
    from lillm.generate import SamplingConfig, generate_ids
    from lillm.tokenizer import encode_ordinary, special_tokens

    prompt = "Once upon a time"  # inference.main in this one process: the CLI's code path, no process group
    code = inference.main(["--checkpoint", str(runs / "fsdp"), "--prompt", prompt, "--temperature", "0",
                           "--max_new_tokens", "12", "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 0
    ckpt = load_checkpoint(runs / "fsdp")
    tok = ckpt.tokenizer
    cfg = SamplingConfig(temperature=0.0, max_new_tokens=12).with_stops(tok)
    ids = generate_ids(ckpt.model, [special_tokens(tok).eos, *encode_ordinary(tok, prompt)], cfg)
    assert out == prompt + tok.decode(list(ids)) + "\n"



@pytest.mark.distributed
def test_fsdp_dpo_equals_one_process_with_grad_accum(base_checkpoint, tmp_path):
    """DPO trains a wrapper (lillm.dpo.DPOObjective) around the sharded policy: fit must still see FSDP.
    (Any checkpoint will do for the arithmetic; the base one is cheaper to make than an SFT one.)"""
    import dpo_train
    from test_dpo_train import QUICK

    # 33 held-out pairs in batches of 4: rank 0 has 5 batches, rank 1 four (plus one idle forward)
    common = ["--init", str(base_checkpoint), *QUICK, "--val_pairs", "33", "--max_steps", "4", "--eval_interval", "4",
              "--ckpt_interval", "4"]
    dpo_train.main([*common, "--grad_accum", "2", "--out_dir", str(tmp_path / "one"), "--log_dir", str(tmp_path / "l1")])
    run_script(["dpo_train.py", *common, "--fsdp", "--out_dir", str(tmp_path / "fsdp"), "--log_dir", str(tmp_path / "l2")], nproc=2)
    np.testing.assert_allclose(train_losses(tmp_path / "l2"), train_losses(tmp_path / "l1"), atol=1e-5, rtol=0)
    one, fsdp = weights(tmp_path / "one"), weights(tmp_path / "fsdp")
    for name in one:
        np.testing.assert_allclose(fsdp[name], one[name], atol=1e-5, rtol=0, err_msg=name)
    s1, s2 = (json.loads((tmp_path / d / "meta.json").read_text())["summary"] for d in ("one", "fsdp"))
    assert s2["val_margin"] == pytest.approx(s1["val_margin"], abs=1e-5)

@pytest.mark.distributed
def test_two_nodes_equal_one_node(runs, shards_dir, tmp_path):
    """Two torchrun launchers (one process each) meeting at a c10d rendezvous == one launcher with 2 processes."""
    port = free_port()
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", f"lillm{port}"]
    args = [*COMMON, "--data_dir", str(shards_dir), "--max_steps", "12", "--grad_accum", "2", "--fsdp",
            "--out_dir", str(tmp_path / "nodes"), "--log_dir", str(tmp_path / "log")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen([*launcher, *args], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    try:
        outputs = [node.communicate(timeout=300) for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    for node, (_, err) in zip(nodes, outputs):
        assert node.returncode == 0, err[-3000:]
    np.testing.assert_allclose(train_losses(tmp_path / "log"), train_losses(runs / "log_fsdp"), atol=1e-5, rtol=0)
    one_node, two_nodes = weights(runs / "fsdp"), weights(tmp_path / "nodes")
    for name in one_node:
        np.testing.assert_allclose(two_nodes[name], one_node[name], atol=1e-5, rtol=0, err_msg=name)


MEMORY_WORKER = textwrap.dedent('''
    import json, sys
    import torch, torch.distributed as dist
    from lillm.model import LilLM, ModelConfig
    from lillm.sharding import local_parameter_bytes, shard_model

    dist.init_process_group("gloo")
    model = LilLM(ModelConfig(**json.loads(sys.argv[1])))
    full = local_parameter_bytes(model)
    shard_model(model, torch.device("cpu"), torch.float32)
    report = {"full": full, "local": local_parameter_bytes(model)}
    with open(f"{sys.argv[2]}/rank{dist.get_rank()}.json", "w") as f:  # one file per rank, no interleaving
        json.dump(report, f)
    dist.destroy_process_group()
''')


@pytest.mark.distributed
def test_fsdp_halves_parameter_memory_per_rank_at_two_ranks(tmp_path):
    from lillm.flops import count_parameters
    from lillm.memory import training_memory
    from lillm.model import ModelConfig

    config = dict(vocab_size=1024, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64)
    (tmp_path / "worker.py").write_text(MEMORY_WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(tmp_path / "worker.py"), json.dumps(config), str(tmp_path)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    full = reports[0]["full"]
    assert full == 4 * count_parameters(ModelConfig(**config))  # fp32, the tied matrix once
    assert sum(r["local"] for r in reports) == full  # the shards partition the parameters
    ddp = training_memory(ModelConfig(**config), batch_size=1, n_ranks=2, strategy="ddp", compute_bytes=4)
    fsdp = training_memory(ModelConfig(**config), batch_size=1, n_ranks=2, strategy="fsdp", compute_bytes=4)
    for r in reports:  # every dim-0 here is even: each rank holds exactly half, as lillm.memory says
        assert r["local"] == full / 2 == fsdp.weights == ddp.weights / 2


def saved_activation_bytes(model, batch: int, seq: int, dtype: torch.dtype) -> int:
    """Bytes of the distinct tensors autograd saves in one training forward, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    x = torch.randint(0, model.config.vocab_size, (batch, seq))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            model(x, x)
    return sum(saved.values())


@pytest.mark.parametrize("dtype, grad_checkpointing", [(torch.float32, False), (torch.bfloat16, False), (torch.float32, True)])
def test_activation_count_matches_saved_tensors(dtype, grad_checkpointing):
    from lillm.flops import matmul_parameters
    from lillm.memory import activation_bytes_per_token
    from lillm.model import LilLM, ModelConfig

    torch.manual_seed(0)
    config = ModelConfig(vocab_size=1024, dim=64, n_layers=3, n_heads=4, n_kv_heads=2, max_seq_len=128)
    model = LilLM(config).train()
    model.gradient_checkpointing = grad_checkpointing
    batch, seq = 4, 128
    measured = saved_activation_bytes(model, batch, seq, dtype)
    compute_bytes = 2 if dtype == torch.bfloat16 else 4
    if dtype == torch.bfloat16:  # autocast also keeps one bf16 copy of each matmul weight (not per token)
        measured -= 2 * matmul_parameters(config)
    predicted = activation_bytes_per_token(config, compute_bytes, grad_checkpointing)
    if grad_checkpointing:  # the forward keeps only Block inputs; one Block is rebuilt later, in backward
        one_layer_less = ModelConfig(**{**config.to_dict(), "n_layers": config.n_layers - 1})
        predicted -= activation_bytes_per_token(config, compute_bytes) - activation_bytes_per_token(one_layer_less, compute_bytes)
    assert measured / (batch * seq) == pytest.approx(predicted, rel=0.01)


def test_fsdp_refusals_are_one_line(shards_dir, tmp_path, capsys):
    args = ["--data_dir", shards_dir, *TINY, "--max_steps", 2, "--out_dir", tmp_path / "o", "--fsdp"]
    assert "--fsdp needs a process group: launch with torchrun" in pretrain_fails(capsys, *args)
    assert "--compile with --fsdp is not supported" in pretrain_fails(capsys, *args, "--compile")
    assert not (tmp_path / "o").exists()


def test_fsdp_with_lora_is_refused_in_one_line(tmp_path, capsys):
    import sft_train

    with pytest.raises(SystemExit) as exit_info:
        sft_train.main(["--init", str(tmp_path / "base"), "--fsdp", "--lora_rank", "4", "--out_dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert err.startswith("sft_train.py: error: --fsdp with --lora_rank is not supported yet")
