#!/usr/bin/env bash
# The load benchmark (dynabatch/bench/load.py, fake engine, no GPU) on the H200 host: the stack
# pinned to 2 cores, nghttp2's h2load on others. Through the device tool:
#   run(command="bash tools/load_h200.sh", carry=[".whl", ".debs_h2load"], timeout_s=600)
# Runs (each --seconds SECS per phase, --driver h2load --channels 8): --processes 1 and 2, RUNS
# runs each, interleaved; then the gRPC floor (--floor) with 1 and 2 server processes, RUNS each.
# Out ($OUT, default /tmp/out; the device tool brings back 8 files at most): load_h200.json (every
# run's result), summary.txt (one line a phase: rates, cores, stack CPU us per admission),
# load_h200.log, machine.txt.
# Inputs that are not in git (git-ignored), made in the repo root before the run:
#   .whl:          as for tools/gpu_e2e.sh (see its header)
#   .debs_h2load:  h2load and the libraries it links that the host may lack (no apt there):
#     mkdir -p .debs_h2load && (cd .debs_h2load && apt-get -oAPT::Architecture=amd64 download \
#       nghttp2-client libnghttp2-14 libev4 libjemalloc2 libssl3)
# Environment: STACK_CPUS (default 0,1), DRIVER_CPUS (default 2-5; h2load and this script's
# Python), SECS (8), RUNS (2), NO_WHEELS=1 (tools/h200_env.sh). On a 2-core machine, a trial:
#   NO_WHEELS=1 STACK_CPUS=0,1 DRIVER_CPUS=0,1 SECS=2 RUNS=1 OUT=/tmp/out bash tools/load_h200.sh
set -uo pipefail
source tools/h200_env.sh || exit 1
STACK_CPUS=${STACK_CPUS:-0,1}
DRIVER_CPUS=${DRIVER_CPUS:-2-5}
SECS=${SECS:-8}
RUNS=${RUNS:-2}
LOG=$OUT/load_h200.log
RUNS_DIR=$(mktemp -d)

# h2load from the .debs, in a directory of its own. Its libraries go on LD_LIBRARY_PATH for
# h2load alone (a wrapper on PATH): exported to the whole script they would also come before
# the host's own libssl/libcrypto in every Python process.
H2=$(mktemp -d)
for f in .debs_h2load/*.deb; do dpkg -x "$f" "$H2" || exit 1; done
mkdir -p "$H2/wrap"
cat > "$H2/wrap/h2load" <<EOF
#!/bin/sh
LD_LIBRARY_PATH=$H2/usr/lib/x86_64-linux-gnu:$H2/lib/x86_64-linux-gnu\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH} exec $H2/usr/bin/h2load "\$@"
EOF
chmod +x "$H2/wrap/h2load"
export PATH=$H2/wrap:$PATH
h2load --version | tee "$LOG" || { echo "h2load does not start: $(ldd "$H2/usr/bin/h2load")"; exit 1; }

{ nproc; lscpu | grep -m1 "Model name"; python3 -V; cat /proc/loadavg
  echo "stack on $STACK_CPUS, driver on $DRIVER_CPUS, $SECS s a phase, $RUNS runs"; } | tee "$OUT/machine.txt"

bench() {   # bench <name> [load.py args...]: one run, its JSON in RUNS_DIR
  local name=$1; shift
  echo "== $name ($(date +%T)): $*" | tee -a "$LOG"
  timeout 300 taskset -c "$DRIVER_CPUS" python3 -m dynabatch.bench.load --seconds "$SECS" \
    --driver h2load --channels 8 --stack-cpus "$STACK_CPUS" --json "$RUNS_DIR/$name.json" "$@" \
    >> "$LOG" 2>&1 || echo "!! $name failed (exit $?)" | tee -a "$LOG"
}

for run in $(seq "$RUNS"); do
  for p in 1 2; do bench "p${p}_run$run" --processes "$p"; done
done
for run in $(seq "$RUNS"); do
  for p in 1 2; do bench "floor_p${p}_run$run" --processes "$p" --floor; done
done

python3 - "$RUNS_DIR" "$OUT" <<'EOF' | tee "$OUT/summary.txt"
import json, pathlib, sys
runs, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
results = {p.stem: json.loads(p.read_text()) for p in sorted(runs.glob("*.json"))}
(out / "load_h200.json").write_text(json.dumps(results, indent=1))
print(f"{'run':16} {'phase':11} {'adm/s':>7} {'tokens/s':>9} {'stack':>6} {'client':>6} "
      f"{'stack us/adm':>12} {'load avg':>11}")
for name, r in results.items():
    for p in r["phases"]:
        us = p["stack_cpu_cores"] * p["seconds"] / max(p["admitted"], 1) * 1e6
        print(f"{name:16} {p['phase']:11} {p['admissions_per_s']:7} {p['tokens_per_s']:9} "
              f"{p['stack_cpu_cores']:6} {p['client_cpu_cores']:6} {us:12.0f} "
              f"{str(r['loadavg_1m_before_after']):>11}")
EOF
