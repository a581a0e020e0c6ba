"""lillm.evaluate against plain references: a per-choice loop, transformers' Llama, hand-computed bits/byte;
an oracle test double; evaluate.py / report.py on real checkpoints (exit 2 on bad input, the report card)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

import evaluate as evaluate_cli
import report as report_cli
from lillm import evaluate as ev
from lillm.checkpoint import save_checkpoint
from lillm.data import file_sha256
from lillm.model import LilLM, ModelConfig
from lillm.tokenizer import encode_ordinary, load_tokenizer, special_tokens

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer(tokenizer_path):
    return load_tokenizer(tokenizer_path)


def random_model(vocab_size: int, max_seq_len: int, seed: int = 0) -> LilLM:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=max_seq_len)
    return LilLM(cfg).eval()


def task_items(data_dir: Path, n: int) -> dict[str, list[ev.Item]]:
    return {name: ev.load_items(task, data_dir / task.file, n) for name, task in ev.TASKS.items()}


def loop_logprobs(logits_fn, tokenizer, item: ev.Item, max_seq_len: int) -> list[float]:
    """The plain reference: one forward pass per choice, no batching, no padding. A target token is scored
    when its position in the untruncated context + choice is at or after the choice's first token."""
    context = encode_ordinary(tokenizer, item.context)
    out = []
    for choice in item.choices:
        full = context + encode_ordinary(tokenizer, " " + choice)
        start = max(0, len(full) - (max_seq_len + 1))
        window = torch.tensor(full[start:])
        with torch.no_grad():
            logprobs = torch.log_softmax(logits_fn(window[None, :-1])[0].float(), dim=-1)
        total = 0.0
        for j in range(1, len(window)):
            if start + j >= len(context):
                total += float(logprobs[j - 1, window[j]])
        out.append(total)
    return out


def test_batched_scores_equal_a_per_choice_loop(tokenizer, data_dir):
    max_seq_len = 64
    model = random_model(tokenizer.get_vocab_size(), max_seq_len)
    items = [item for items in task_items(data_dir, 8).values() for item in items]
    long_choice = " ".join(["the little dog ran home"] * 12)  # alone longer than the window
    items.append(ev.Item("long", "Question: which one?\nAnswer:", ("yes", long_choice, "no, it is not"), 0))
    lengths = [[len(encode_ordinary(tokenizer, item.context + " " + c)) for c in item.choices] for item in items]
    assert sum(max(row) > max_seq_len + 1 for row in lengths) >= 5, "too few items need truncation"
    assert all(len(set(row)) > 1 for row in lengths[-3:]), "choices should differ in length"

    expected = [loop_logprobs(lambda x: model(x)[0], tokenizer, item, max_seq_len) for item in items]
    encoded = [ev.encode_item(tokenizer, item) for item in items]
    fits = [ev.fits_window(item, max_seq_len) for item in encoded]
    assert sum(fits) >= 4 and len(fits) - sum(fits) >= 4, "both scoring paths (shared context, windows) must be used"
    for batch_size in (1, 7, 64):
        got = ev.choice_logprobs(model, encoded, batch_size=batch_size)
        for g, e in zip(got, expected, strict=True):
            assert g == pytest.approx(e, abs=1e-5, rel=0)


def test_acc_norm_divides_by_utf8_bytes_not_characters():
    # "éééé" is 4 characters but 8 bytes. Per byte: -1.0 vs -1.1 (choice 0 wins); per character it would be
    # -2.0 vs -1.1 (choice 1); by the raw sum choice 1 (-6.6) wins.
    item = ev.Item("x", "ctx", ("éééé", "abcdef"), label=0)
    metrics = ev.mc_metrics([item], [[-8.0, -6.6]])
    assert metrics["acc"] == 0.0 and metrics["acc_norm"] == 1.0
    metrics = ev.mc_metrics([ev.Item("y", "ctx", ("éééé", "abcdef", "z"), label=1)], [[-8.0, -6.6, -50.0]])
    assert metrics["acc"] == 1.0 and metrics["acc_norm"] == 0.0 and metrics["chance"] == pytest.approx(1 / 3)


class OracleModel(nn.Module):
    """A test double that was told the answers: after any prefix of context + right choice it puts almost all
    probability on the next right token; elsewhere it predicts a uniform distribution. With a KV cache it keeps
    the token ids it has read in the cache's key tensor (where a real model keeps their keys)."""

    def __init__(self, tokenizer, items: list[ev.Item], max_seq_len: int):
        super().__init__()
        self.config = ModelConfig(vocab_size=tokenizer.get_vocab_size(), dim=8, n_layers=1, n_heads=1, n_kv_heads=1,
                                  max_seq_len=max_seq_len)
        self.anchor = nn.Parameter(torch.zeros(1))  # tells the scorer the device and dtype
        self.trie: dict = {}
        for item in items:
            node = self.trie
            for token in encode_ordinary(tokenizer, item.context + " " + item.choices[item.label]):
                node = node.setdefault(token, {})

    def forward(self, input_ids, cache=None, attention_mask=None, last_only=False, logits_at=None):
        B, T = input_ids.shape
        history = input_ids
        if cache is not None:
            cache.keys[0, :, 0, cache.length : cache.length + T, 0] = input_ids.float()
            cache.advance(T)
            history = cache.keys[0, :, 0, : cache.length, 0].long()
        is_real = attention_mask if attention_mask is not None else torch.ones_like(history, dtype=torch.bool)
        logits = torch.zeros(B, T, self.config.vocab_size)
        for b in range(B):
            node, offset = self.trie, history.shape[1] - T
            for t, token in enumerate(history[b].tolist()):
                if not is_real[b, t]:
                    continue
                node = node.get(token) if node is not None else None
                if node is not None and len(node) == 1 and t >= offset:
                    logits[b, t - offset, next(iter(node))] = 50.0
        if logits_at is not None:
            return logits[logits_at], None
        return (logits[:, -1:] if last_only else logits), None


def test_a_model_told_the_answers_scores_100_percent(tokenizer, data_dir):
    for name, items in task_items(data_dir, 25).items():
        oracle = OracleModel(tokenizer, items, max_seq_len=1024)
        metrics = ev.evaluate_task(oracle, tokenizer, ev.TASKS[name], items, batch_size=16)
        assert metrics["acc"] == 1.0 and metrics["acc_norm"] == 1.0 and metrics["n"] == 25, name
        # The same double told the wrong answers never picks the right one.
        wrong = [ev.Item(i.id, i.context, i.choices, (i.label + 1) % len(i.choices)) for i in items]
        fooled = OracleModel(tokenizer, wrong, max_seq_len=1024)
        assert ev.evaluate_task(fooled, tokenizer, ev.TASKS[name], items, batch_size=16)["acc"] == 0.0, name


def test_scores_equal_transformers_llama_on_the_same_weights(tokenizer, data_dir):
    pytest.importorskip("transformers")
    from lillm.hf import to_hf_llama

    max_seq_len = 96
    model = random_model(tokenizer.get_vocab_size(), max_seq_len, seed=1)
    reference = to_hf_llama(model).eval()
    for name, items in task_items(data_dir, 20).items():
        got = ev.choice_logprobs(model, [ev.encode_item(tokenizer, item) for item in items], batch_size=16)
        for item, g in zip(items, got, strict=True):
            expected = loop_logprobs(lambda x: reference(input_ids=x).logits, tokenizer, item, max_seq_len)
            assert g == pytest.approx(expected, abs=1e-4, rel=0), (name, item.id)


@pytest.mark.slow
def test_smollm2_scores_equal_transformers_reading_the_same_gguf(smollm2_checkpoint, data_dir):
    """Real weights: lillm's import of SmolLM2-135M-Instruct vs transformers' own GGUF reader, one forward per choice."""
    transformers = pytest.importorskip("transformers")
    from lillm.checkpoint import load_checkpoint
    from lillm.hf import preset_gguf

    gguf = preset_gguf("smollm2-135m-instruct")
    reference = transformers.LlamaForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name).eval()
    ckpt = load_checkpoint(smollm2_checkpoint)
    for name, items in task_items(data_dir, 20).items():
        got = ev.choice_logprobs(ckpt.model, [ev.encode_item(ckpt.tokenizer, item) for item in items], batch_size=16)
        for item, g in zip(items, got, strict=True):
            expected = loop_logprobs(lambda x: reference(input_ids=x).logits, ckpt.tokenizer, item, ckpt.config.max_seq_len)
            assert g == pytest.approx(expected, abs=1e-4, rel=0), (name, item.id)


def test_bits_per_byte_on_a_text_file_equals_a_hand_computation(tokenizer, tmp_path):
    docs = ["Once upon a time, a cat sat on a mat.\nThe end.", "Über café — naïve piñata! 🐈", " ".join(["Tom ran."] * 12)]
    path = tmp_path / "val.txt"
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    model = random_model(tokenizer.get_vocab_size(), max_seq_len=16)
    eos = special_tokens(tokenizer).eos

    stream = [eos]
    for doc in docs:
        stream += encode_ordinary(tokenizer, doc) + [eos]
    nats = 0.0
    for start in range(0, len(stream) - 1, 16):  # the model's own mean loss, one window at a time
        window = torch.tensor(stream[start : start + 17])[None]
        with torch.no_grad():
            nats += model(window[:, :-1], window[:, 1:])[1].item() * (window.shape[1] - 1)
    expected = nats / math.log(2) / sum(len(doc.encode("utf-8")) for doc in docs)

    result = ev.bits_per_byte(model, tokenizer, path, batch_size=3)
    assert result.tokens == len(stream) - 1 and len(stream) > 3 * 16
    assert result.bytes == len(path.read_bytes()) - 2 * 2 - 1  # minus the blank-line separators and last newline
    assert result.bits_per_byte == pytest.approx(expected, rel=1e-5)


def test_bits_per_byte_on_a_shard_uses_its_bytes_per_token(tokenizer, shards_dir, tokenizer_path):
    model = random_model(tokenizer.get_vocab_size(), max_seq_len=64)
    meta = json.loads((shards_dir / "meta.json").read_text())
    ids = torch.from_numpy(np.fromfile(shards_dir / "val.bin", dtype=meta["dtype"])[:1001].astype(np.int64))
    with torch.no_grad():
        nats = sum(model(w[None, :-1], w[None, 1:])[1].item() * (len(w) - 1) for w in [ids[s : s + 65] for s in range(0, 1000, 64)])
    expected = nats / math.log(2) / (1000 * meta["val_bytes"] / meta["val_tokens"])
    sha = file_sha256(tokenizer_path)
    result = ev.bits_per_byte(model, tokenizer, shards_dir / "val.bin", max_tokens=1000, tokenizer_sha256=sha)
    assert result.tokens == 1000
    assert result.bits_per_byte == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="different tokenizer"):
        ev.bits_per_byte(model, tokenizer, shards_dir / "val.bin", max_tokens=10, tokenizer_sha256="0" * 64)


@pytest.fixture(scope="module")
def random_checkpoint(tokenizer_path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eval") / "random"
    vocab = load_tokenizer(tokenizer_path).get_vocab_size()
    save_checkpoint(out, random_model(vocab, max_seq_len=64), tokenizer_path, meta={"stage": "base"})
    return out


def run_cli(module, args, capsys) -> tuple[int, str, str]:
    try:
        code = module.main([str(a) for a in args])
    except SystemExit as e:  # the scripts' error boundary (lillm.cli) exits with 2
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    "case, match",
    [
        ("bad_task", "unknown task 'mmlu'"),
        ("missing_file", "arc_easy data not found"),
        ("empty_subset", "no items to evaluate"),
        ("bad_line", ":2: not a hellaswag item"),
        ("bad_checkpoint", "model.safetensors"),
        ("missing_bpb", "--bpb file not found"),
        ("zero_limit", "--limit must be >= 1"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(case, match, random_checkpoint, data_dir, tmp_path, capsys):
    ckpt, tasks, extra = random_checkpoint, "hellaswag", []
    data = tmp_path / "data"
    data.mkdir()
    first = (data_dir / "eval_hellaswag_val.jsonl").open(encoding="utf-8").readline()
    (data / "eval_hellaswag_val.jsonl").write_text(first, encoding="utf-8")
    if case == "bad_task":
        tasks = "hellaswag,mmlu"
    elif case == "missing_file":
        tasks = "hellaswag,arc_easy"
    elif case == "empty_subset":
        (data / "eval_hellaswag_val.jsonl").write_text("\n", encoding="utf-8")
    elif case == "bad_line":
        (data / "eval_hellaswag_val.jsonl").write_text(first + '{"id": 1, "choices": ["a", "b"]}\n', encoding="utf-8")
    elif case == "bad_checkpoint":
        ckpt = tmp_path / "broken"
        ckpt.mkdir()
        (ckpt / "config.json").write_text((random_checkpoint / "config.json").read_text())
        (ckpt / "tokenizer.json").write_text((random_checkpoint / "tokenizer.json").read_text())
    elif case == "missing_bpb":
        extra = ["--bpb", tmp_path / "nope.txt"]
    elif case == "zero_limit":
        extra = ["--limit", "0"]
    out_file = tmp_path / "out.json"
    code, _, err = run_cli(evaluate_cli, ["--checkpoint", ckpt, "--tasks", tasks, "--data_dir", data, "--out", out_file, *extra], capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and match in err and err.startswith("evaluate.py: error:"), err
    assert not out_file.exists()


def test_report_card_for_base_and_sft_checkpoints(base_checkpoint, sft_checkpoint, data_dir, tmp_path, capsys):
    val = tmp_path / "val.txt"
    text = (data_dir / "pretrain_tinystories_val.txt").read_text(encoding="utf-8")[:20_000]
    val.write_text(text[: text.rfind("\n\n")], encoding="utf-8")
    results = {}
    for name, ckpt in (("base", base_checkpoint), ("sft", sft_checkpoint)):
        results[name] = tmp_path / f"eval_{name}.json"
        args = ["--checkpoint", ckpt, "--data_dir", data_dir, "--limit", 8, "--samples", "--sample_tokens", 8,
                "--out", results[name], "--device", "cpu"]
        code, out, err = run_cli(evaluate_cli, args + (["--bpb", val] if name == "base" else []), capsys)
        assert code == 0, err
    base, sft = (json.loads(results[n].read_text()) for n in ("base", "sft"))
    assert set(base["tasks"]) == set(ev.TASKS) and all(t["n"] == 8 for t in base["tasks"].values())
    assert 0 < base["bpb"] < 8 and base["bpb_data"]["tokens"] > 1000
    assert [s["kind"] for s in base["samples"]] == ["story"] * 5 and [s["kind"] for s in sft["samples"]] == ["chat"] * 5

    times = tmp_path / "stage_times.tsv"
    times.write_text("1. tokenizer\t4\n3. pretraining (tiny preset)\t600\n")
    report = tmp_path / "report" / "report.md"
    code, _, err = run_cli(report_cli, [results["base"], results["sft"], "--stage_times", times, "--out", report], capsys)
    assert code == 0, err
    page = report.read_text(encoding="utf-8")
    summary = json.loads((sft_checkpoint / "meta.json").read_text())["summary"]
    assert f"{summary['val_loss_before']:.4f} → **{summary['val_loss']:.4f}**" in page
    assert f"**{summary['im_end_rate']:.0%}**" in page
    assert "| **total** | **604 s (10.1 min)** |" in page
    assert f"{base['bpb']:.4f} on val.txt" in page
    tokens_seen = json.loads((base_checkpoint / "meta.json").read_text())["tokens_seen"]
    assert f"{tokens_seen:,}" in page
    for task, scores in base["tasks"].items():
        assert f"| {task} | base | 8 | {scores['chance']:.1%} | {scores['acc']:.1%} | {scores['acc_norm']:.1%} |" in page
    assert sum(line.startswith(f"| {p} |") for p in ev.CHAT_PROMPTS for line in page.splitlines()) == 5
    plots = [line[line.index("](") + 2 : -1] for line in page.splitlines() if line.startswith("![")]
    assert len(plots) == 2 and all((report.parent / p).is_file() for p in plots)

    # The same card for one checkpoint straight from evaluate.py.
    single = tmp_path / "single.md"
    code, _, err = run_cli(evaluate_cli, ["--checkpoint", sft_checkpoint, "--tasks", "arc_easy", "--data_dir", data_dir,
                                          "--limit", 4, "--report", single], capsys)
    assert code == 0, err
    assert "| arc_easy | sft | 4 |" in single.read_text() and "Supervised fine-tuning" in single.read_text()
    code, _, err = run_cli(report_cli, [tmp_path / "missing.json", "--out", tmp_path / "r.md"], capsys)
    assert code == 2 and "result file not found" in err
