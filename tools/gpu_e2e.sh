#!/usr/bin/env bash
# The end-to-end suite on the GPU machine (issue 9), run through the device tool, one or more
# stages per call (each call is limited to 10 minutes):
#   run(command="bash tools/gpu_e2e.sh sidecar engine8b", carry=[".whl", ".debs", ".carry"])
# Stages:
#   sidecar       engine in-process vs the whole path (client -> gRPC -> scheduler -> Redis ->
#                 worker), Llama-3.2-1B shape; CLIENT_PROCS=N deals the whole path's requests
#                 to N client processes, SCHEDULERS=N runs N scheduler processes on one port,
#                 CLIENT_DRIVER=many sends each client process's requests over one GenerateMany
#                 call, TAG names the run            -> sidecar_${CLIENT_DRIVER:-sdk}${TAG}.json
#   engine8b      engine benchmark of the Llama-3.1-8B shape (the constrained setting's latency
#                 model is fitted to it)                             -> engine_h200_8b.json
#   mixed8b       whole mixed steps of the 8B shape (tools/mixed_step_time.py: what a chunk beside
#                 decodes costs; sim_vs_live / sim_plan --mixed-step-times) -> mixed_step_time.json
#   live1b-a/-b   capacity per policy, 1B shape, full KV pool (unconstrained)   -> live_1b_*.json
#   live8b-a/-b   capacity per policy, 8B shape, KV pool cut to KV8B blocks     -> live_8b_*.json
# The grids continue bench/results/e2e_h200 (sessions 2-4; REPORT.md). Still to run: naive@10
# (live1b-b). live8b-e: the 8B grid with the policy option reserve_output=true (the engine
# preempts in the 60-s segments' burst) and max_num_seqs 16 at 4 req/s. live8b-tpot: the 8B grid
# with a TPOT target that binds (1.6x the batch-1 step measured first; not run yet).
# Inputs that are not in git (all git-ignored), made here in the repo root before the run:
#   .whl:   wheels the machine lacks (grpcio/protobuf at the versions of our generated code,
#           redis, opentelemetry):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl grpcio==1.85.1 protobuf==7.36.2 grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1 \
#     redis==8.1.0 opentelemetry-api==1.45.2 opentelemetry-sdk==1.45.2 \
#     opentelemetry-semantic-conventions==0.66b2 opentelemetry-proto==1.45.2 \
#     opentelemetry-exporter-otlp-proto-grpc==1.45.2 opentelemetry-exporter-otlp-proto-common==1.45.2 \
#     googleapis-common-protos==1.76.0
#   and for the GPU tests (tests/engine imports hypothesis):
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl hypothesis==6.155.2 attrs==26.1.0 \
#     sortedcontainers==2.4.0
#   .debs:  Debian's redis-server and its libraries (no apt there):
#   mkdir -p .debs && (cd .debs && apt-get -oAPT::Architecture=amd64 download redis-server \
#     redis-tools libjemalloc2 liblzf1)
#   .carry: the shared trace: mkdir -p .carry && cp ../shared/workloads/azure_llm_conv_2023.csv .carry/
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
TRACE=.carry/azure_llm_conv_2023.csv
KV8B=${KV8B:-1024}        # 8B KV pool: 1024 x 16-token blocks = 16k tokens, 2 GiB
SLA=(--ttft-ms 2000 --tpot-ms 50)

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
mkdir -p /tmp/redis && for f in .debs/*.deb; do dpkg -x "$f" /tmp/redis; done
export LD_LIBRARY_PATH=/tmp/redis/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}
/tmp/redis/usr/bin/redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no --dir /tmp
for _ in $(seq 50); do python3 -c "import redis; redis.Redis(socket_connect_timeout=1).ping()" 2>/dev/null && break; sleep 0.2; done
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc; python3 -V;
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"; } | tee "$OUT/machine.txt"

live() {   # live <name> <budget_s> <model> [args...]: one capacity sweep on the live stack
  local name=$1 budget=$2 model=$3; shift 3
  timeout $((budget + 120)) python3 -m dynabatch.bench.live_capacity --trace "$TRACE" \
    --model "$model" --device cuda "${SLA[@]}" --budget-s "$budget" --out "$OUT/$name.json" "$@" \
    2>&1 | tee "$OUT/$name.log"
}

calibrate8b() {   # TPOT (1.6x the 8B batch-1 step; or $TPOT as given) and S (rate scale vs H200)
  if [ -n "${TPOT:-}" ]; then
    S=${RATE_SCALE:-$(python3 -c "print(round(5.756 * 1.6 / $TPOT, 3))")}   # TPOT = 1.6 x step
  else
    timeout 150 python3 -m dynabatch.bench.engine_bench --model llama-3.1-8b-shape --device cuda \
      --batches 1,16 --prompt-len 1024 --output-len 64 --mixed-requests 0 --baseline-batches none \
      --json "$OUT/engine8b_calib.json" 2>&1 | grep -v -i warn | tail -6
    read -r TPOT S < <(python3 -c "
import json; d = json.load(open('$OUT/engine8b_calib.json'))
b1 = [r for r in d['offline'] if r['batch'] == 1][0]['ms_per_step']
print(round(1.6 * b1, 1), round(5.756 / b1, 3))")
  fi
  echo "TPOT target $TPOT ms; rates x $S" | tee "$OUT/live_8b_tpot_target.txt"
}
rate() { python3 -c "print(round($1 * $S, 2))"; }

for stage in "$@"; do
  echo "== $stage ($(date +%T))"
  case $stage in
    sidecar) timeout 300 python3 -m dynabatch.bench.sidecar --model llama-3.2-1b-shape --device cuda \
               --requests 256 --prompt 256 --output 256 --client-procs "${CLIENT_PROCS:-1}" \
               --schedulers "${SCHEDULERS:-1}" --client-driver "${CLIENT_DRIVER:-sdk}" \
               --out "$OUT/sidecar_${CLIENT_DRIVER:-sdk}${TAG:-}.json" 2>&1 | tee "$OUT/sidecar_${CLIENT_DRIVER:-sdk}${TAG:-}.log" ;;
    engine8b) timeout 240 python3 -m dynabatch.bench.engine_bench --model llama-3.1-8b-shape --device cuda \
               --batches 1,16,64 --prompt-len 1024 --output-len 128 --mixed-requests 64 --mixed-output 32 \
               --baseline-batches none --json "$OUT/engine_h200_8b.json" 2>&1 | tee "$OUT/engine8b.log" ;;
    mixed8b) timeout 200 python3 tools/mixed_step_time.py --contexts 512,4096 --decodes 1,4,8 \
               --chunks 16,32,64,256 --split-only --json "$OUT/mixed_step_time.json" \
               2>&1 | grep -v -i warn | tee "$OUT/mixed_step_time.log" ;;
    live1b-a) live live_1b_a 400 llama-3.2-1b-shape --seconds 20 \
               --point fcfs@60,70 --point dynamic@70 --point multibin@60,70 ;;
    live1b-c) live live_1b_c 170 llama-3.2-1b-shape --seconds 20 \
               --point dynamic@50,60 --point fcfs@60 --point multibin@60 ;;   # short: 6 device min left
    live1b-b) live live_1b_b 120 llama-3.2-1b-shape --seconds 20 --point static@4 --point naive@10 ;;
    live8b-a) live live_8b_a 480 llama-3.1-8b-shape --kv-blocks "$KV8B" --seconds 30 \
               --point dynamic@3,3.5,4 --point fcfs@3.5,4 ;;
    live8b-c) live live_8b_c 420 llama-3.1-8b-shape --kv-blocks "$KV8B" --seconds 60 \
               --point fcfs@3.5,4 --point multibin@4 --point dynamic@3.5 ;;   # 60-s points
    live8b-d) live live_8b_d 200 llama-3.1-8b-shape --kv-blocks "$KV8B" --seconds 60 \
               --point fcfs@4 ;;   # the point live8b-c had no budget left for
    live8b-e) live live_8b_e 440 llama-3.1-8b-shape --kv-blocks "$KV8B" --seconds 60 \
               --point dynamic:reserve_output=true@3.5,4 --point multibin:reserve_output=true@4 \
               --point fcfs:max_num_seqs=16@4 ;;   # session 5: Alg. 1 keeping blocks for outputs
    live8b-b) live live_8b_b 480 llama-3.1-8b-shape --kv-blocks "$KV8B" --seconds 30 \
               --point multibin@3,3.5,4 --point fcfs:max_num_seqs=16@3.5 \
               --point fcfs:max_num_seqs=8@2.5 --point static@0.5 --point naive@0.5 ;;
    live8b-tpot)   # session 14: a TPOT target that binds, 1.6x this GPU's batch-1 step; rates
                   # scaled by the GPU's speed against the H200 (bench/results/sim_tpot_sweep)
      calibrate8b
      A=$(rate 1.8); B=$(rate 2.2); C=$(rate 2.6)
      # the later --tpot-ms overrides live()'s default SLA (argparse: the last one wins)
      live live_8b_tpot 360 llama-3.1-8b-shape --kv-blocks "$KV8B" --tpot-ms "$TPOT" --seconds 40 \
        --point "fcfs@$A,$B" --point "multibin@$A,$B,$C" --point "dynamic@$A,$B" ;;
    live8b-mixed)  # session 15: live8b-tpot's target with the engine's mixed steps and the
                   # dynamic policies' step prefill cap (policy/prefill_cap.py). POINTS: the
                   # --point flags, rates in H200 terms ({r} scaled); TPOT=ms skips calibrating
                   # (RATE_SCALE=x: rates scaled by x, for a TPOT that is not 1.6 x the step;
                   # STEP_TOKENS=n: the worker's fixed step prefill budget, default 8192)
      calibrate8b
      pts=(); for p in ${POINTS:-fcfs@1.3,2.0 dynamic@1.3,2.0,2.7 multibin@2.0,2.7}; do
        pts+=(--point "$(python3 -c "
import sys; pol, rates = sys.argv[1].split('@')
print(pol + '@' + ','.join(str(round(float(r) * $S, 2)) for r in rates.split(',')))" "$p")"); done
      live "live_8b_mixed${TAG:-}" "${LIVE_BUDGET:-380}" llama-3.1-8b-shape --kv-blocks "$KV8B" \
        --tpot-ms "$TPOT" --seconds "${SECONDS_PER_POINT:-60}" --mixed-steps \
        ${STEP_TOKENS:+--step-prefill-tokens "$STEP_TOKENS"} "${pts[@]}" ;;
    *) echo "unknown stage $stage" ;;
  esac
done
echo "== done ($(date +%T))"
