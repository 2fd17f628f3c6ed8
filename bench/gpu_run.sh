#!/usr/bin/env bash
# The GPU run behind the figures in the README (an H100/H200 lent through the device tool).
# Usage there: bash bench/gpu_run.sh GGUF_PATH OUT_DIR
# Runs the sanity mode, then one epoch of LoRA r=8 on all of MedQuAD in bf16 autocast with
# validation on the whole held-out split (step 0 = the base model), and packs the run folder.
set -uo pipefail
M=$1; OUT=$2
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout 240 python3 train.py --sanity --device cuda --model "$M" --data data/medquad/medquad.parquet \
  --out /tmp/sanity > "$OUT/sanity.log" 2>&1; echo "sanity exit $?"; tail -4 "$OUT/sanity.log"
timeout "${TRAIN_TIMEOUT:-420}" python3 train.py --rank 8 --device cuda --dtype bfloat16 --model "$M" \
  --data data/medquad/medquad.parquet --batch-size 16 --epochs 1 --lr 2e-4 --eval-every 150 --val-rows 5000 \
  --save-every 150 --patience 3 --out runs/gpu-r8 > "$OUT/train.log" 2>&1; echo "train exit $?"
tail -12 "$OUT/train.log"
tar czf "$OUT/gpu-r8.tgz" -C runs gpu-r8/config.json gpu-r8/split.json gpu-r8/metrics.jsonl gpu-r8/summary.json \
  gpu-r8/loss.png gpu-r8/best_adapter 2>/dev/null; ls -la "$OUT"
