#!/usr/bin/env bash
# GPU evaluation behind the README's eval figures: base vs the MedQuAD adapter, then a short safety
# pass (MedQuAD rows + data/safety_sft.jsonl, starting from that adapter) and base vs the result.
# Usage there: bash bench/gpu_eval.sh GGUF_PATH OUT_DIR
set -uo pipefail
M=$1; OUT=$2; A=docs/runs/gpu-r8-epoch1/best_adapter; RUN=docs/runs/gpu-r8-epoch1
export PYTHONUNBUFFERED=1
EV="--model $M --device cuda --run $RUN --limit 100 --loss-rows 2000 --max-new-tokens 256 --batch-size 64"
timeout "${T1:-170}" python3 eval.py --adapter $A $EV --out /tmp/ev_r8 > "$OUT/eval_r8.log" 2>&1; echo "eval r8 exit $?"
grep -A4 "== eval summary" "$OUT/eval_r8.log"
timeout "${T2:-90}" python3 train.py --init-adapter $A --model "$M" --device cuda --data data/medquad/medquad.parquet \
  --limit-rows 1200 --extra-data data/safety_sft.jsonl --extra-weight 1 --epochs 1 --batch-size 16 --lr 1e-4 \
  --warmup-steps 5 --eval-every 40 --val-rows 120 --out /tmp/gpu-safety > "$OUT/train_safety.log" 2>&1; echo "safety train exit $?"
tail -6 "$OUT/train_safety.log"
timeout "${T3:-170}" python3 eval.py --adapter /tmp/gpu-safety/adapter $EV --out /tmp/ev_safe > "$OUT/eval_safe.log" 2>&1; echo "eval safe exit $?"
grep -A4 "== eval summary" "$OUT/eval_safe.log"
tar czf "$OUT/results.tgz" -C /tmp ev_r8 ev_safe gpu-safety/config.json gpu-safety/metrics.jsonl gpu-safety/summary.json \
  gpu-safety/loss.png gpu-safety/split.json gpu-safety/adapter 2>/dev/null; ls -la "$OUT"
