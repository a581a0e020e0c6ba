#!/usr/bin/env bash
# The whole pipeline on a CPU, end to end: tokenizer -> token shards -> pretraining (cpu preset) -> SFT on
# instructions made from the stories -> chat
# -> evaluation -> a report card (OUT_DIR/report.md).
#
#   bash speedrun.sh                      # data from ../shared/data, everything written under speedrun/
#   bash speedrun.sh /path/to/data out/   # DATA_DIR holding pretrain_tinystories_{train,val}.txt, chat_{train,val}.jsonl
#
# Extra flags for the training stages can be passed through PRETRAIN_ARGS and SFT_ARGS (and for
# data/prepare_story_instructions.py through INSTRUCT_ARGS for the held-out set and the pretraining mix, and
# SFT_DATA_ARGS for the SFT training set), e.g.
#   PRETRAIN_ARGS="--max_steps 1500" bash speedrun.sh
# EVAL_LIMIT (default 500) is how many items of each multiple-choice set are scored.
# A run never replaces the checkpoints of an earlier one in OUT_DIR: remove the folder, or pass
#   PRETRAIN_ARGS=--overwrite SFT_ARGS=--overwrite
# On GPUs with Hugging Face data the same stages read (see README, "Speedrun and results"):
#   python data/prepare_pretrain.py --dataset roneneldan/TinyStories --val_split validation --tokenizer tokenizer.json
#   torchrun --standalone --nproc_per_node=2 pretrain.py --preset base
#   torchrun --standalone --nproc_per_node=2 sft_train.py --init checkpoints/base --dataset HuggingFaceTB/smoltalk --dataset_config all
set -euo pipefail
case ${1:-} in
  -h|--help) sed -n '2,/^set -euo/{s/^# \{0,1\}//p}' "$0" | grep -v '^set -euo'; exit 0 ;;
  -*) echo "speedrun.sh: error: unknown option $1 (usage: bash speedrun.sh [DATA_DIR [OUT_DIR]]; see --help)" >&2; exit 2 ;;
esac
cd "$(dirname "$0")"

DATA_DIR=${1:-${LILLM_DATA_DIR:-../shared/data}}
OUT=${2:-speedrun}
PYTHON=${PYTHON:-python}
for f in pretrain_tinystories_train.txt pretrain_tinystories_val.txt chat_train.jsonl chat_val.jsonl \
         eval_hellaswag_val.jsonl eval_arc_easy_test.jsonl eval_arc_challenge_test.jsonl; do
  [ -f "$DATA_DIR/$f" ] || { echo "speedrun.sh: error: $DATA_DIR/$f not found (usage: bash speedrun.sh DATA_DIR [OUT_DIR])" >&2; exit 2; }
done
mkdir -p "$OUT"
: > "$OUT/stage_times.tsv"  # NAME<TAB>SECONDS per stage, read by the report card
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} HF_DATASETS_OFFLINE=${HF_DATASETS_OFFLINE:-1} MPLBACKEND=Agg

declare -a TIMES=()
stage() {  # stage NAME COMMAND...: run it, time it, remember the time
  local name=$1; shift
  echo; echo "=== $name"
  local start=$SECONDS
  "$@"
  TIMES+=("$name: $((SECONDS - start)) s")
  printf "%s\t%s\n" "$name" "$((SECONDS - start))" >> "$OUT/stage_times.tsv"
}

# bf16 autocast where the CPU has native bf16 (AVX512-BF16 or AMX): faster here; emulated bf16 elsewhere is slower.
# Native bf16 also buys steps: 4,500 fit the 10 minutes there (README, "A faster CPU recipe"); fp32 keeps the preset's 2,500.
DTYPE=fp32; STEPS=""; grep -qsE 'avx512_bf16|amx_bf16' /proc/cpuinfo && { DTYPE=bf16; STEPS="--max_steps 4500"; }
# Held-out instructions and the pretraining mix: requested words from each story's first 20 words, three draws per
# training story. The SFT training set is wider: words from the first 40 words, five draws, and the long training
# stories cut after a sentence (--cut_chars), so it holds four times the distinct stories (README, "Story instructions").
INSTRUCT_ARGS=${INSTRUCT_ARGS:-"--words_within 20 --words_draws 3"}
SFT_DATA_ARGS=${SFT_DATA_ARGS:-"--words_within 40 --words_draws 5 --cut_chars 650"}
# The instruction score decodes greedily without repeating a trigram of the reply, as the chat stage does (README,
# "Decoding without loops").
SFT_RECIPE="--max_steps 2400 --batch_size 16 --lr 3e-3 --min_lr 3e-4 --warmup_steps 30 --word_weight 30 --instruct_no_repeat_ngram 3"
stage "1. tokenizer (2048 tokens, TinyStories)" \
  $PYTHON train_custom_tokenizer.py "$DATA_DIR/pretrain_tinystories_train.txt" \
    --vocab_size 2048 --val_file "$DATA_DIR/pretrain_tinystories_val.txt" --output "$OUT/tokenizer.json"
# shellcheck disable=SC2086
stage "2. story instructions (chat data made from the stories)" \
  $PYTHON data/prepare_story_instructions.py --train_file "$DATA_DIR/pretrain_tinystories_train.txt" \
    --val_file "$DATA_DIR/pretrain_tinystories_val.txt" --out_dir "$OUT/story_instruct" $INSTRUCT_ARGS
# shellcheck disable=SC2086
stage "2b. story instructions for SFT (wider word window, long stories cut)" \
  $PYTHON data/prepare_story_instructions.py --train_file "$DATA_DIR/pretrain_tinystories_train.txt" \
    --val_file "$DATA_DIR/pretrain_tinystories_val.txt" --out_dir "$OUT/story_instruct_sft" $SFT_DATA_ARGS
# Pretraining reads the stories and, as plain text ("instruction" newline "story"), the training instructions made
# from them (TinyStories-Instruct's recipe); SFT then weighs each requested word's first use 30x (--word_weight),
# which is what makes the model copy (README, "Story instructions"). Validation is the plain held-out stories.
stage "3. token shards (stories + story instructions as text)" \
  $PYTHON data/prepare_pretrain.py "$DATA_DIR/pretrain_tinystories_train.txt" "$OUT/story_instruct/story_instruct_train.jsonl" \
    --val_file "$DATA_DIR/pretrain_tinystories_val.txt" --tokenizer "$OUT/tokenizer.json" --out_dir "$OUT/shards"
# shellcheck disable=SC2086
stage "4. pretraining (cpu preset, $DTYPE)" \
  $PYTHON pretrain.py --preset cpu --dtype $DTYPE --data_dir "$OUT/shards" --out_dir "$OUT/base" --log_dir "$OUT/runs/base" $STEPS ${PRETRAIN_ARGS:-}
# The general chat data (HH-RLHF, OASST1) is for real models and GPUs; to use it here anyway:
#   SFT_ARGS="--train_file $DATA_DIR/chat_train.jsonl --val_file $DATA_DIR/chat_val.jsonl"
# shellcheck disable=SC2086
stage "5. supervised fine-tuning (story instructions)" \
  $PYTHON sft_train.py --init "$OUT/base" --train_file "$OUT/story_instruct_sft/story_instruct_train.jsonl" \
    --val_file "$OUT/story_instruct/story_instruct_val.jsonl" --dtype $DTYPE $SFT_RECIPE \
    --out_dir "$OUT/sft" --log_dir "$OUT/runs/sft" ${SFT_ARGS:-}
stage "6. a chat exchange" \
  $PYTHON inference.py --checkpoint "$OUT/sft" --chat --temperature 0 --no_repeat_ngram 3 --max_new_tokens 250 \
    <<< "Write a short story that uses the words: kite, rain, bread."
EVAL=(--data_dir "$DATA_DIR" --tasks hellaswag,arc_easy,arc_challenge --limit "${EVAL_LIMIT:-500}" --samples)
stage "7. evaluation: base model (multiple choice, bits/byte, story samples)" \
  $PYTHON evaluate.py --checkpoint "$OUT/base" "${EVAL[@]}" --bpb "$DATA_DIR/pretrain_tinystories_val.txt" --out "$OUT/eval_base.json"
stage "8. evaluation: SFT model (multiple choice, chat samples)" \
  $PYTHON evaluate.py --checkpoint "$OUT/sft" "${EVAL[@]}" --out "$OUT/eval_sft.json"

echo; echo "=== summary"
printf "%s\n" "${TIMES[@]}" "total: $SECONDS s"
$PYTHON - "$OUT" <<'EOF'
import json, sys
out = sys.argv[1]
base = json.load(open(f"{out}/base/meta.json"))["metrics"]
sft = json.load(open(f"{out}/sft/meta.json"))["summary"]
print(f"pretraining: validation loss {base['val_loss']:.4f} nats/token, {base['val_bpb']:.4f} bits/byte")
print(f"SFT: held-out assistant loss {sft['val_loss_before']:.4f} -> {sft['val_loss']:.4f}")
print(f"SFT: replies ending with <|im_end|>: {sft['im_end_rate']:.0%}")
if "instruct" in sft:
    from lillm.instruct import report_line
    print("SFT: " + report_line(sft["instruct"]))
EOF
$PYTHON report.py "$OUT/eval_base.json" "$OUT/eval_sft.json" --stage_times "$OUT/stage_times.tsv" \
  --out "$OUT/report.md" --title "lillm speedrun report card"
