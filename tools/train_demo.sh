#!/usr/bin/env bash
# Trains the small PaliGemma of models/demo-init from scratch on synthetic shapes into
# models/demo (work in progress: runs of this length have not yet learned to read the image;
# see README, "Training from scratch"):
#   tools/train_demo.sh [WORK_DIR]     (default: bench-cache/demo; about 35 minutes on 2 cores)
# Data seeds: 1 for training, 2 for the evaluation loss logged while training; seed 3 is the
# held-out set of README's figures (`paligemma eval-shapes --model demo`), never trained on.
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-bench-cache/demo}
bin=target/release/paligemma
cargo build --release --locked
mkdir -p "$work"
[ -f "$work/train/meta.json" ] || $bin shapes --out "$work/train" --n 6000 --seed 1 --size 112
[ -f "$work/eval/meta.json" ] || $bin shapes --out "$work/eval" --n 20 --seed 2 --size 112
resume=()
[ -f "$work/run/trainer_state.json" ] && resume=(--resume)
$bin train --init models/demo-init --data "$work/train/train.jsonl" --eval "$work/eval/train.jsonl" \
  --out "$work/run" --train all --steps 2000 --batch-size 16 --lr 1e-3 --warmup 100 --seed 0 \
  --eval-every 250 --save-every 250 --log-every 10 "${resume[@]}"
# The committed model: weights, configuration, tokenizer and the training log (no optimizer
# state).
mkdir -p models/demo
for f in model.safetensors config.json tokenizer.json tokenizer_config.json \
         preprocessor_config.json generation_config.json log.jsonl; do
  cp "$work/run/$f" models/demo/
done
echo "models/demo updated"
