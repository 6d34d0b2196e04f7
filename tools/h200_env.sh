# Sourced (`source tools/h200_env.sh || exit 1`) at the start of a script run on the H200 host
# through the device tool, in the repo root (a copy of the working tree; no internet, no apt):
#   - the wheels that host lacks (.whl, git-ignored; tools/gpu_e2e.sh's header says how to
#     download them) go to /tmp/site, which comes before the repo on PYTHONPATH (the repo is
#     not pip-installed there: `python3 -m dynabatch...` and its subprocesses import it from
#     PYTHONPATH);
#   - OUT (default /tmp/out) exists.
# The same steps as the top of tools/gpu_e2e.sh, which may source this file instead.
# NO_WHEELS=1 skips the wheels (a local trial with a Python that already has them).
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
if [ -z "${NO_WHEELS:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || return 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
