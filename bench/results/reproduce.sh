#!/usr/bin/env bash
# Regenerates every SIMULATED result in bench/results/ exactly as committed (run from the
# repository root):   bench/results/reproduce.sh [AZURE_CSV] [JOBS]
# Environment: SKIP_SPEED=1, SKIP_ABLATION=1, ONLY=<setting name> to run less.
set -euo pipefail
TRACE=${1:-/work/shared/workloads/azure_llm_conv_2023.csv}
JOBS=${2:-2}
export DYNABATCH_AZURE_TRACE="$TRACE"
ALL=naive,fcfs,dynamic,static,multibin,latency,throughput,coalescing,adaptive
SEEDS=naive,fcfs,dynamic,static,multibin
SLA=(--ttft-ms 2000 --tpot-ms 50 --max-tokens 2048)

if [[ "${SKIP_SPEED:-0}" != 1 ]]; then   # one process, one core: run it on an idle machine
  python -m dynabatch.bench.commands simulate --speed --speed-n 100000 --out bench/results/sim_speed.json
fi

report() {  # NAME, then the report arguments
  local name=$1; shift
  [[ -n "${ONLY:-}" && "$ONLY" != "$name" ]] && return 0
  local args=("$@" "${SLA[@]}" --out "bench/results/azure_$name")
  python -m dynabatch.bench.commands report --trace "$TRACE" "${args[@]}" --jobs "$JOBS" \
    --command-line "dynabatch bench report --trace azure_llm_conv_2023.csv ${args[*]}" \
    > "bench/results/azure_$name.log" 2>&1
  echo "wrote bench/results/azure_$name"
}
# Derived latency models (dynabatch/bench/models/*.json), whole trace, every policy.
report h200-llama8b-kv8g --model h200-llama8b-kv8g --policies "$ALL"
report h200-llama1b --model h200-llama1b --policies "$ALL"
# The model fitted to the measured engine benchmark, and the memory-bound 8B (KV cut to 2 GiB):
# the first 8000 requests and a 3-point sweep (they ran on a 2-core machine).
report engine-h200-llama1b --model bench/results/engine_h200.json --policies "$ALL" \
  --first 8000 --grid 0.5,1,1.25
report h200-llama8b-kv2g --model h200-llama8b-kv8g --kv-blocks 1024 --policies "$SEEDS" \
  --first 8000 --grid 0.5,1,1.25

if [[ "${SKIP_ABLATION:-0}" != 1 ]]; then   # one mechanism off at a time, near capacity
  python -m dynabatch.bench.ablation --trace "$TRACE" --first 4000 --model h200-llama8b-kv8g \
    --kv-blocks 1024 --rps 3.5 "${SLA[@]}" --jobs "$JOBS" \
    --out bench/results/ablation_h200-llama8b-kv2g > /dev/null
  python -m dynabatch.bench.ablation --trace "$TRACE" --first 8000 \
    --model bench/results/engine_h200.json --rps 75 "${SLA[@]}" --jobs "$JOBS" \
    --out bench/results/ablation_engine-h200-llama1b > /dev/null
  echo "wrote bench/results/ablation_*"
fi
