#!/usr/bin/env bash
# The end-to-end suite on the GPU machine (issue 9), run through the device tool:
#   run(command="bash tools/gpu_e2e.sh", carry=[".whl", ".debs"])
# .whl: wheels the machine lacks (grpcio/protobuf at the versions of our generated code, redis,
# opentelemetry); .debs: Debian's redis-server and its libraries (no apt there). Writes to $OUT.
# Both folders are git-ignored; make them here, in the repo root, before the run:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl grpcio==1.85.1 protobuf==7.36.2 grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1 \
#     redis==8.1.0 opentelemetry-api==1.45.2 opentelemetry-sdk==1.45.2 \
#     opentelemetry-semantic-conventions==0.66b2 opentelemetry-proto==1.45.2 \
#     opentelemetry-exporter-otlp-proto-grpc==1.45.2 opentelemetry-exporter-otlp-proto-common==1.45.2 \
#     googleapis-common-protos==1.76.0
#   mkdir -p .debs && (cd .debs && apt-get -oAPT::Architecture=amd64 download redis-server \
#     redis-tools libjemalloc2 liblzf1)
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
