"""The CUDA path's logic, checked on the CPU: rotary precision under bf16, the attention kernels' inputs,
decoding without masks, RNG state per rank, timing that excludes evaluation, a step path free of host syncs.

The GPU itself is exercised by bench/gpu_check.sh; its CPU dry run is the last test here."""

from __future__ import annotations

import copy
import sys

import pytest
import torch

from lillm.model import LilLM, ModelConfig, RotaryEmbedding, grouped_attention, needs_expanded_kv

LONG = ModelConfig(vocab_size=256, dim=64, n_layers=2, n_heads=2, n_kv_heads=1, max_seq_len=1024)


def position_sensitive_model(seed: int = 0) -> LilLM:
    """A random LilLM whose attention is sharp (query/key weights x16), so its logits depend on the rotary angles:
    with near-uniform attention, any angle error would be invisible."""
    torch.manual_seed(seed)
    model = LilLM(LONG).eval()
    with torch.no_grad():
        for layer in model.layers:
            layer.attn.q_proj.weight.mul_(16)
            layer.attn.k_proj.weight.mul_(16)
    return model


def relative_error(x: torch.Tensor, reference: torch.Tensor) -> float:
    return float((x.float() - reference).norm() / reference.norm())


def test_rotary_frequencies_stay_float32_when_the_model_is_cast_to_bf16():
    model = LilLM(LONG)
    fp32_inv_freq = model.rotary.inv_freq.clone()
    model.to(torch.bfloat16)
    assert model.rotary.inv_freq.dtype == torch.float32 and model.embed_tokens.weight.dtype == torch.bfloat16
    assert torch.equal(model.rotary.inv_freq, fp32_inv_freq)
    model.bfloat16().half()
    assert torch.equal(model.rotary.inv_freq, fp32_inv_freq)
    positions = torch.arange(512, 1024)
    cos, sin = model.rotary(positions)
    ref_cos, ref_sin = RotaryEmbedding(LONG.head_dim, LONG.rope_theta)(positions)
    assert cos.dtype == torch.float32 and torch.equal(cos, ref_cos) and torch.equal(sin, ref_sin)


def test_bf16_logits_at_long_positions_match_fp32_within_bf16_tolerance():
    """Positions 512-1023 of a bf16 model vs the same weights in fp32. With inv_freq rounded to bf16 (what a
    plain .to(bfloat16) did before) the error is ~5x larger: 0.058-0.067 relative over 4 seeds vs 0.012-0.013."""
    model = position_sensitive_model()
    ids = torch.randint(0, LONG.vocab_size, (1, LONG.max_seq_len), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(ids)[0][0, 512:]
        bf16 = copy.deepcopy(model).to(torch.bfloat16)
        logits = bf16(ids)[0][0, 512:]
        assert relative_error(logits, reference) < 0.025
        bf16.rotary.inv_freq = model.rotary.inv_freq.bfloat16().float()  # the old behaviour, for contrast
        assert relative_error(bf16(ids)[0][0, 512:], reference) > 0.04


def test_load_for_inference_in_bf16_keeps_rotary_float32(tokenizer_path, tmp_path):
    from lillm.checkpoint import save_checkpoint
    from lillm.generate import load_for_inference

    config = ModelConfig(vocab_size=1024, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, max_seq_len=1024)
    save_checkpoint(tmp_path / "ckpt", LilLM(config), tokenizer_path)
    ckpt = load_for_inference(tmp_path / "ckpt", device="cpu", dtype="bf16")
    assert ckpt.model.lm_head.weight.dtype == torch.bfloat16
    assert ckpt.model.rotary.inv_freq.dtype == torch.float32
    assert torch.equal(ckpt.model.rotary.inv_freq, RotaryEmbedding(config.head_dim, config.rope_theta).inv_freq)


@pytest.mark.parametrize("case", ["causal", "padding-mask", "one-token-after-cache"])
def test_expanded_kv_heads_equal_grouped_attention(case):
    """The path taken on CUDA for fp32 or masked attention (K/V heads repeated) equals SDPA's enable_gqa path."""
    g = torch.Generator().manual_seed(0)
    B, H, H_kv, hd = 2, 8, 2, 16
    T, T_keys = {"causal": (12, 12), "padding-mask": (12, 12), "one-token-after-cache": (1, 13)}[case]
    q = torch.randn(B, H, T, hd, generator=g)
    k, v = torch.randn(B, H_kv, T_keys, hd, generator=g), torch.randn(B, H_kv, T_keys, hd, generator=g)
    mask = None
    if case == "padding-mask":
        causal = torch.ones(T, T_keys, dtype=torch.bool).tril()
        real = torch.ones(B, T_keys, dtype=torch.bool)
        real[0, :3] = False  # row 0 is left-padded by 3
        mask = causal[None, None] & (real[:, None, None, :] | torch.eye(T, T_keys, dtype=torch.bool)[None, None])
    grouped = grouped_attention(q, k, v, mask, 0.0, expand_kv=False)
    expanded = grouped_attention(q, k, v, mask, 0.0, expand_kv=True)
    torch.testing.assert_close(expanded, grouped, atol=1e-6, rtol=1e-5)
    # the independent reference: explicit softmax over repeated heads
    kr, vr = k.repeat_interleave(H // H_kv, 1), v.repeat_interleave(H // H_kv, 1)
    scores = q @ kr.transpose(-2, -1) / hd**0.5
    if case == "causal":
        scores = scores.masked_fill(~torch.ones(T, T_keys, dtype=torch.bool).tril(), float("-inf"))
    elif mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    torch.testing.assert_close(grouped, scores.softmax(-1) @ vr, atol=1e-5, rtol=1e-4)


def test_cpu_attention_keeps_grouped_heads():
    q = torch.zeros(1, 4, 3, 8)
    assert not needs_expanded_kv(q, None, grouped=True) and not needs_expanded_kv(q, torch.ones(1, 1, 3, 3).bool(), True)


def test_decoding_one_token_builds_no_mask_and_matches_the_full_forward(monkeypatch):
    """Unpadded decoding feeds one token per step with no mask at all; its logits equal a full re-run's."""
    from lillm.model import KVCache

    model = position_sensitive_model()
    ids = torch.randint(0, LONG.vocab_size, (1, 40), generator=torch.Generator().manual_seed(1))
    masks = []
    original = LilLM._attention_mask
    # monkeypatch puts the staticmethod itself back (assigning `original` would turn it into a method)
    monkeypatch.setattr(LilLM, "_attention_mask", staticmethod(lambda *a: masks.append(a) or original(*a)))
    with torch.no_grad():
        cache = KVCache(LONG, 1, 40)
        model(ids[:, :30], cache=cache)
        steps = [model(ids[:, i : i + 1], cache=cache)[0][0, -1] for i in range(30, 40)]
    monkeypatch.undo()
    assert masks == []
    with torch.no_grad():
        full = model(ids)[0][0, 30:]
    torch.testing.assert_close(torch.stack(steps), full, atol=1e-4, rtol=1e-4)


def test_cuda_without_a_gpu_and_more_processes_than_gpus_fail_in_one_line(monkeypatch):
    from lillm.devices import cuda_device_for_rank, resolve_device

    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"^--device cuda: no CUDA GPU is visible"):
            resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert cuda_device_for_rank(1) == torch.device("cuda", 1)
    with pytest.raises(ValueError) as e:
        cuda_device_for_rank(2)
    assert "\n" not in str(e.value) and "LOCAL_RANK=2 has no GPU: only 2 visible" in str(e.value)
    assert str(e.value).endswith("start torchrun with --nproc_per_node=2 or fewer")


def test_auto_dtype_ignores_emulated_bf16(monkeypatch):
    """A V100/T4 only emulates bf16: 'auto' must pick fp32 there, bf16 on GPUs that have it."""
    from lillm.devices import resolve_dtype

    native = {"value": False}
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation or native["value"])
    assert resolve_dtype("auto", torch.device("cuda")) == torch.float32
    native["value"] = True
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32


# ---------------------------------------------------------------------------------------------- the training loop


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


class Clocked(torch.nn.Module):
    """A model whose every training forward takes exactly one second of a fake clock."""

    def __init__(self, inner: torch.nn.Module, clock: FakeClock):
        super().__init__()
        self.inner, self.clock = inner, clock

    def forward(self, *args, **kwargs):
        self.clock.now += 1.0
        return self.inner(*args, **kwargs)


def tiny_run(tmp_path, log_interval: int, model: torch.nn.Module | None = None, max_steps: int = 10, grad_accum: int = 2,
             eval_interval: int = 10, ckpt_interval: int = 10, evaluate=lambda: {"val_loss": 0.0}, save=lambda *a: None, tokens_per_step=None):
    """fit() on a 1-layer LilLM with fixed random batches; returns (logged rows, final metrics, batch calls)."""
    from lillm.train import DistInfo, RunLogger, TrainConfig, fit

    torch.manual_seed(0)
    model = model or LilLM(ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, max_seq_len=16))
    data = torch.randint(0, 64, (max_steps * grad_accum, 4, 17), generator=torch.Generator().manual_seed(1))
    calls = []

    def get_batch(step, micro):
        calls.append((step, micro))
        rows = data[step * grad_accum + micro]
        return rows[:, :-1], rows[:, 1:]

    cfg = TrainConfig(max_steps=max_steps, lr=1e-2, min_lr=1e-3, warmup_steps=2, weight_decay=0.1, grad_clip=1.0,
                      grad_accum=grad_accum, eval_interval=eval_interval, ckpt_interval=ckpt_interval, log_interval=log_interval)
    logger = RunLogger(tmp_path / f"log{log_interval}")
    final = fit(model, DistInfo(0, 0, 1, torch.device("cpu")), cfg, get_batch, evaluate, save, logger, torch.float32,
                tokens_per_step=tokens_per_step)
    return logger.rows, final, calls, data


def test_tokens_per_second_counts_training_steps_only(tmp_path, monkeypatch):
    """Every training forward takes 1 s of a fake clock, every evaluation 100 s, every save 50 s: tokens/s must
    be tokens / (forward seconds) exactly, the first window (compile, warm-up) left out."""
    import lillm.train

    clock = FakeClock()
    monkeypatch.setattr(lillm.train, "time", clock)  # the loop's clock only; tqdm keeps the real one

    def evaluate():
        clock.now += 100.0
        return {"val_loss": 0.0}

    def save(*args):
        clock.now += 50.0

    model = Clocked(LilLM(ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, max_seq_len=16)), clock)
    rows, final, _, _ = tiny_run(tmp_path, log_interval=2, model=model, max_steps=6, grad_accum=2, eval_interval=1,
                                 ckpt_interval=3, evaluate=evaluate, save=save, tokens_per_step=1000)
    rates = {int(r["step"]): r["tokens_per_s"] for r in rows if "tokens_per_s" in r}
    assert rates == {4: 500.0, 6: 500.0}  # 2 steps x 1000 tokens / (2 steps x 2 forwards x 1 s); step 2 skipped
    assert final["train_seconds"] == 12.0  # 6 steps x 2 forwards, none of the 600 s of evals and 100 s of saves


def test_step_path_reads_nothing_from_the_device_between_log_steps(tmp_path, monkeypatch):
    """No .item()/.tolist()/float()/int()/bool() of a tensor in lillm's training step: the loop reads the loss and
    gradient norm once per step that logs (here 2 of 10 steps, 20 micro-steps). The values logged equal those of a
    run that logs every step, and the first equals the loss of the initial weights computed independently."""

    reads = []
    for name in ("item", "tolist", "__float__", "__int__", "__bool__"):
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _original=original, _name=name, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if "/lillm/" in caller:
                reads.append((_name, caller.rsplit("/", 1)[-1], sys._getframe(1).f_lineno))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    logged, _, calls, data = tiny_run(tmp_path, log_interval=5)
    sparse = [r for r in logged if "train_loss" in r]
    assert [name for name, *_ in reads] == ["tolist", "tolist"], reads
    assert calls == [(s, m) for s in range(10) for m in range(2)]  # each micro-batch fetched once, in order
    monkeypatch.undo()

    dense, _, _, _ = tiny_run(tmp_path, log_interval=1)
    by_step = {int(r["step"]): r for r in dense if "train_loss" in r}
    for row in sparse:
        assert row["train_loss"] == by_step[int(row["step"])]["train_loss"]
        assert row["grad_norm"] == by_step[int(row["step"])]["grad_norm"]
    assert [int(r["step"]) for r in sparse] == [5, 10]
    torch.manual_seed(0)
    initial = LilLM(ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, max_seq_len=16))
    with torch.no_grad():
        first = sum(initial(data[m][:, :-1], data[m][:, 1:])[1].item() for m in range(2)) / 2
    assert by_step[1]["train_loss"] == pytest.approx(first, rel=1e-6)


def test_sft_evaluates_before_and_after_in_the_same_precision(base_checkpoint, tmp_path):
    """bf16 autocast, learning rate 0 for one step: the weights do not move, so the held-out loss "after" must
    equal the loss "before" exactly (computed in fp32 before and bf16 after, they differed by 4e-5 on this model)."""
    import json

    import sft_train

    out = tmp_path / "sft"
    sft_train.main(["--init", str(base_checkpoint), "--out_dir", str(out), "--log_dir", str(tmp_path / "runs"),
                    "--batch_size", "4", "--max_conversations", "40", "--val_conversations", "20", "--eval_samples", "0",
                    "--max_steps", "1", "--lr", "0", "--min_lr", "0", "--warmup_steps", "1", "--eval_interval", "1",
                    "--ckpt_interval", "1", "--device", "cpu", "--dtype", "bf16"])
    summary = json.loads((out / "meta.json").read_text())["summary"]
    assert summary["val_loss"] == summary["val_loss_before"]


# ---------------------------------------------------------------------------------------------- randomness per rank


def test_rng_state_holds_only_this_processs_gpu_and_restores_onto_fewer_gpus(monkeypatch):
    """Saved by rank 0 of a run on cuda:3 of an 8-GPU machine, restored by a run with 1 GPU (cuda:0): the
    state holds one GPU state (not 8) and it goes to the restoring process's own GPU. CUDA is faked: only the
    four RNG-state calls are replaced, the rest is the real code path."""
    from lillm.train import DistInfo, restore_rng_state, rng_state

    calls = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: calls.append(("get", device)) or torch.full((16,), 7, dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: calls.append(("set", device, state.tolist())))
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: pytest.fail("saved every visible GPU"))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: pytest.fail("restored every visible GPU"))

    state = rng_state(DistInfo(0, 3, 1, torch.device("cuda", 3)))
    assert calls == [("get", torch.device("cuda", 3))] and state["cuda"].tolist() == [7] * 16
    assert sorted(state) == ["cuda", "numpy", "numpy_pos", "python", "python_pos", "torch"]
    restore_rng_state(state, DistInfo(0, 0, 1, torch.device("cuda", 0)))
    assert calls[1:] == [("set", torch.device("cuda", 0), [7] * 16)]

    cpu_state = rng_state(DistInfo(0, 0, 1, torch.device("cpu")))
    assert "cuda" not in cpu_state
    restore_rng_state(state, DistInfo(0, 0, 1, torch.device("cpu")))  # a GPU checkpoint resumed on a CPU
    assert len(calls) == 2


def test_each_rank_restores_its_own_streams_and_an_extra_rank_keeps_its_seed():
    from lillm.train import DistInfo, _own_rng_state, restore_rng_state, set_seed

    streams = []
    for rank in range(2):
        set_seed(5, rank)
        streams.append(_own_rng_state(None))
    saved = {**streams[0], "ranks": streams}  # the layout rng_state gathers under torchrun
    expected = []
    for rank in range(2):
        set_seed(5, rank)
        expected.append(torch.rand(4))
    for rank in range(2):
        set_seed(99)
        restore_rng_state(saved, DistInfo(rank, rank, 2, torch.device("cpu")))
        assert torch.equal(torch.rand(4), expected[rank])
    set_seed(5, 2)
    fresh = torch.rand(4)
    set_seed(5, 2)
    restore_rng_state(saved, DistInfo(2, 2, 3, torch.device("cpu")))  # resumed with 3 processes
    assert torch.equal(torch.rand(4), fresh)


def test_ranks_draw_different_dropout_masks_but_the_same_batches(shards_dir):
    """After set_seed(seed, rank), two ranks' dropout masks differ (they were identical with one seed for all),
    while the data order, a function of (seed, step), does not depend on any RNG state."""
    from lillm.data import open_shards, sample_batch
    from lillm.train import set_seed

    shards = open_shards(shards_dir, 32)
    dropout = torch.nn.Dropout(0.1)
    masks, batches = [], []
    for rank in range(2):
        set_seed(1337, rank)
        masks.append(dropout(torch.ones(4, 32, 64)) == 0)
        batches.append(sample_batch(shards.train, 4, 32, 1337, step=3, chunk=0))
    assert not torch.equal(masks[0], masks[1])
    assert 0.05 < masks[0].float().mean() < 0.15
    assert torch.equal(batches[0][0], batches[1][0]) and torch.equal(batches[0][1], batches[1][1])


# ---------------------------------------------------------------------------------------------- the GPU check script


def test_gpu_check_dry_run_on_cpu(data_dir, tmp_path):
    """bench/gpu_check.sh --device cpu: tokenizer, shards, pretraining with a resume half-way, the measurements,
    and the markdown table; about a minute on an idle 2-core machine. The numbers it prints on a CPU only prove
    that every step runs, except these, which hold on any device."""
    import os
    import subprocess
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}
    result = subprocess.run(["bash", "bench/gpu_check.sh", "--device", "cpu", "--data", str(data_dir), "--out", str(tmp_path)],
                            cwd=repo, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    table = dict(line.strip("|").split(" | ", 1) for line in result.stdout.splitlines()[2:])
    table = {k.strip(): v.strip() for k, v in table.items()}
    assert (tmp_path / "gpu_check.md").read_text() == result.stdout
    assert table["GPU"].startswith("none (CPU dry run")
    assert table["pretraining"].endswith("steps 0-10, then `--resume` to step 20 (checkpoint at step 20)")
    assert float(table["tokens/s (training steps only; mean of the logged windows)"].replace(",", "")) > 0
    assert table["host syncs per training step (on a CPU: tensor reads in lillm code, counted)"] == \
        "0 in each of 18 steps that do not log; 1 at a step that logs (log_interval 10)"
    assert table["rotary angle error in bf16, positions 64-127"].startswith("0 rad now")
    assert table["SDPA kernel: decoding one token after the cache, bf16"] == "_scaled_dot_product_flash_attention_for_cpu"
    assert table["wall time of this check"].endswith(" s")


# ---------------------------------------------------------------------------------------------- teardown and decoding


def test_teardown_waits_for_every_rank_on_success_and_leaves_at_once_on_error(tmp_path, monkeypatch):
    """A real (one-process, gloo) process group: cleanup_distributed passes a barrier before destroying it on a
    normal exit, and skips the barrier while an exception propagates (the other ranks may be elsewhere)."""
    import torch.distributed as dist

    from lillm.train import cleanup_distributed

    barriers = []
    real_barrier = dist.barrier
    monkeypatch.setattr(dist, "barrier", lambda *a, **k: barriers.append(1) or real_barrier(*a, **k))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store_ok'}", rank=0, world_size=1)
    cleanup_distributed()
    assert barriers == [1] and not dist.is_initialized()

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store_error'}", rank=0, world_size=1)
    with pytest.raises(SystemExit):
        try:
            raise SystemExit(2)  # what a script's error boundary raises for a bad input
        finally:
            cleanup_distributed()
    assert barriers == [1] and not dist.is_initialized()


def test_decoding_reads_the_device_once_per_token(monkeypatch):
    """generate_ids reads one value per new token (the token itself) and generate_batch one list per step; the
    tokens equal those of decoding without the cache."""
    from lillm.generate import SamplingConfig, generate_batch, generate_ids

    model = position_sensitive_model()
    cfg = SamplingConfig(temperature=0.0, max_new_tokens=12, stop_ids=())
    reads = []
    for name in ("item", "tolist", "__float__", "__int__", "__bool__", "__index__"):
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _original=original, _name=name, **kwargs):
            if "/lillm/" in sys._getframe(1).f_code.co_filename:
                reads.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    tokens = list(generate_ids(model, [5, 6, 7], cfg))
    assert len(tokens) == 12 and reads == ["__int__"] * 12
    reads.clear()
    batch = generate_batch(model, [[5, 6, 7], [9]], cfg)
    assert reads == ["tolist"] * 12 and batch[0] == tokens
    monkeypatch.undo()
    assert list(generate_ids(model, [5, 6, 7], cfg, use_cache=False)) == tokens
