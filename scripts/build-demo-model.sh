#!/usr/bin/env bash
# Rebuild the shipped demo model from nothing: synthetic scenes, training from scratch, held-out scores.
# About 45 minutes on 2 CPU cores. Usage: bash scripts/build-demo-model.sh [WORK_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-runs/demo}

kosmos-serve data shapes --n 3000 --seed 1 --out "$work/train"
kosmos-serve data shapes --n 200 --seed 2 --out "$work/held-out"   # a seed never used in training
kosmos-serve train --model scratch --data "$work/train/records.jsonl" --eval-data "$work/held-out/records.jsonl" \
    --out "$work/run" --steps 5000 --batch-size 16 --learning-rate 2e-3 --warmup-steps 100 \
    --freeze-vision-steps 3000 --checkpoint-every 500

rm -rf src/kosmos_serve/models/demo
mkdir -p src/kosmos_serve/models
cp -r "$work/run/final" src/kosmos_serve/models/demo
echo "demo model written to src/kosmos_serve/models/demo"
