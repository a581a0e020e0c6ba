"""Story instructions: data/prepare_story_instructions.py on the real TinyStories files, the exact word check,
the scores on hand-made replies, and the "instruct" block sft_train.py adds to its summary."""

from __future__ import annotations

import importlib.util
import json
import random
import re
from pathlib import Path

import numpy as np
import pytest

from lillm.chat import render, render_text
from lillm.instruct import (
    candidate_words,
    choose_words,
    common_words,
    contains_word,
    conversation,
    cut_story,
    openings_followed,
    parse_instruction,
    report_line,
    requested_word_positions,
    shuffled,
    split_half,
    word_counts,
    words_followed,
)
from lillm.report import machine_info, render_report
from lillm.sft_data import build_sft_dataset
from lillm.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("prepare_story_instructions", REPO / "data" / "prepare_story_instructions.py")
prepare = importlib.util.module_from_spec(spec)
spec.loader.exec_module(prepare)


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def stories(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").strip().split("\n\n")


def from_story(record: dict, story: str) -> bool:
    """Whether the conversation was made from this story: its reply is the story, or (continue) the prompt's
    start and the reply are the story's beginning and end."""
    user, reply = (m["content"] for m in record["messages"])
    if record["source"] == "story_instruct/continue":
        start = user.removeprefix("Continue this story: ")
        return story.startswith(start) and story.endswith(reply) and len(start) + len(reply) < len(story)
    return story == reply


@pytest.fixture(scope="module")
def made(data_dir: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("story_instruct")
    prepare.main(["--out_dir", str(out)])
    return out


def test_two_runs_write_identical_bytes_and_another_seed_differs(made: Path, tmp_path: Path):
    prepare.main(["--out_dir", str(tmp_path / "again")])
    prepare.main(["--out_dir", str(tmp_path / "seed2"), "--seed", "2"])
    for split in ("train", "val"):
        name = f"story_instruct_{split}.jsonl"
        assert (made / name).read_bytes() == (tmp_path / "again" / name).read_bytes()
    assert (made / "story_instruct_train.jsonl").read_bytes() != (tmp_path / "seed2" / "story_instruct_train.jsonl").read_bytes()


def test_every_story_gives_a_words_conversation_and_the_held_out_ones_come_from_val_only(made: Path, data_dir: Path):
    val_stories = {s.strip() for s in stories(data_dir / "pretrain_tinystories_val.txt")}
    train_stories = {s.strip() for s in stories(data_dir / "pretrain_tinystories_train.txt")}
    val, train = read_lines(made / "story_instruct_val.jsonl"), read_lines(made / "story_instruct_train.jsonl")
    assert len(val) > 500 and len(train) > 6000
    by_start = {}
    for story in val_stories:
        by_start.setdefault(story[:40], []).append(story)
    for record in val:
        reply = record["messages"][1]["content"]
        shown = record["messages"][0]["content"].removeprefix("Continue this story: ") if record["source"].endswith("continue") else reply
        assert any(from_story(record, s) for s in by_start.get(shown[:40], []))
    for record in train:
        assert not any(from_story(record, s) for s in by_start.get(record["messages"][1]["content"][:40], []))
        start = record["messages"][0]["content"].removeprefix("Continue this story: ")
        assert not any(from_story(record, s) for s in by_start.get(start[:40], []))
    train_replies = {r["messages"][1]["content"] for r in train if not r["source"].endswith("continue")}
    assert train_replies <= train_stories
    kinds = [r["source"] for r in val]
    assert kinds.count("story_instruct/words") > 300 and kinds.count("story_instruct/begin") > 100


def test_words_within_requests_early_words_and_draws_repeat_only_training_stories(data_dir: Path, tmp_path: Path):
    prepare.main(["--out_dir", str(tmp_path), "--words_within", "25", "--words_draws", "3", "--max_chars", "500"])
    common = common_words(word_counts(stories(data_dir / "pretrain_tinystories_train.txt")))
    for split, most in (("train", 3), ("val", 1)):
        words = [r for r in read_lines(tmp_path / f"story_instruct_{split}.jsonl") if r["source"] == "story_instruct/words"]
        per_story: dict[str, list[tuple[str, ...]]] = {}
        for record in words:
            user, story = (m["content"] for m in record["messages"])
            requested = parse_instruction(user).words
            early = candidate_words(story, common, within=25)
            assert set(requested) <= set(early) and list(requested) == [w for w in early if w in requested]
            per_story.setdefault(story, []).append(requested)
        counts = [len(v) for v in per_story.values()]
        assert max(counts) == most and len(per_story) > (100 if split == "train" else 10)
        assert all(len(set(v)) == len(v) for v in per_story.values())  # a repeated draw is dropped
        if split == "train":  # stories with more than 3 early words get more than one set of words
            assert sum(len(v) > 1 for v in per_story.values()) > 0.4 * len(per_story)


def test_cut_story_ends_at_the_last_sentence_that_fits():
    story = 'Tom ran. "Hi!" said Sue. The end came soon.'
    assert cut_story(story, 100) == story
    assert cut_story(story, 24) == cut_story(story, 30) == 'Tom ran. "Hi!" said Sue.'
    assert cut_story(story, 14) == 'Tom ran. "Hi!"'  # a closing quote stays with its sentence
    assert cut_story(story, 13) == cut_story(story, 8) == "Tom ran."
    assert cut_story(story, 7) is None


def test_cut_chars_uses_long_training_stories_cut_at_a_sentence_and_leaves_held_out_ones_alone(data_dir: Path, tmp_path: Path):
    args = ["--words_within", "30", "--max_chars", "500"]
    prepare.main(["--out_dir", str(tmp_path / "skip"), *args])
    prepare.main(["--out_dir", str(tmp_path / "cut"), *args, "--cut_chars", "500"])
    val = "story_instruct_val.jsonl"
    assert (tmp_path / "skip" / val).read_bytes() == (tmp_path / "cut" / val).read_bytes()
    train = [s.strip() for s in stories(data_dir / "pretrain_tinystories_train.txt")]
    by_start = {}
    for story in train:
        by_start.setdefault(story[:40], []).append(story)
    cut_from_longer = 0
    records = read_lines(tmp_path / "cut" / "story_instruct_train.jsonl")
    for record in records:
        user, reply = (m["content"] for m in record["messages"])
        start = user.removeprefix("Continue this story: ") if record["source"].endswith("continue") else ""
        held = {}  # source story -> how many of its characters the conversation holds
        for s in by_start[(start or reply)[:40]]:
            rest = s[len(start):]
            if s.startswith(start) and rest.lstrip().startswith(reply):
                held[s] = len(s) - len(rest.lstrip()) + len(reply)
        assert held and min(held.values()) <= 500, record
        if all(n < len(s) for s, n in held.items()):  # cut: right after a sentence, before whitespace
            assert reply[-1] in '.!?"\'' and any(s[n].isspace() for s, n in held.items()), record
            cut_from_longer += 1
    words = lambda rs: sum(r["source"] == "story_instruct/words" for r in rs)  # noqa: E731
    skipped = read_lines(tmp_path / "skip" / "story_instruct_train.jsonl")
    assert cut_from_longer > 1000 and words(records) > 1.5 * words(skipped)


@pytest.mark.parametrize("extra", [[], ["--cut_chars", "300"]])
def test_a_validation_story_in_the_training_file_is_left_out(data_dir: Path, tmp_path: Path, extra: list[str]):
    val = stories(data_dir / "pretrain_tinystories_val.txt")
    leaked = [s for s in val if 400 <= len(s) <= 600][:3]  # short enough to be used, long enough to be cut
    train_file = tmp_path / "train.txt"
    train_file.write_text("\n\n".join(leaked + stories(data_dir / "pretrain_tinystories_train.txt")[:100]) + "\n", encoding="utf-8")
    prepare.main(["--train_file", str(train_file), "--out_dir", str(tmp_path / "out"), *extra])
    text = (tmp_path / "out" / "story_instruct_train.jsonl").read_text(encoding="utf-8")
    assert text.count("\n") > 50
    for story in leaked:
        assert json.dumps(story, ensure_ascii=False)[1:-1] not in text  # a words/begin reply would hold it whole
        assert json.dumps(cut_story(story, 300), ensure_ascii=False)[1:-1] not in text  # or its cut start
        for half in split_half(story):  # a continue conversation would hold its start and its rest
            assert json.dumps(half, ensure_ascii=False)[1:-1] not in text


def test_every_conversation_renders_and_its_instruction_parses_back(made: Path, tokenizer_path: Path):
    tokenizer = load_tokenizer(tokenizer_path)
    records = read_lines(made / "story_instruct_val.jsonl") + read_lines(made / "story_instruct_train.jsonl")[::10]
    for record in records:  # all held-out conversations, every 10th training one (rendering is the slow part)
        ids, mask = render(tokenizer, record["messages"])
        assert tokenizer.decode(ids, skip_special_tokens=False) == render_text(record["messages"])
        assert 0 < sum(mask) < len(ids)
        user, reply = (m["content"] for m in record["messages"])
        instruction = parse_instruction(user)
        assert instruction.kind == record["source"].split("/")[1]
        if instruction.kind == "words":
            assert len(instruction.words) == 3 and all(contains_word(reply, w) for w in instruction.words)
        if instruction.kind == "begin":
            assert reply.startswith(instruction.opening) and len(instruction.opening) < len(reply)


def test_requested_words_are_uncommon_so_ignoring_the_instruction_scores_near_zero(made: Path, data_dir: Path):
    common = common_words(word_counts(stories(data_dir / "pretrain_tinystories_train.txt")))
    assert {"the", "was", "happy", "they"} <= common and len(common) == 300
    words = [r for r in read_lines(made / "story_instruct_val.jsonl") if r["source"] == "story_instruct/words"]
    replies = [r["messages"][1]["content"] for r in words]
    requested = [parse_instruction(r["messages"][0]["content"]).words for r in words]
    assert not any(w in common for ws in requested for w in ws)
    assert words_followed(replies, requested)["all_words"] == 1.0  # each story has its own words
    contrast = words_followed(replies, shuffled(requested))  # a real story written without looking at the words
    assert contrast["all_words"] < 0.02 and contrast["words"] < 0.15


def test_word_check_is_whole_word_and_case_insensitive():
    assert contains_word("The Cat sat.", "cat") and contains_word("a CAT!", "cat") and contains_word("cat", "cat")
    assert contains_word('"Dog," said Tom.', "dog") and contains_word("the dog's ball", "dog")
    assert not contains_word("She could catch it.", "cat") and not contains_word("a bobcat", "cat")
    assert not contains_word("doggy", "dog") and not contains_word("", "dog")
    assert contains_word("a.b", "b") and not contains_word("a+b", "c")


def test_word_choice_skips_names_short_and_common_words_and_keeps_story_order():
    story = "Tom had a red ball. The ball was big. Tom gave the kite to Sue and the dog ran."
    common = frozenset({"the", "and", "was", "had"})
    assert candidate_words(story, common) == ["red", "ball", "big", "gave", "kite", "dog", "ran"]
    assert candidate_words(story, common, within=6) == ["red", "ball"]  # Tom had a red ball The
    assert candidate_words(story, common, within=9) == ["red", "ball", "big"]
    assert choose_words(story, common, 3, random.Random(0), within=6) is None
    picked = choose_words(story, common, 3, random.Random(0))
    assert len(set(picked)) == 3 and picked == [w for w in candidate_words(story, common) if w in picked]
    assert choose_words("Tom ran.", common, 3, random.Random(0)) is None
    begin = conversation("begin", story, common, 3, random.Random(0))
    assert begin[0]["content"] == "Write a story that begins with: Tom had a red ball." and begin[1]["content"] == story
    start, rest = split_half(story)
    assert start == "Tom had a red ball. The ball was big." and rest.startswith("Tom gave")


def test_requested_word_positions_are_the_reply_tokens_that_first_use_each_word(tokenizer_path: Path):
    tokenizer = load_tokenizer(tokenizer_path)
    reply = "The Cat saw a catch. A cat and a kite! Kites flew."
    messages = [{"role": "user", "content": "Write a short story that uses the words: cat, kite."},
                {"role": "assistant", "content": reply}]
    for system in (None, "You are a helpful assistant."):
        ids, mask = render(tokenizer, messages, system=system)
        positions = requested_word_positions(tokenizer, messages, system)
        assert all(mask[p] == 1 for p in positions)  # reply tokens only, never the prompt's own "cat, kite"
        runs = [[p] for p in positions[:1]]
        for p in positions[1:]:  # a word of several tokens is a run of consecutive positions
            runs[-1].append(p) if p == runs[-1][-1] + 1 else runs.append([p])
        spelled = [tokenizer.decode([ids[p] for p in run]).strip() for run in runs]
        assert spelled == ["Cat", "kite"]  # each word's first use as a whole word: not "catch", not "Kites"
    other = [{"role": "user", "content": "Write a story that begins with: A cat sat."}, {"role": "assistant", "content": reply}]
    assert requested_word_positions(tokenizer, other) == []
    assert requested_word_positions(tokenizer, messages[:1]) == []


def test_word_weight_weighs_exactly_the_first_use_of_each_requested_word(made: Path, tokenizer_path: Path):
    tokenizer = load_tokenizer(tokenizer_path)
    records = [r["messages"] for r in read_lines(made / "story_instruct_val.jsonl")[:40]]
    source = lambda: ((f"val:{i}", m) for i, m in enumerate(records))  # noqa: E731
    plain = build_sft_dataset(tokenizer, source(), 1024, system="You are a helpful assistant.")
    weighted = build_sft_dataset(tokenizer, source(), 1024, system="You are a helpful assistant.", word_weight=8.0)
    assert plain.summary() == weighted.summary() and len(plain) == len(records)
    n_weighted = 0
    for messages, ids, m, w in zip(records, plain.ids, plain.masks, weighted.masks):
        assert (w > 0).tolist() == (m > 0).tolist()  # the same assistant tokens count, some of them more
        heavy = (w == 8.0).nonzero()[0]
        n_weighted += len(heavy)
        instruction = parse_instruction(messages[0]["content"])
        if instruction.kind != "words":
            assert len(heavy) == 0
            continue
        runs = np.split(heavy, np.flatnonzero(np.diff(heavy) > 1) + 1)  # a word of several tokens is one run
        spelled = [w for run in runs for w in re.findall("[A-Za-z]+", tokenizer.decode(ids[run].tolist()))]
        used = [w for w in re.findall("[A-Za-z]+", messages[1]["content"]) if w.lower() in instruction.words]
        firsts = [w for i, w in enumerate(used) if w.lower() not in {u.lower() for u in used[:i]}]
        assert spelled == firsts and len(firsts) == 3  # each requested word's first use, in order, nothing else
    assert n_weighted > 0


def test_scores_on_hand_made_replies():
    replies = ["The dog found a ball. The dog, the dogs.", "A cat ran to the catch.", "Nothing here.", "Ball, DOG, happy!"]
    words = [("dog", "ball"), ("cat", "catch"), ("dog", "sun"), ("happy", "sun")]
    assert words_followed(replies, words) == {"all_words": 2 / 4, "words": 5 / 8, "uses_per_word": 6 / 8}  # "dogs" is no use
    assert shuffled(words) == [words[1], words[2], words[3], words[0]]
    assert words_followed(replies, shuffled(words)) == {"all_words": 1 / 4, "words": 2 / 8, "uses_per_word": 2 / 8}  # only reply 3 fits words 0
    assert openings_followed([" Once upon a time.", "Once upon", "Hi."], ["Once upon a time.", "Once upon a time.", "Hi."]) == 2 / 3
    with pytest.raises(ValueError):
        words_followed(replies, words[:2])
    with pytest.raises(ValueError):
        shuffled(["only one"])


def test_sft_summary_scores_instructions_for_the_model_the_base_and_shuffled_words(base_checkpoint, data_dir, tmp_path):
    import sft_train

    data = tmp_path / "data"
    prepare.main(["--out_dir", str(data), "--max_chars", "350"])  # the few short stories: the fixture's context is 128
    out = tmp_path / "sft"
    sft_train.main([
        "--init", str(base_checkpoint), "--out_dir", str(out), "--log_dir", str(tmp_path / "runs"),
        "--train_file", str(data / "story_instruct_train.jsonl"), "--val_file", str(data / "story_instruct_val.jsonl"),
        "--max_steps", "20", "--batch_size", "8", "--eval_interval", "20", "--ckpt_interval", "20",
        "--val_conversations", "32", "--eval_samples", "0", "--instruct_eval", "4", "--system", "", "--device", "cpu",
        "--word_weight", "5", "--word_unlikelihood", "1", "--instruct_no_repeat_ngram", "3",
    ])
    meta = json.loads((out / "meta.json").read_text())
    assert meta["args"]["word_weight"] == 5.0 and meta["args"]["word_unlikelihood"] == 1.0
    report = meta["summary"]["instruct"]
    kinds = [r["source"] for r in read_lines(data / "story_instruct_val.jsonl")]
    assert report["n_words"] == 4 and report["n_begin"] == min(4, kinds.count("story_instruct/begin")) > 0
    assert report["no_repeat_ngram"] == 3 and report_line(report).startswith("instructions (greedy, no repeated 3-grams): ")
    for who in ("sft", "base"):
        assert set(report[who]) == {"all_words", "words", "uses_per_word", "opening", "im_end"}
        assert 0 <= report[who]["all_words"] <= 1 and round(report[who]["all_words"] * 4) == report[who]["all_words"] * 4
    assert report["base"]["im_end"] == 0.0  # the base model never saw the chat template
    first_words = next(r for r in read_lines(data / "story_instruct_val.jsonl") if r["source"] == "story_instruct/words")
    assert report["examples"][0]["user"] == first_words["messages"][0]["content"]
    assert set(report["sft_shuffled_words"]) == {"all_words", "words", "uses_per_word"}

    # The report card shows the same numbers (speedrun.sh writes it from evaluate.py's JSON, which holds meta.json).
    card = render_report([{"checkpoint": str(out), "model": {"stage": "sft", "parameters": 1e6, "max_seq_len": 128},
                           "meta": meta, "machine": machine_info()}])
    sft, base, other = report["sft"], report["base"], report["sft_shuffled_words"]
    assert (f"| story instructions: replies using every requested word (4 held out) | **{sft['all_words']:.0%}** "
            f"(base {base['all_words']:.0%}, another instruction's words {other['all_words']:.0%}) |") in card
    assert f"| story instructions: replies ending with `<|im_end|>` | **{sft['im_end']:.0%}** (base 0%) |" in card
    assert f"| story instructions: uses of a requested word per reply | {sft['uses_per_word']:.1f} (base {base['uses_per_word']:.1f}) |" in card
    assert f"opening ({report['n_begin']} held out) | {sft['opening']:.0%} (base {base['opening']:.0%}) |" in card
    assert "| story instructions: decoding | greedy, no repeated 3-grams in a reply |" in card


def test_missing_input_exits_2_with_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        prepare.main(["--train_file", str(tmp_path / "nope.txt"), "--out_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("prepare_story_instructions.py: error:") and "nope.txt" in err
    assert "\n" not in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag", ["--cut_chars", "--words_within", "--words_draws"])
def test_a_count_below_one_exits_2_with_one_line(flag: str, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        prepare.main(["--out_dir", str(tmp_path / "out"), flag, "0"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err == f"prepare_story_instructions.py: error: {flag} must be positive, got 0"
    assert not (tmp_path / "out").exists()
