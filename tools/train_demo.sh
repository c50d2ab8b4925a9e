#!/usr/bin/env bash
# Trains the small PaliGemma of models/demo-init from scratch on synthetic shapes into
# models/demo, the model behind `--model demo`:
#   tools/train_demo.sh [WORK_DIR]     (default: bench-cache/demo; about an hour on 2 cores)
# Each phase is resumable: run the script again after an interruption and it goes on.
#
# Why phases: trained on the whole mixture from the start, a model this small learns the text
# prior (counts of 0, empty detections, the commonest caption) and never starts to read the
# image; the many hard location tokens also drown the weak early signal of the image. So it
#   1. looks: captions, "how many shapes" and colour questions only (no boxes), until colours
#      and counts come from the image;
#   2. locates: every task, but per-kind questions only about kinds that are present;
#   3. learns absence: the full mixture, with "0" counts and empty detections, at a lower rate.
# Data seed 1 for training; seed 3 is the held-out set of README's figures
# (`paligemma eval-shapes --model demo`), never trained on.
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-bench-cache/demo}
bin=target/release/paligemma
cargo build --release --locked
mkdir -p "$work"
[ -f "$work/train/meta.json" ] || $bin shapes --out "$work/train" --n 6000 --seed 1 --size 112
[ -f "$work/train-present/meta.json" ] ||
  $bin shapes --out "$work/train-present" --n 6000 --seed 1 --size 112 --present-only
# Phase 1's data: the present-only lines without detections and without per-kind counts
# (scene order kept, so the file and hence the run are the same everywhere).
grep -v '"prefix":"detect' "$work/train-present/train.jsonl" |
  grep -v 'how many \(circle\|square\|triangle\|star\|hexagon\)s are' > "$work/train-present/look.jsonl"

# phase NAME FROM DATA STEPS LR WARMUP: one `train --train all` run into $work/NAME, resumed
# if it was interrupted, skipped when finished. FROM is `init` (random start) or a phase.
phase() {
  local name=$1 from=$2 data=$3 steps=$4 lr=$5 warmup=$6 start=(--model "$work/$2")
  [ "$from" = init ] && start=(--init models/demo-init)
  local out="$work/$name" resume=()
  if [ -f "$out/trainer_state.json" ]; then
    grep -q "\"step\": $steps," "$out/trainer_state.json" && return 0
    resume=(--resume)
  fi
  $bin train "${start[@]}" --data "$data" --out "$out" --train all --steps "$steps" \
    --batch-size 16 --lr "$lr" --warmup "$warmup" --seed 0 --save-every 100 --log-every 10 \
    "${resume[@]}"
}
phase look init "$work/train-present/look.jsonl" 1000 1e-3 30
phase locate look "$work/train-present/train.jsonl" 1500 5e-4 50
phase absent locate "$work/train/train.jsonl" 600 3e-4 50

# The committed model: weights, configuration, tokenizer and the last phase's training log (no
# optimizer state).
mkdir -p models/demo
for f in model.safetensors config.json tokenizer.json tokenizer_config.json \
         preprocessor_config.json generation_config.json; do
  cp "$work/absent/$f" models/demo/
done
cat "$work"/{look,locate,absent}/log.jsonl > models/demo/log.jsonl
echo "models/demo updated"
