#!/usr/bin/env bash
# The GPU recipe runs behind docs/recipe (issue #10), on one lent GPU (H100/H200) in one call.
# Usage there: bash bench/gpu_recipe.sh GGUF_PATH OUT_DIR      (SMALL=1 DEV=cpu: a smoke run on a CPU)
# Two full epochs side by side, the same seed-0 grouped split, answers trimmed to fit 320 tokens,
# the default safety mix at weight 2, LoRA r=8 on all 7 projections, bf16 autocast:
#   rA: + the general replay file (base-model answers to everyday prompts) at weight 3
#   rB: without it
# then eval.py (base vs tuned, greedy, 512 new tokens) on both, and on rA with two anti-loop
# generation settings (no-repeat 4-gram; repetition penalty 1.1). Run folders are packed into OUT.
set -uo pipefail
M=$1; OUT=$2; DEV=${DEV:-cuda}
export PYTHONUNBUFFERED=1
if [ "${SMALL:-0}" = 1 ]; then
  LIM="--limit-rows 80 --max-steps 3 --eval-every 2 --val-rows 8"
  EVL="--limit 3 --loss-rows 8 --general-limit 2 --medical-limit 2 --safety-limit 3 --max-new-tokens 8 --batch-size 4 --review-size 2"
else
  LIM="--eval-every 200 --val-rows 800"
  EVL="--limit 100 --loss-rows 2000 --max-new-tokens 512 --batch-size 64"
fi
COMMON="--rank 8 --device $DEV --model $M --data data/medquad/medquad.parquet --max-seq-len 320 --long-rows truncate
  --safety-weight 2 --batch-size 16 --epochs 1 --lr 2e-4 --save-every 100000 --patience 0 $LIM"
[ "$DEV" = cuda ] && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
train() { n=$1; shift; timeout "${TT:-280}" python3 train.py $COMMON --out runs/$n "$@" > "$OUT/train-$n.log" 2>&1
          echo "train $n exit $? $(date +%T)"; }
evaluate() { n=$1; a=$2; shift 2; timeout "${TE:-220}" python3 eval.py --adapter runs/$a/best_adapter --run runs/$a \
               --model "$M" --device $DEV $EVL --out runs/$a/$n "$@" > "$OUT/eval-$a-$n.log" 2>&1
             echo "eval $a/$n exit $? $(date +%T)"; grep -A3 "== eval summary" "$OUT/eval-$a-$n.log"; }
date +%T
train rA --extra-data data/general_replay.jsonl --extra-weight 3 &
train rB &
wait
evaluate eval rA &
evaluate eval rB &
evaluate eval-nrng4 rA --no-repeat-ngram 4 &
evaluate eval-rp1.1 rA --repetition-penalty 1.1 &
wait
for n in rA rB; do
  tar czf "$OUT/$n.tgz" -C runs $n/config.json $n/split.json $n/metrics.jsonl $n/summary.json $n/loss.png \
    $n/best_adapter $(cd runs && ls -d $n/eval* 2>/dev/null) 2>/dev/null
done
tar czf "$OUT/logs.tgz" -C "$OUT" $(cd "$OUT" && ls *.log); rm -f "$OUT"/*.log
ls -la "$OUT"; date +%T
