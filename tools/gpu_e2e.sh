#!/usr/bin/env bash
# The end-to-end suite on the GPU machine (issue 9), run through the device tool:
#   run(command="bash tools/gpu_e2e.sh", carry=[".whl", ".debs"])
# .whl: wheels the machine lacks (grpcio/protobuf at the versions of our generated code, redis,
# opentelemetry); .debs: Debian's redis-server and its libraries (no apt there). Writes to $OUT.
set -euo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
mkdir -p /tmp/redis && for f in .debs/*.deb; do dpkg -x "$f" /tmp/redis; done
export LD_LIBRARY_PATH=/tmp/redis/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}
/tmp/redis/usr/bin/redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no --dir /tmp
for _ in $(seq 50); do python3 -c "import redis; redis.Redis(socket_connect_timeout=1).ping()" 2>/dev/null && break; sleep 0.2; done
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/machine.txt"
timeout 300 python3 -m dynabatch.bench.sidecar --model llama-3.2-1b-shape --device cuda \
  --requests "${SIDECAR_REQUESTS:-256}" --prompt 256 --output 256 \
  --out "$OUT/sidecar_h200.json" 2>&1 | tee "$OUT/sidecar.log"
