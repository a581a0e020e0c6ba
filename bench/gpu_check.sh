#!/usr/bin/env bash
# The GPU path end to end on one GPU, in under 8 minutes; prints a markdown table for README's GPU section.
#
#   bash bench/gpu_check.sh                  # cuda: the base preset, bf16, --compile, a --resume half-way
#   bash bench/gpu_check.sh --device cpu     # the dry run CI runs: the same steps at tiny sizes (~1 min)
#   options: --data DIR (pretrain_tinystories_{train,val}.txt; default: ../shared/data), --out DIR (default: a
#            fresh temporary folder; the table is also written to DIR/gpu_check.md); BATCH=16 bash ... for a
#            GPU with less than ~40 GB (the default micro-batch is 32 x 1024 tokens)
#
# Steps: a tokenizer and token shards from the TinyStories text, pretrain.py to the middle, pretrain.py --resume
# to the end (tokens/s, MFU and peak memory from its metrics.csv, training steps only), then bench/gpu_check.py:
# host syncs per step, bf16 vs fp32 rotary drift at long positions, the SDPA kernels prefill and decoding use.
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=cuda
DATA=../shared/data
OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE=$2; shift 2 ;;
    --data) DATA=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    -h|--help) sed -n 2,12p "$0"; exit 0 ;;
    *) echo "gpu_check.sh: error: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
for f in pretrain_tinystories_train.txt pretrain_tinystories_val.txt; do
  [ -f "$DATA/$f" ] || { echo "gpu_check.sh: error: $DATA/$f not found; pass --data DIR" >&2; exit 2; }
done
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 MPLBACKEND=Agg
PY=${PYTHON:-python}

if [ "$DEVICE" = cpu ]; then  # tiny: the dry run proves every step runs, its numbers mean nothing
  CHARS=300000; VOCAB=512; HALF=10; FULL=20; LOG=5
  MODEL=(--preset tiny --dim 32 --n_layers 2 --n_heads 2 --n_kv_heads 1 --max_seq_len 128 --batch_size 4 --dtype bf16)
  EXTRA=()  # torch.compile on a 2-core CPU takes longer than the whole dry run
else
  CHARS=0; VOCAB=8192; HALF=150; FULL=300; LOG=25
  MODEL=(--preset base --batch_size "${BATCH:-32}" --grad_accum 1 --dtype bf16)
  EXTRA=(--compile)
fi

TRAIN="$DATA/pretrain_tinystories_train.txt"
VAL="$DATA/pretrain_tinystories_val.txt"
if [ "$CHARS" -gt 0 ]; then  # a slice, cut at a document boundary
  "$PY" - "$TRAIN" "$VAL" "$OUT" "$CHARS" <<'PYEOF'
import sys
from pathlib import Path
for source, name in ((sys.argv[1], "train.txt"), (sys.argv[2], "val.txt")):
    text = Path(source).read_text(encoding="utf-8")[: int(sys.argv[4])]
    Path(sys.argv[3], name).write_text(text[: text.rfind("\n\n")], encoding="utf-8")
PYEOF
  TRAIN="$OUT/train.txt"; VAL="$OUT/val.txt"
fi

start=$(date +%s)
echo "== tokenizer and shards -> $OUT" >&2
"$PY" train_custom_tokenizer.py "$TRAIN" --val_file "$VAL" --vocab_size "$VOCAB" --output "$OUT/tokenizer.json" >&2
"$PY" data/prepare_pretrain.py "$TRAIN" --val_file "$VAL" --tokenizer "$OUT/tokenizer.json" --out_dir "$OUT/shards" >&2

COMMON=(--data_dir "$OUT/shards" --out_dir "$OUT/ckpt" --log_dir "$OUT/runs" --device "$DEVICE" "${MODEL[@]}" "${EXTRA[@]}"
        --warmup_steps 20 --eval_batches 4 --log_interval "$LOG" --eval_interval "$HALF" --ckpt_interval "$HALF")
echo "== pretrain.py to step $HALF" >&2
"$PY" pretrain.py "${COMMON[@]}" --max_steps "$HALF" >&2
echo "== pretrain.py --resume to step $FULL" >&2
"$PY" pretrain.py "${COMMON[@]}" --max_steps "$FULL" --resume >&2

echo "== syncs, rotary drift, attention kernels" >&2
"$PY" bench/gpu_check.py --checkpoint "$OUT/ckpt" --runs "$OUT/runs" --shards "$OUT/shards" --device "$DEVICE" \
  --resumed_at "$HALF" --command "pretrain.py ${MODEL[*]} ${EXTRA[*]}" --out "$OUT/gpu_check.md"
echo "| wall time of this check | $(( $(date +%s) - start )) s |" | tee -a "$OUT/gpu_check.md"
