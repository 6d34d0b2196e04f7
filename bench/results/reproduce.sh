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
# Settings: MODEL[:KV_BLOCKS] (8B with the KV pool cut to 1024 blocks = 2 GiB: memory-bound).
for SETTING in ${SETTINGS:-h200-llama8b-kv8g h200-llama8b-kv8g:1024 h200-llama1b}; do
  MODEL=${SETTING%%:*}
  NAME=$MODEL
  KV=()
  if [[ "$SETTING" == *:* ]]; then
    KV=(--kv-blocks "${SETTING##*:}")
    NAME="h200-llama8b-kv2g"
  fi
  ARGS=(--model "$MODEL" "${KV[@]}" --policies "$POLICIES" --ttft-ms 2000 --tpot-ms 50
        --max-tokens 2048 --out "bench/results/azure_$NAME")
  python -m dynabatch.bench.commands report --trace "$TRACE" "${ARGS[@]}" --jobs "$JOBS" \
    --command-line "dynabatch bench report --trace azure_llm_conv_2023.csv ${ARGS[*]}" \
    > "bench/results/azure_$NAME.log" 2>&1
  echo "wrote bench/results/azure_$NAME"
done
# Ablations near the capacities found above (one mechanism off at a time; see ABLATION.md).
if [[ "${SKIP_ABLATION:-0}" != 1 ]]; then
  python -m dynabatch.bench.ablation --trace "$TRACE" --model h200-llama8b-kv8g --kv-blocks 1024 \
    --rps 3.5 --ttft-ms 2000 --tpot-ms 50 --jobs "$JOBS" --out bench/results/ablation_kv2g \
    > /dev/null
  python -m dynabatch.bench.ablation --trace "$TRACE" --model h200-llama1b \
    --rps 56 --ttft-ms 2000 --tpot-ms 50 --jobs "$JOBS" --out bench/results/ablation_llama1b \
    > /dev/null
  echo "wrote bench/results/ablation_*"
fi
