#!/usr/bin/env bash
# The engine's GPU suite: GPU tests, the engine benchmark (compiled decode, with the HF
# baseline), and the same without torch.compile for comparison.
# Usage (repo root, CUDA machine): OUT=/some/dir tools/gpu_engine_suite.sh [stages...]
# Stages: tests bench bench_eager bench_eager_prefill bench_unpadded_prefill bench_no_gemv
# micro_gemv micro_mixed mixed_steps profile (default: tests bench bench_eager profile). Results land in $OUT.
# BENCH_ARGS: more engine_bench flags for every bench stage (e.g. "--baseline-batches none" to
# skip HF's baseline).
set -u
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
stages=${*:-tests bench bench_eager profile}
python3 -c 'import torch, transformers, triton; print(torch.__version__, transformers.__version__, triton.__version__, torch.cuda.get_device_name())'
for s in $stages; do
  echo "=== $s"
  case $s in
    tests) timeout 300 python3 -m pytest tests/engine -q -m gpu -rA --show-capture=no 2>&1 | tee "$OUT/gpu_tests.log" ;;
    bench) timeout 420 python3 -m dynabatch.bench.engine_bench ${BENCH_ARGS:-} --json "$OUT/engine_h200.json" 2>&1 | tee "$OUT/engine_h200.log" ;;
    bench_eager) timeout 420 python3 -m dynabatch.bench.engine_bench --eager-decode --baseline-batches none \
        ${BENCH_ARGS:-} --json "$OUT/engine_h200_eager.json" 2>&1 | tee "$OUT/engine_h200_eager.log" ;;
    bench_eager_prefill) timeout 420 python3 -m dynabatch.bench.engine_bench --eager-prefill --baseline-batches none \
        ${BENCH_ARGS:-} --json "$OUT/engine_h200_eager_prefill.json" 2>&1 | tee "$OUT/engine_h200_eager_prefill.log" ;;
    bench_unpadded_prefill) timeout 420 python3 -m dynabatch.bench.engine_bench --no-prefill-graphs --baseline-batches none \
        ${BENCH_ARGS:-} --json "$OUT/engine_h200_unpadded_prefill.json" 2>&1 | tee "$OUT/engine_h200_unpadded_prefill.log" ;;
    bench_no_gemv) timeout 420 python3 -m dynabatch.bench.engine_bench --no-gemv --baseline-batches none \
        ${BENCH_ARGS:-} --json "$OUT/engine_h200_no_gemv.json" 2>&1 | tee "$OUT/engine_h200_no_gemv.log" ;;
    micro_gemv) timeout 300 python3 tools/micro_gemv.py --json "$OUT/micro_gemv.json" 2>&1 | tee "$OUT/micro_gemv.log" ;;
    micro_mixed) timeout 200 python3 tools/micro_mixed_attention.py --json "$OUT/micro_mixed_attention.json" \
        2>&1 | tee "$OUT/micro_mixed_attention.log" ;;
    mixed_steps) timeout 300 python3 tools/mixed_step_time.py --json "$OUT/mixed_step_time.json" \
        2>&1 | tee "$OUT/mixed_step_time.log" ;;
    profile) timeout 300 python3 tools/profile_decode.py --model llama-3.2-1b-shape --batches 1,64 \
        --out "$OUT/profile" 2>&1 | tee "$OUT/profile_decode.log" ;;
  esac
done
