#!/usr/bin/env bash
# Regenerates every SIMULATED result in bench/results/ (run from the repository root):
#   bench/results/reproduce.sh [AZURE_CSV] [JOBS]
# 1. the simulator speed benchmark (one process, one core): bench/results/sim_speed.json
# 2. per setting, the policy comparison on the shared Azure trace:
#    bench/results/azure_<setting>/{REPORT.md,report.json,*.png}
# 3. ablations near the capacities found: bench/results/ablation_<setting>/ABLATION.md
# Environment: SKIP_SPEED=1, SKIP_ABLATION=1, SETTINGS="name=model[:kv_blocks] ..." to run less.
set -euo pipefail
TRACE=${1:-/work/shared/workloads/azure_llm_conv_2023.csv}
JOBS=${2:-2}
export DYNABATCH_AZURE_TRACE="$TRACE"
POLICIES=naive,fcfs,dynamic,static,multibin,latency,throughput,coalescing,adaptive
SLA=(--ttft-ms 2000 --tpot-ms 50 --max-tokens 2048)
if [[ "${SKIP_SPEED:-0}" != 1 ]]; then
  python -m dynabatch.bench.commands simulate --speed --speed-n 100000 --out bench/results/sim_speed.json
fi
# name=latency model[:KV blocks]. engine-h200-llama1b is fitted to the measured engine benchmark;
# the h200-* models are derived from the decode anchors (see dynabatch/bench/models/*.json).
DEFAULT_SETTINGS="engine-h200-llama1b=bench/results/engine_h200.json h200-llama8b-kv8g=h200-llama8b-kv8g h200-llama8b-kv2g=h200-llama8b-kv8g:1024 h200-llama1b=h200-llama1b"
for SETTING in ${SETTINGS:-$DEFAULT_SETTINGS}; do
  NAME=${SETTING%%=*}
  SPEC=${SETTING#*=}
  MODEL=(--model "${SPEC%%:*}")
  [[ "$SPEC" == *:* ]] && MODEL+=(--kv-blocks "${SPEC##*:}")
  ARGS=("${MODEL[@]}" --policies "$POLICIES" "${SLA[@]}" --out "bench/results/azure_$NAME")
  python -m dynabatch.bench.commands report --trace "$TRACE" "${ARGS[@]}" --jobs "$JOBS" \
    --command-line "dynabatch bench report --trace azure_llm_conv_2023.csv ${ARGS[*]}" \
    > "bench/results/azure_$NAME.log" 2>&1
  echo "wrote bench/results/azure_$NAME"
done
if [[ "${SKIP_ABLATION:-0}" != 1 ]]; then
  for ABL in "engine-h200-llama1b bench/results/engine_h200.json 77" \
             "h200-llama8b-kv2g h200-llama8b-kv8g:1024 3.5" "h200-llama1b h200-llama1b 56"; do
    read -r NAME SPEC RPS <<< "$ABL"
    MODEL=(--model "${SPEC%%:*}")
    [[ "$SPEC" == *:* ]] && MODEL+=(--kv-blocks "${SPEC##*:}")
    python -m dynabatch.bench.ablation --trace "$TRACE" "${MODEL[@]}" --rps "$RPS" "${SLA[@]}" \
      --jobs "$JOBS" --out "bench/results/ablation_$NAME" > /dev/null
    echo "wrote bench/results/ablation_$NAME"
  done
fi
