"""The fault suite: every damaged checkpoint file x every load path, and bad values for every flag of every script.

Each case must end in exit status 2 with exactly one stderr line `script.py: error: ...` naming the problem, no
traceback, nothing written over the good checkpoint (its folder hashed before and after) and, for the malicious
pickle, the file its payload would create never created. The damage is generated from real checkpoints (a real
pretrain.py run, a real sft_train.py run) and the scripts run in-process through their own main(argv), which is the
code path of the command line; a few subprocess cases check the real CLI.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import pickle
import resource
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import convert_checkpoint
import dpo_train
import evaluate as evaluate_cli
import inference
import inference_gradio
import pretrain
import sft_train
import train_custom_tokenizer
from lillm.checkpoint import STATE_FILE, TOKENIZER_HASH_KEY, load_checkpoint

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("prepare_pretrain", REPO / "data" / "prepare_pretrain.py")
prepare_pretrain = importlib.util.module_from_spec(spec)
spec.loader.exec_module(prepare_pretrain)

CANARY = "pwned-by-the-pickle"  # the file the malicious trainer_state.pt would create
NOT_UTF8 = "caf\udce9"  # what Python makes of the Latin-1 bytes b"caf\xe9" in argv (surrogateescape)


# ---------------------------------------------------------------------------------------------- helpers


def folder_hash(directory: Path) -> dict[str, str]:
    """Every file under the checkpoint's parent (so DIR.tmp / DIR.old leftovers count too), by content."""
    return {str(p.relative_to(directory.parent)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.parent.rglob("*")) if p.is_file()}


def fails(capsys, main: Callable, argv: list, script: str) -> str:
    """main(argv) exits with 2 and one stderr line `script: error: ...` (no traceback); returns the message.
    A bad line found while reading an input may follow the progress bar already drawn (tqdm's "\r" lines)."""
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    lines = [line for line in err.split("\n") if line and not line.startswith("\r")]
    assert "Traceback" not in err and err.endswith("\n") and len(lines) == 1, err
    assert lines[0].startswith(f"{script}: error: "), err
    return lines[0].removeprefix(f"{script}: error: ").strip()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True)
def no_launch(monkeypatch):
    """A damaged checkpoint must fail before the Gradio server starts; if it ever got that far, the test fails
    instead of serving forever."""
    def launch(self, *args, **kwargs):
        raise AssertionError("inference_gradio.py accepted the input and launched the server")

    monkeypatch.setattr(inference_gradio.gr.Blocks, "launch", launch)


@pytest.fixture(scope="module")
def sft_run(base_checkpoint, data_dir, tmp_path_factory) -> tuple[Path, list[str]]:
    """A short real SFT run with its trainer state, and the flags that made it (to --resume it)."""
    out = tmp_path_factory.mktemp("faults_sft") / "sft"
    flags = ["--init", str(base_checkpoint), "--train_file", str(data_dir / "chat_train.jsonl"),
             "--val_file", str(data_dir / "chat_val.jsonl"), "--max_conversations", "40", "--val_conversations", "8",
             "--batch_size", "4", "--warmup_steps", "1", "--eval_interval", "2", "--ckpt_interval", "2",
             "--eval_samples", "0", "--device", "cpu", "--dtype", "fp32", "--log_dir", str(out.parent / "runs")]
    sft_train.main([*flags, "--out_dir", str(out), "--max_steps", "2"])
    return out, flags


@pytest.fixture(scope="module")
def dpo_run(base_checkpoint, data_dir, tmp_path_factory) -> tuple[Path, list[str]]:
    """A short real DPO run with its trainer state, and the flags that made it (to --resume it)."""
    out = tmp_path_factory.mktemp("faults_dpo") / "dpo"
    flags = ["--init", str(base_checkpoint), "--train_file", str(data_dir / "prefs_train.jsonl"),
             "--val_file", str(data_dir / "prefs_val.jsonl"), "--max_pairs", "8", "--val_pairs", "4", "--batch_size", "2",
             "--warmup_steps", "1", "--eval_interval", "2", "--ckpt_interval", "2", "--eval_samples", "0",
             "--device", "cpu", "--dtype", "fp32", "--log_dir", str(out.parent / "runs")]
    dpo_train.main([*flags, "--out_dir", str(out), "--max_steps", "2"])
    return out, flags


# ---------------------------------------------------------------------------------------------- the damage


def _rewrite_json(name: str, change: Callable[[dict], object]) -> Callable[[Path], None]:
    def damage(d: Path) -> None:
        (d / name).write_text(json.dumps(change(json.loads((d / name).read_text()))))
    return damage


def _truncate(name: str, keep: Callable[[int], int]) -> Callable[[Path], None]:
    def damage(d: Path) -> None:
        data = (d / name).read_bytes()
        (d / name).write_bytes(data[: keep(len(data))])
    return damage


def _garbage(name: str) -> Callable[[Path], None]:
    def damage(d: Path) -> None:
        size = (d / name).stat().st_size
        (d / name).write_bytes(bytes((i * 131 + 7) % 256 for i in range(size)))
    return damage


def _unlink(name: str) -> Callable[[Path], None]:
    return lambda d: (d / name).unlink()


def _tensors(change: Callable[[dict], None]) -> Callable[[Path], None]:
    """Re-save model.safetensors with its tensors changed (keeping the tokenizer hash: only the tensors differ)."""
    def damage(d: Path) -> None:
        path = d / "model.safetensors"
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            metadata = f.metadata()
        tensors = load_file(path)
        change(tensors)
        save_file(tensors, str(path), metadata=metadata)
    return damage


def _header_length(value: int) -> Callable[[Path], None]:
    def damage(d: Path) -> None:
        data = (d / "model.safetensors").read_bytes()
        (d / "model.safetensors").write_bytes(value.to_bytes(8, "little") + data[8:])
    return damage


def _swap_tokenizer_ids(d: Path) -> None:
    """A valid tokenizer.json of the same size whose ids mean other strings: only the hash can tell."""
    tok = json.loads((d / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (d / "tokenizer.json").write_text(json.dumps(tok))


class Payload:
    """Unpickling this would create the canary file: weights_only loading must refuse the global."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def _malicious_state(zipped: bool) -> Callable[[Path], None]:
    def damage(d: Path) -> None:
        payload = {"step": 1, "optimizer": Payload(d.parent / CANARY)}
        if zipped:
            torch.save(payload, d / STATE_FILE)
        else:
            (d / STATE_FILE).write_bytes(pickle.dumps(payload, protocol=2))
    return damage


def _state(change: Callable[[dict], object]) -> Callable[[Path], None]:
    def damage(d: Path) -> None:
        state = torch.load(d / STATE_FILE, weights_only=True)
        torch.save(change(state), d / STATE_FILE)
    return damage


def _drop(key):
    return lambda t: t.pop(key)


def _bad_moment(state: dict) -> dict:
    first = next(iter(state["optimizer"]["state"].values()))
    first["exp_avg"] = torch.zeros(3, 3)
    return state


def _one_param_less(state: dict) -> dict:
    state["optimizer"]["param_groups"][0]["params"].pop()
    return state


HUGE = {"vocab_size": 1_000_000, "dim": 65536, "n_heads": 512, "n_kv_heads": 64, "n_layers": 2}  # ~1 TB of fp32

# name -> (damage, the file the message must name)
CHECKPOINT_DAMAGE: dict[str, tuple[Callable[[Path], None], str]] = {
    "weights-truncated": (_truncate("model.safetensors", lambda n: n // 2), "model.safetensors"),
    "weights-8-bytes": (_truncate("model.safetensors", lambda n: 8), "model.safetensors"),
    "weights-empty": (_truncate("model.safetensors", lambda n: 0), "model.safetensors"),
    "weights-garbage": (_garbage("model.safetensors"), "model.safetensors"),
    "weights-header-too-long": (_header_length(2**40), "model.safetensors"),
    "weights-missing-tensor": (_tensors(_drop("layers.1.ffn.up_proj.weight")), "model.safetensors"),
    "weights-extra-tensor": (_tensors(lambda t: t.update({"extra.weight": torch.zeros(2)})), "model.safetensors"),
    "weights-wrong-shape": (_tensors(lambda t: t.update({"norm.weight": torch.ones(65)})), "model.safetensors"),
    "weights-int-dtype": (_tensors(lambda t: t.update({"norm.weight": torch.ones(64, dtype=torch.int64)})), "model.safetensors"),
    "weights-missing": (_unlink("model.safetensors"), "model.safetensors"),
    "config-truncated": (_truncate("config.json", lambda n: n // 2), "config.json"),
    "config-not-utf8": (lambda d: (d / "config.json").write_bytes(b'{"dim": "\xff"}'), "config.json"),
    "config-a-list": (_rewrite_json("config.json", lambda c: list(c)), "config.json"),
    "config-string-dim": (_rewrite_json("config.json", lambda c: {**c, "dim": "64"}), "config.json"),
    "config-bool-layers": (_rewrite_json("config.json", lambda c: {**c, "n_layers": True}), "config.json"),
    "config-float-theta-string": (_rewrite_json("config.json", lambda c: {**c, "rope_theta": "1e4"}), "config.json"),
    "config-unknown-field": (_rewrite_json("config.json", lambda c: {**c, "n_experts": 8}), "config.json"),
    "config-other-width": (_rewrite_json("config.json", lambda c: {**c, "dim": 128, "ffn_hidden": None}), "config.json"),
    "config-more-layers": (_rewrite_json("config.json", lambda c: {**c, "n_layers": 3}), "config.json"),
    "config-huge-model": (_rewrite_json("config.json", lambda c: {**c, **HUGE, "ffn_hidden": None}), "config.json"),
    "config-billion-layers": (_rewrite_json("config.json", lambda c: {**c, "n_layers": 10**9}), "config.json"),
    "config-missing": (_unlink("config.json"), "config.json"),
    "tokenizer-truncated": (_truncate("tokenizer.json", lambda n: n // 2), "tokenizer.json"),
    "tokenizer-garbage": (_garbage("tokenizer.json"), "tokenizer.json"),
    "tokenizer-ids-swapped": (_swap_tokenizer_ids, "tokenizer.json"),
    "tokenizer-missing": (_unlink("tokenizer.json"), "tokenizer.json"),
    "meta-invalid-json": (lambda d: (d / "meta.json").write_text('{"stage": "base",'), "meta.json"),
    "meta-not-utf8": (lambda d: (d / "meta.json").write_bytes(b'{"stage": "\xff"}'), "meta.json"),
    "meta-a-list": (_rewrite_json("meta.json", lambda m: [m]), "meta.json"),
    "meta-stage-a-number": (_rewrite_json("meta.json", lambda m: {**m, "stage": 5}), "meta.json"),
    "meta-system-prompt-a-list": (_rewrite_json("meta.json", lambda m: {**m, "system_prompt": ["x"]}), "meta.json"),
}

STATE_DAMAGE: dict[str, tuple[Callable[[Path], None], str]] = {
    "state-truncated": (_truncate(STATE_FILE, lambda n: n // 2), STATE_FILE),
    "state-garbage": (_garbage(STATE_FILE), STATE_FILE),
    "state-empty-file": (_truncate(STATE_FILE, lambda n: 0), STATE_FILE),
    "state-pickle-payload-zip": (_malicious_state(zipped=True), STATE_FILE),
    "state-pickle-payload-raw": (_malicious_state(zipped=False), STATE_FILE),
    "state-empty-dict": (_state(lambda s: {}), STATE_FILE),
    "state-a-list": (_state(lambda s: [s]), STATE_FILE),
    "state-step-a-string": (_state(lambda s: {**s, "step": "150"}), STATE_FILE),
    "state-negative-step": (_state(lambda s: {**s, "step": -1}), STATE_FILE),
    "state-no-rng": (_state(lambda s: {k: v for k, v in s.items() if k != "rng"}), STATE_FILE),
    "state-short-rng": (_state(lambda s: {**s, "rng": {**s["rng"], "python": s["rng"]["python"][:10]}}), STATE_FILE),
    "state-optimizer-moment-shape": (_state(_bad_moment), STATE_FILE),
    "state-optimizer-one-param-less": (_state(_one_param_less), STATE_FILE),
    "state-missing": (_unlink(STATE_FILE), STATE_FILE),
}


# ---------------------------------------------------------------------------------------------- the load paths


def _inference(ckpt: Path, work: Path, ctx: dict):
    return inference.main, ["--checkpoint", ckpt, "--prompt", "Once", "--max_new_tokens", "2", "--device", "cpu"], "inference.py"


def _gradio(ckpt: Path, work: Path, ctx: dict):
    return inference_gradio.main, ["--checkpoint", ckpt, "--port", free_port(), "--device", "cpu"], "inference_gradio.py"


def _pretrain_resume(ckpt: Path, work: Path, ctx: dict):
    return pretrain.main, ["--data_dir", ctx["shards"], "--out_dir", ckpt, "--resume", "--max_steps", 151,
                           "--eval_batches", 1, "--device", "cpu", "--log_dir", work / "runs"], "pretrain.py"


def _sft_init(ckpt: Path, work: Path, ctx: dict):
    flags = [f for f in ctx["sft_flags"]]
    flags[flags.index("--init") + 1] = str(ckpt)
    return sft_train.main, [*flags, "--out_dir", work / "sft_out", "--max_steps", 2], "sft_train.py"


def _sft_resume(ckpt: Path, work: Path, ctx: dict):
    return sft_train.main, [*ctx["sft_flags"], "--out_dir", ckpt, "--resume", "--max_steps", 3], "sft_train.py"


def _evaluate(ckpt: Path, work: Path, ctx: dict):
    return evaluate_cli.main, ["--checkpoint", ckpt, "--tasks", "arc_easy", "--limit", 2, "--device", "cpu",
                               "--out", work / "sft_out" / "scores.json"], "evaluate.py"


def _export_hf(ckpt: Path, work: Path, ctx: dict):
    return convert_checkpoint.main, [ckpt, work / "sft_out", "--to", "hf"], "convert_checkpoint.py"


def _dpo_init(ckpt: Path, work: Path, ctx: dict):
    flags = [f for f in ctx["dpo_flags"]]
    flags[flags.index("--init") + 1] = str(ckpt)
    return dpo_train.main, [*flags, "--out_dir", work / "sft_out", "--max_steps", 2], "dpo_train.py"


def _dpo_resume(ckpt: Path, work: Path, ctx: dict):
    return dpo_train.main, [*ctx["dpo_flags"], "--out_dir", ckpt, "--resume", "--max_steps", 3], "dpo_train.py"


LOAD_PATHS = {"inference": _inference, "gradio": _gradio, "evaluate": _evaluate, "export-hf": _export_hf,
              "pretrain-resume": _pretrain_resume, "sft-init": _sft_init, "sft-resume": _sft_resume,
              "dpo-init": _dpo_init, "dpo-resume": _dpo_resume}
RESUME_PATHS = ("pretrain-resume", "sft-resume", "dpo-resume")
CASES = [(path, damage) for path in LOAD_PATHS for damage in CHECKPOINT_DAMAGE] + [
    (path, damage) for path in RESUME_PATHS for damage in STATE_DAMAGE]


@pytest.fixture
def context(shards_dir, sft_run, dpo_run) -> dict:
    return {"shards": shards_dir, "sft_dir": sft_run[0], "sft_flags": sft_run[1], "dpo_dir": dpo_run[0], "dpo_flags": dpo_run[1]}


def _good_checkpoint(path_name: str, ctx: dict, base_checkpoint: Path, work: Path) -> Path:
    source = {"sft-resume": ctx.get("sft_dir"), "dpo-resume": ctx.get("dpo_dir")}.get(path_name) or base_checkpoint
    target = work / "ckpt" / source.name
    shutil.copytree(source, target)
    return target


@pytest.mark.parametrize("path_name, damage_name", CASES, ids=[f"{p}:{d}" for p, d in CASES])
def test_damaged_checkpoint_fails_in_one_line_and_writes_nothing(
    path_name, damage_name, context, base_checkpoint, tmp_path, capsys
):
    damage, named_file = {**CHECKPOINT_DAMAGE, **STATE_DAMAGE}[damage_name]
    ckpt = _good_checkpoint(path_name, context, base_checkpoint, tmp_path)
    damage(ckpt)
    before = folder_hash(ckpt)
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    main, argv, script = LOAD_PATHS[path_name](ckpt, tmp_path, context)

    message = fails(capsys, main, argv, script)
    assert named_file in message, message
    assert folder_hash(ckpt) == before  # nothing written over (or next to) the checkpoint
    assert not (tmp_path / "sft_out").exists() and not (tmp_path / "runs").exists()
    assert not (ckpt.parent / CANARY).exists()
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) / 1024
    assert grown_mib < 300, f"peak memory grew by {grown_mib:.0f} MiB: something was built from an unchecked config"


@pytest.mark.parametrize("path_name", ["inference", "evaluate", "export-hf", "pretrain-resume", "sft-init", "sft-resume",
                                       "dpo-init", "dpo-resume"])
def test_the_undamaged_copy_loads(path_name, context, base_checkpoint, tmp_path, capsys):
    """The control for the cases above: the same copy, undamaged, goes through the same path."""
    ckpt = _good_checkpoint(path_name, context, base_checkpoint, tmp_path)
    main, argv, _ = LOAD_PATHS[path_name](ckpt, tmp_path, context)
    main([str(a) for a in argv])
    assert "error" not in capsys.readouterr().err


def test_the_gradio_app_builds_from_the_undamaged_copy(base_checkpoint):
    demo = inference_gradio.build_demo(base_checkpoint, device="cpu")
    assert demo.title == "lillm chat"


def test_weights_header_is_checked_before_anything_is_loaded(base_checkpoint, tmp_path):
    """The meta device path: a config claiming a ~1 TB model is compared with the header, nothing is allocated."""
    ckpt = _good_checkpoint("inference", {}, base_checkpoint, tmp_path)
    CHECKPOINT_DAMAGE["config-huge-model"][0](ckpt)
    from lillm.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="config needs .* tensors|is \\[.*\\] in the file"):
        load_checkpoint(ckpt)
    loaded = load_checkpoint(base_checkpoint)  # and a good one ends on the real device with no meta tensor left
    assert all(t.device.type == "cpu" for t in [*loaded.model.parameters(), *loaded.model.buffers()])
    assert loaded.model.lm_head.weight is loaded.model.embed_tokens.weight


def test_weights_name_the_tokenizer_they_were_trained_with(base_checkpoint):
    from safetensors import safe_open

    with safe_open(str(base_checkpoint / "model.safetensors"), "pt") as f:
        assert f.metadata()[TOKENIZER_HASH_KEY] == hashlib.sha256((base_checkpoint / "tokenizer.json").read_bytes()).hexdigest()


def test_nan_weights_fail_generation_in_one_line(base_checkpoint, tmp_path, capsys):
    ckpt = _good_checkpoint("inference", {}, base_checkpoint, tmp_path)
    _tensors(lambda t: t["norm.weight"].fill_(float("nan")))(ckpt)
    for temperature in ("0", "0.8"):  # argmax and torch.multinomial
        message = fails(capsys, inference.main, ["--checkpoint", ckpt, "--prompt", "Once", "--temperature", temperature,
                                                 "--max_new_tokens", "4", "--device", "cpu"], "inference.py")
        assert "NaN or infinite" in message


def test_gradio_notices_empty_message_overflow_and_nan(base_checkpoint, tmp_path):
    respond = inference_gradio.reply_function(load_checkpoint(base_checkpoint), max_prompt_chars=5000)
    settings = ("", 0.0, 0, 1.0, 8)

    def reply(message: str) -> str:
        return list(respond(message, [], *settings))[-1][0]

    for blank in ("", "   ", "\n\t"):
        assert reply(blank) == f"{inference_gradio.NOTICE_START}is empty; type something to chat about."
    overflow = reply("word " * 400)  # ~400 tokens in a 128-token context
    assert overflow.startswith(f"{inference_gradio.NOTICE_START}does not fit in the model's context")
    assert not reply("Hello!").startswith(inference_gradio.NOTICE_START)

    ckpt = _good_checkpoint("inference", {}, base_checkpoint, tmp_path)
    _tensors(lambda t: t["norm.weight"].fill_(float("nan")))(ckpt)
    respond = inference_gradio.reply_function(load_checkpoint(ckpt), max_prompt_chars=5000)
    assert reply("Hello!").startswith(f"{inference_gradio.NOTICE_START}could not be answered: the model's logits are NaN")


def test_chat_refuses_a_non_utf8_line_and_goes_on(base_checkpoint, monkeypatch, capsys):
    import io

    stdin = io.TextIOWrapper(io.BytesIO(b"caf\xe9\nHello\n"), encoding="utf-8")
    monkeypatch.setattr(sys, "stdin", stdin)
    assert inference.main(["--checkpoint", str(base_checkpoint), "--chat", "--temperature", "0",
                           "--max_new_tokens", "4", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert "error: input line 1 is not valid UTF-8 (byte 0xe9 at 3); type it again" in captured.err
    assert captured.out.count("assistant> ") == 1 and "Traceback" not in captured.err


# ---------------------------------------------------------------------------------------------- bad flags


def _cuda_missing() -> list:
    return [] if torch.cuda.is_available() else [(["--device", "cuda"], "CUDA is not available")]


def inference_cases(ckpt: Path, tmp: Path) -> list[tuple[list, str]]:
    return [
        (["--checkpoint", ckpt / "model.safetensors", "--prompt", "x"], "pass the checkpoint folder"),
        (["--checkpoint", tmp / "missing", "--prompt", "x"], "checkpoint folder not found"),
        (["--checkpoint", ckpt], "one of the arguments --prompt --chat is required"),
        (["--checkpoint", ckpt, "--prompt", "x", "--chat"], "not allowed with argument"),
        (["--checkpoint", ckpt, "--prompt", NOT_UTF8], "argument --prompt: not valid UTF-8 (byte 0xe9 at position 3)"),
        (["--checkpoint", ckpt, "--chat", "--system", NOT_UTF8], "argument --system: not valid UTF-8"),
        (["--checkpoint", ckpt, "--prompt", "x", "--device", "bogus"], "unknown device 'bogus'"),
        (["--checkpoint", ckpt, "--prompt", "x", "--device", "tpu"], "unknown device 'tpu'"),
        (["--checkpoint", ckpt, "--prompt", "x", "--dtype", "fp8"], "unknown dtype 'fp8'"),
        (["--checkpoint", ckpt, "--prompt", "x", "--temperature", "-1"], "temperature must be >= 0"),
        (["--checkpoint", ckpt, "--prompt", "x", "--temperature", "hot"], "invalid float value: 'hot'"),
        (["--checkpoint", ckpt, "--prompt", "x", "--top_k", "-1"], "top_k must be an integer >= 0"),
        (["--checkpoint", ckpt, "--prompt", "x", "--top_p", "0"], "top_p must be in (0, 1]"),
        (["--checkpoint", ckpt, "--prompt", "x", "--top_p", "1.5"], "top_p must be in (0, 1]"),
        (["--checkpoint", ckpt, "--prompt", "x", "--repetition_penalty", "0"], "repetition_penalty must be > 0"),
        (["--checkpoint", ckpt, "--prompt", "x", "--max_new_tokens", "0"], "max_new_tokens must be an integer >= 1"),
        (["--checkpoint", ckpt, "--prompt", "x", "--seed", "x"], "invalid int value: 'x'"),
        (["--checkpoint", ckpt, "--prompt", "x", "--bogus"], "unrecognized arguments: --bogus"),
    ] + [(["--checkpoint", ckpt, "--prompt", "x", *a], m) for a, m in _cuda_missing()]


def gradio_cases(ckpt: Path, tmp: Path, busy_port: int) -> list[tuple[list, str]]:
    return [
        (["--checkpoint", ckpt, "--port", "70000"], "port 70000 is out of range"),
        (["--checkpoint", ckpt, "--port", "0"], "port 0 is out of range"),
        (["--checkpoint", ckpt, "--port", "http"], "invalid port 'http'"),
        (["--checkpoint", ckpt, "--port", busy_port], f"cannot listen on 127.0.0.1:{busy_port}"),
        (["--checkpoint", ckpt, "--concurrency", "0"], "argument --concurrency: must be at least 1, got 0"),
        (["--checkpoint", ckpt, "--max_prompt_chars", "-5"], "argument --max_prompt_chars: must be at least 1"),
        (["--checkpoint", ckpt, "--device", "bogus"], "unknown device 'bogus'"),
        (["--checkpoint", ckpt, "--dtype", "fp8", "--port", free_port()], "unknown dtype 'fp8'"),
        (["--checkpoint", ckpt / "config.json", "--port", free_port()], "pass the checkpoint folder"),
        (["--checkpoint", tmp / "missing", "--port", free_port()], "checkpoint folder not found"),
        (["--checkpoint", ckpt, "--host", "203.0.113.1", "--port", free_port()], "cannot listen on 203.0.113.1:"),
    ] + [(["--checkpoint", ckpt, *a], m) for a, m in _cuda_missing()]


def pretrain_cases(ckpt: Path, tmp: Path, shards: Path) -> list[tuple[list, str]]:
    a_file, a_folder = tmp / "a_file", tmp / "not_a_checkpoint"
    a_file.write_text("x")
    a_folder.mkdir()
    (a_folder / "notes.txt").write_text("mine")
    new = ["--data_dir", shards, "--out_dir", tmp / "new", "--log_dir", tmp / "runs", "--device", "cpu"]
    return [(new + a, m) for a, m in [
        (["--device", "bogus"], "unknown device 'bogus'"),
        (["--dtype", "fp8"], "unknown dtype 'fp8'"),
        (["--preset", "huge"], "invalid choice: 'huge'"),
        (["--batch_size", "0"], "--batch_size must be at least 1, got 0"),
        (["--grad_accum", "0"], "--grad_accum must be at least 1, got 0"),
        (["--eval_interval", "0"], "--eval_interval must be at least 1, got 0"),
        (["--eval_batches", "0"], "--eval_batches must be at least 1, got 0"),
        (["--ckpt_interval", "-1"], "--ckpt_interval must be at least 1, got -1"),
        (["--log_interval", "0"], "--log_interval must be at least 1, got 0"),
        (["--max_steps", "0"], "--max_steps must be at least 1, got 0"),
        (["--lr", "fast"], "invalid float value: 'fast'"),
        (["--dim", "wide"], "invalid int value: 'wide'"),
        (["--dim", "0"], "ModelConfig.dim must be a positive integer"),
        (["--n_heads", "3"], "is not divisible by n_heads=3"),
        (["--pos_encoding", "alibi"], "pos_encoding must be 'rope' or 'nope'"),
        (["--dropout", "1.5"], "dropout must be in [0, 1)"),
        (["--vocab_size", "10"], "--vocab_size 10 is smaller than the tokenizer's vocabulary"),
        (["--tokenizer", tmp / "missing.json"], "tokenizer file not found"),
        (["--data_dir", tmp / "no_shards"], "meta.json not found"),
        (["--out_dir", a_file], "argument --out_dir: path"),
        (["--out_dir", a_file / "sub"], "is a file, not a folder"),
        (["--out_dir", a_folder], "holds other files, not a checkpoint"),
        (["--out_dir", ckpt], "already holds a checkpoint; pass --resume to continue it or --overwrite"),
        (["--out_dir", ckpt, "--overwrite", "--dim", "0"], "ModelConfig.dim must be a positive integer"),
        (["--log_dir", a_file], "argument --log_dir: path"),
        (["--out_dir", tmp / "nothing", "--resume"], "nothing to --resume"),
        (["--out_dir", ckpt, "--resume", "--seed", "7", "--max_steps", "300"], "was trained with --seed 1337"),
        (["--out_dir", ckpt, "--resume", "--max_steps", "150"], "is already at step 150"),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ] + _cuda_missing()]


def sft_cases(ckpt: Path, tmp: Path, sft_dir: Path, sft_flags: list[str]) -> list[tuple[list, str]]:
    a_file = tmp / "a_file"
    a_file.write_text("x")
    bad_utf8, bad_json = tmp / "latin1.jsonl", tmp / "broken.jsonl"
    good = json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]})
    bad_utf8.write_bytes(f"{good}\n".encode() + '{"messages": [{"role": "user", "content": "caf\xe9"}]}\n'.encode("latin-1"))
    bad_json.write_text(f"{good}\n{{not json\n")
    new = ["--init", ckpt, "--out_dir", tmp / "new", "--log_dir", tmp / "runs", "--device", "cpu", "--eval_samples", "0"]
    resume = [*sft_flags, "--out_dir", sft_dir, "--resume", "--max_steps", "3"]
    return [(new + a, m) for a, m in [
        (["--init", tmp / "missing"], "checkpoint folder not found"),
        (["--init", ckpt / "model.safetensors"], "pass the checkpoint folder"),
        (["--device", "bogus"], "unknown device 'bogus'"),
        (["--dtype", "fp8"], "unknown dtype 'fp8'"),
        (["--batch_size", "0"], "--batch_size must be positive, got 0"),
        (["--grad_accum", "0"], "--grad_accum must be positive, got 0"),
        (["--max_steps", "0"], "--max_steps must be positive, got 0"),
        (["--val_conversations", "0"], "--val_conversations must be positive"),
        (["--lora_rank", "-1"], "--lora_rank must be >= 0, got -1"),
        (["--eval_samples", "-1"], "--eval_samples must be >= 0, got -1"),
        (["--sample_max_tokens", "0"], "--sample_max_tokens must be positive"),
        (["--max_seq_len", "1"], "--max_seq_len 1 must be in 2..128"),
        (["--max_seq_len", "4096"], "--max_seq_len 4096 must be in 2..128"),
        (["--overflow", "wrap"], "invalid choice: 'wrap'"),
        (["--system", NOT_UTF8], "argument --system: not valid UTF-8"),
        (["--out_dir", a_file], "argument --out_dir: path"),
        (["--out_dir", ckpt], "already holds a checkpoint; pass --resume to continue it or --overwrite"),
        (["--train_file", tmp / "missing.jsonl"], "chat file not found"),
        (["--train_file", bad_utf8], f"{bad_utf8}:2: not valid UTF-8"),
        (["--train_file", bad_json], f"{bad_json}:2: expected a JSON object"),
        (["--out_dir", tmp / "nothing", "--resume"], "nothing to --resume"),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ] + _cuda_missing()] + [
        ([*resume, "--seed", "7"], "was trained with --seed 1337; resume with the same seed"),
        ([*resume, "--max_conversations", "30"], "was made with other data or LoRA settings"),
        ([*resume, "--lora_rank", "4"], "was made with other data or LoRA settings"),
    ]


def tokenizer_cases(tmp: Path) -> list[tuple[list, str]]:
    txt, latin1_txt, latin1_jsonl, bad_jsonl, csv = (tmp / n for n in ("ok.txt", "latin1.txt", "latin1.jsonl", "bad.jsonl", "x.csv"))
    txt.write_text("Once upon a time.\n\nThe end.\n")
    latin1_txt.write_bytes(b"fine\n\ncaf\xe9\n")
    latin1_jsonl.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    bad_jsonl.write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    csv.write_text("a,b\n")
    out = ["--output", tmp / "tok.json", "--val_file", txt]
    return [
        ([txt, "--vocab_size", "10", *out], "--vocab_size must be at least"),
        ([txt, "--vocab_size", "big", *out], "invalid int value: 'big'"),
        ([txt, "--max_docs", "0", *out], "argument --max_docs: must be at least 1, got 0"),
        ([txt, "--output", tmp], f"argument --output: path {tmp} is a folder"),
        ([txt, "--output", txt / "tok.json"], "is a file, not a folder"),
        ([txt, "--impl", "rust", *out], "invalid choice: 'rust'"),
        ([tmp / "missing.txt", *out], "input file not found"),
        ([csv, *out], "unsupported file type '.csv'"),
        ([latin1_txt, "--vocab_size", "300", *out], f"{latin1_txt}:3: not valid UTF-8"),
        ([latin1_jsonl, "--vocab_size", "300", *out], f"{latin1_jsonl}:2: not valid UTF-8"),
        ([bad_jsonl, "--vocab_size", "300", *out], f"{bad_jsonl}:2: no string field 'text'"),
        ([txt, "--val_file", tmp / "missing.txt", "--output", tmp / "tok.json"], "input file not found"),
        ([txt, "--dataset", "roneneldan/TinyStories", *out], "give either input files or --dataset"),
    ]


def prepare_cases(tmp: Path, tokenizer: Path) -> list[tuple[list, str]]:
    txt, latin1 = tmp / "ok.txt", tmp / "latin1.jsonl"
    txt.write_text("Once upon a time.\n\nThe end.\n")
    latin1.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    a_file = tmp / "a_file"
    a_file.write_text("x")
    ok = ["--tokenizer", tokenizer, "--out_dir", tmp / "shards"]
    return [
        ([txt, "--val_file", txt, "--batch_docs", "0", *ok], "argument --batch_docs: must be at least 1, got 0"),
        ([txt, "--val_file", txt, "--max_docs", "-1", *ok], "argument --max_docs: must be at least 1"),
        ([txt, "--val_fraction", "1.5", *ok], "--val_fraction must be in [0, 1)"),
        ([txt, "--val_fraction", "0.1", "--val_file", txt, *ok], "give either --val_fraction or --val_file"),
        ([txt, *ok], "no validation data"),
        ([txt, "--val_file", txt, "--tokenizer", tmp / "missing.json", "--out_dir", tmp / "shards"], "tokenizer file not found"),
        ([txt, "--val_file", txt, "--tokenizer", tokenizer, "--out_dir", a_file], "argument --out_dir: path"),
        ([tmp / "missing.txt", "--val_file", txt, *ok], "input file not found"),
        ([latin1, "--val_file", txt, *ok], f"{latin1}:2: not valid UTF-8"),
    ]


def evaluate_cases(ckpt: Path, tmp: Path) -> list[tuple[list, str]]:
    ok = ["--checkpoint", ckpt, "--tasks", "arc_easy", "--limit", "2", "--device", "cpu"]
    latin1 = tmp / "latin1_data"
    latin1.mkdir()
    item = {"id": "1", "question": "Which?", "choices": ["a", "b"], "label": 0}
    (latin1 / "eval_arc_easy_test.jsonl").write_bytes(json.dumps(item).encode() + b'\n{"id": "caf\xe9"}\n')
    return [(ok + a, m) for a, m in [
        (["--data_dir", latin1], f"{latin1 / 'eval_arc_easy_test.jsonl'}:2: not valid UTF-8"),
        (["--checkpoint", ckpt / "model.safetensors"], "pass the checkpoint folder"),
        (["--checkpoint", tmp / "missing"], "checkpoint folder not found"),
        (["--device", "bogus"], "unknown device 'bogus'"),
        (["--dtype", "fp8"], "unknown dtype 'fp8'"),
        (["--limit", "some"], "invalid int value: 'some'"),
        (["--tasks", "mmlu"], "mmlu"),
        (["--bpb", tmp / "missing.txt"], "missing.txt"),
        (["--data_dir", tmp / "no_data"], "no_data"),
    ] + _cuda_missing()]


def convert_cases(ckpt: Path, tmp: Path) -> list[tuple[list, str]]:
    a_file = tmp / "a_file"
    a_file.write_text("x")
    return [
        ([tmp / "missing", tmp / "out"], "is neither a file, a folder nor a preset"),
        ([a_file, tmp / "out"], "expected a .gguf file"),
        ([ckpt, a_file, "--to", "hf"], "argument out: path"),
        ([ckpt, tmp / "out", "--to", "onnx"], "invalid choice: 'onnx'"),
        ([ckpt / "config.json", tmp / "out", "--to", "hf"], "pass the checkpoint folder"),
        ([ckpt, ckpt.parent, "--to", "hf"], "already exists and is not empty"),
    ]


def dpo_cases(ckpt: Path, tmp: Path, dpo_dir: Path, dpo_flags: list[str]) -> list[tuple[list, str]]:
    a_file = tmp / "a_file"
    a_file.write_text("x")
    new = ["--init", ckpt, "--out_dir", tmp / "new", "--log_dir", tmp / "runs", "--device", "cpu", "--eval_samples", "0"]
    resume = [*dpo_flags, "--out_dir", dpo_dir, "--resume", "--max_steps", "3"]
    latin1 = tmp / "latin1_prefs.jsonl"
    latin1.write_bytes(b'{"prompt": [{"role": "user", "content": "caf\xe9"}], "chosen": "a", "rejected": "b"}\n')
    return [(new + a, m) for a, m in [
        (["--train_file", latin1], f"{latin1}:1: not valid UTF-8"),
        (["--init", tmp / "missing"], "checkpoint folder not found"),
        (["--device", "bogus"], "unknown device 'bogus'"),
        (["--dtype", "fp8"], "unknown dtype 'fp8'"),
        (["--beta", "0"], "--beta must be positive"),
        (["--batch_size", "0"], "--batch_size must be positive, got 0"),
        (["--system", NOT_UTF8], "argument --system: not valid UTF-8"),
        (["--out_dir", a_file], "argument --out_dir: path"),
        (["--out_dir", ckpt], "already holds a checkpoint; pass --resume to continue it or --overwrite"),
        (["--out_dir", tmp / "nothing", "--resume"], "nothing to --resume"),
    ] + _cuda_missing()] + [
        ([*resume, "--seed", "7"], "was trained with --seed 1337; resume with the same seed"),
        ([*resume, "--beta", "0.3"], "was made with other data, --beta or LoRA settings"),
    ]


SCRIPT_CASES = {"inference": 19, "gradio": 12, "pretrain": 30, "sft": 26, "tokenizer": 13, "prepare": 9,
                "evaluate": 10, "convert": 6, "dpo": 13}


def _script_cases(script: str, ctx: dict, tmp: Path):
    if script == "inference":
        return inference.main, "inference.py", inference_cases(ctx["ckpt"], tmp)
    if script == "gradio":
        return inference_gradio.main, "inference_gradio.py", gradio_cases(ctx["ckpt"], tmp, ctx["busy_port"])
    if script == "pretrain":
        return pretrain.main, "pretrain.py", pretrain_cases(ctx["ckpt"], tmp, ctx["shards"])
    if script == "sft":
        return sft_train.main, "sft_train.py", sft_cases(ctx["ckpt"], tmp, ctx["sft_dir"], ctx["sft_flags"])
    if script == "tokenizer":
        return train_custom_tokenizer.main, "train_custom_tokenizer.py", tokenizer_cases(tmp)
    if script == "evaluate":
        return evaluate_cli.main, "evaluate.py", evaluate_cases(ctx["ckpt"], tmp)
    if script == "convert":
        return convert_checkpoint.main, "convert_checkpoint.py", convert_cases(ctx["ckpt"], tmp)
    if script == "dpo":
        return dpo_train.main, "dpo_train.py", dpo_cases(ctx["ckpt"], tmp, ctx["dpo_dir"], ctx["dpo_flags"])
    return prepare_pretrain.main, "prepare_pretrain.py", prepare_cases(tmp, ctx["tokenizer"])


@pytest.fixture
def busy_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


@pytest.mark.parametrize("script, index", [(s, i) for s, n in SCRIPT_CASES.items() for i in range(n)])
def test_bad_flag_fails_in_one_line(script, index, context, base_checkpoint, tokenizer_path, busy_port, tmp_path, capsys):
    """Case `index` of the script's list; the lists are built per test so each case gets fresh files."""
    ckpt = _good_checkpoint("inference", context, base_checkpoint, tmp_path)
    before = folder_hash(ckpt)
    ctx = {**context, "ckpt": ckpt, "busy_port": busy_port, "tokenizer": tokenizer_path}
    main, name, cases = _script_cases(script, ctx, tmp_path)
    if index >= len(cases):
        pytest.skip("the CUDA-missing case needs a machine without CUDA")
    argv, expected = cases[index]
    message = fails(capsys, main, argv, name)
    assert expected in message, message
    assert folder_hash(ckpt) == before
    for output in ("new", "shards", "tok.json", "out"):
        assert not (tmp_path / output).is_file() and not any((tmp_path / output).rglob("*")), output


def test_every_case_list_is_counted(context, base_checkpoint, tokenizer_path, tmp_path):
    """SCRIPT_CASES must match the lists (with the CUDA-missing case on a machine without CUDA)."""
    ctx = {**context, "ckpt": base_checkpoint, "busy_port": 1, "tokenizer": tokenizer_path}
    for script, count in SCRIPT_CASES.items():
        work = tmp_path / script
        work.mkdir()
        cases = _script_cases(script, ctx, work)[2]
        assert len(cases) + torch.cuda.is_available() * (script in ("inference", "gradio", "pretrain", "sft", "evaluate", "dpo")) == count, script


# ---------------------------------------------------------------------------------------------- overwrite


def test_overwrite_replaces_a_checkpoint_only_when_asked(shards_dir, tmp_path, capsys):
    tiny = ["--data_dir", shards_dir, "--dim", "32", "--n_layers", "1", "--n_heads", "2", "--n_kv_heads", "1",
            "--max_seq_len", "32", "--batch_size", "2", "--eval_batches", "1", "--device", "cpu",
            "--out_dir", tmp_path / "ckpt", "--log_dir", tmp_path / "runs"]
    pretrain.main([str(a) for a in [*tiny, "--max_steps", "3"]])
    before = folder_hash(tmp_path / "ckpt")
    message = fails(capsys, pretrain.main, [*tiny, "--max_steps", "2"], "pretrain.py")
    assert "already holds a checkpoint" in message and folder_hash(tmp_path / "ckpt") == before
    pretrain.main([str(a) for a in [*tiny, "--max_steps", "2", "--overwrite"]])
    assert load_checkpoint(tmp_path / "ckpt").meta["step"] == 2


# ---------------------------------------------------------------------------------------------- the real CLI


def run_cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8"}
    return subprocess.run([*args], input=stdin, capture_output=True, text=True, env=env, cwd=REPO, timeout=120)


def test_real_command_lines_fail_in_one_line(base_checkpoint, tmp_path):
    damaged = _good_checkpoint("inference", {}, base_checkpoint, tmp_path)
    CHECKPOINT_DAMAGE["weights-missing-tensor"][0](damaged)
    cases = [
        ((sys.executable, "inference.py", "--checkpoint", str(damaged), "--prompt", "x"),
         f"inference.py: error: checkpoint {damaged}: model.safetensors does not match config.json"),
        ((sys.executable, "inference_gradio.py", "--checkpoint", str(damaged), "--port", "70000"),
         "inference_gradio.py: error: argument --port: port 70000 is out of range"),
        ((sys.executable, "pretrain.py", "--device", "bogus"), "pretrain.py: error: argument --device: unknown device"),
        (("bash", "speedrun.sh", "--bogus"), "speedrun.sh: error: unknown option --bogus"),
    ]
    for argv, expected in cases:
        result = run_cli(*argv)
        assert result.returncode == 2 and result.stderr.startswith(expected), (argv, result.stderr)
        assert result.stderr.count("\n") == 1 and result.stdout == "", (argv, result.stderr)


def test_speedrun_help_prints_usage():
    result = run_cli("bash", "speedrun.sh", "--help")
    assert result.returncode == 0 and result.stderr == ""
    assert result.stdout.startswith("The whole pipeline on a CPU") and "PRETRAIN_ARGS=--overwrite" in result.stdout


# ---------------------------------------------------------------------------------------------- SFT's end-of-run numbers


def test_held_out_prompt_keeps_a_leading_system_turn_with_the_first_user_turn(tokenizer_path):
    from lillm.chat import render
    from lillm.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_path)
    conversation = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi there"},
                    {"role": "assistant", "content": "Hello"}]
    [(user, ids)] = sft_train.held_out_prompts(tokenizer, [("a", conversation)], 1, 8, 128, system=None)
    assert user == "Hi there" and ids == render(tokenizer, conversation[:2], add_generation_prompt=True)[0]


def test_a_reply_cut_by_the_context_window_has_not_ended(tokenizer_path):
    from lillm.generate import SamplingConfig, generate_batch
    from lillm.model import LilLM, ModelConfig
    from lillm.tokenizer import load_tokenizer, special_tokens

    tokenizer = load_tokenizer(tokenizer_path)
    torch.manual_seed(0)
    model = LilLM(ModelConfig(vocab_size=1024, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, max_seq_len=16)).eval()
    prompt = list(range(10, 23))  # 13 tokens: 3 more fit in the 16-token window, not the 10 asked for
    [reply] = generate_batch(model, [prompt], SamplingConfig(temperature=0.0, max_new_tokens=10, stop_ids=()))
    assert len(reply) == 3 and special_tokens(tokenizer).im_end not in reply  # cut by the window, no <|im_end|>
    rate, examples = sft_train.im_end_rate(model, tokenizer, [("x", prompt)], max_new_tokens=10)
    assert rate == 0.0 and examples[0]["ended"] is False
