#!/usr/bin/env bash
# The CPU recipe sweep (issue #10): equal budgets (60 steps x 8 rows, answers trimmed to fit
# 320 tokens, the default safety mix), one factor changed at a time from rank 8 / all 7 projections
# / lr 2e-4. Run folders go to runs/sweep/; `python -m medlora.compare runs/sweep/*` makes the table.
set -euo pipefail
cd "$(dirname "$0")/../.."
common=(--max-seq-len 320 --long-rows truncate --batch-size 8 --max-steps 60 --warmup-steps 6
        --eval-every 30 --val-rows 96 --save-every 1000 --patience 0)
run() { name=$1; shift; [ -f runs/sweep/$name/summary.json ] || python train.py "${common[@]}" --out runs/sweep/$name "$@"; }
run r8-all-lr2e-4   --rank 8
run r8-all-lr5e-4   --rank 8 --lr 5e-4
run r8-attn-lr2e-4  --rank 8 --targets attention
run r4-all-lr2e-4   --rank 4
run r16-all-lr2e-4  --rank 16
run r8-all-lr1e-3   --rank 8 --lr 1e-3
run r8-all-lr2e-4-dropout0.05 --rank 8 --dropout 0.05   # issue #7: is dropout 0 (the default, 24% faster) as good?
