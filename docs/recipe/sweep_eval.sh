#!/usr/bin/env bash
# Evaluate the sweep cells of sweep.sh (issue #10) at a CPU-sized budget: 40 held-out questions,
# 400 held-out rows for perplexity, 24 general prompts, 48 safety probes (harmful and benign
# categories interleaved), 256 new tokens, serve decoding, bf16. The base side is generated once
# and reused for every cell (--base-cache: the key covers weights, decoding and the exact inputs).
set -euo pipefail
cd "$(dirname "$0")/../.."
for run in runs/sweep/*/; do
  run=${run%/}
  [ -f $run/summary.json ] && [ ! -f $run/eval/report.json ] || continue
  python eval.py --adapter $run/best_adapter --dtype bfloat16 --only heldout,general,safety --limit 40 \
    --loss-rows 400 --general-limit 24 --safety-limit 48 --max-new-tokens 256 --review-size 0 \
    --batch-size 8 --base-cache runs/sweep/base-cache
done
python -m medlora.compare $(dirname runs/sweep/*/summary.json)
