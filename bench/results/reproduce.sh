#!/usr/bin/env bash
# Regenerates every SIMULATED result in bench/results/ (run from the repository root):
#   bench/results/reproduce.sh [AZURE_CSV] [JOBS]
# 1. the simulator speed benchmark (one process, one core): bench/results/sim_speed.json
# 2. per latency model, the policy comparison on the shared Azure trace:
#    bench/results/azure_<model>/{REPORT.md,report.json,*.png}
set -euo pipefail
TRACE=${1:-/work/shared/workloads/azure_llm_conv_2023.csv}
JOBS=${2:-2}
export DYNABATCH_AZURE_TRACE="$TRACE"
POLICIES=naive,fcfs,dynamic,static,multibin,latency,throughput,coalescing,adaptive
if [[ "${SKIP_SPEED:-0}" != 1 ]]; then
  python -m dynabatch.bench.commands simulate --speed --speed-n 100000 --out bench/results/sim_speed.json
fi
for MODEL in ${MODELS:-h200-llama8b-kv8g h200-llama1b}; do
  python -m dynabatch.bench.commands report --trace "$TRACE" --model "$MODEL" \
    --policies "$POLICIES" --ttft-ms 2000 --tpot-ms 50 --max-tokens 2048 --jobs "$JOBS" \
    --out "bench/results/azure_$MODEL" \
    --command-line "dynabatch bench report --trace azure_llm_conv_2023.csv --model $MODEL --policies $POLICIES --ttft-ms 2000 --tpot-ms 50 --max-tokens 2048 --out bench/results/azure_$MODEL" \
    > "bench/results/azure_$MODEL.log" 2>&1
  echo "wrote bench/results/azure_$MODEL"
done
