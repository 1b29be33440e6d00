#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py) on a machine that has JAX for its GPU but no network.
#
#   benchmarks/gpu_check.sh --download      here, with network: fetch the wheels chartx needs
#                                           beyond the GPU machine's packages into .wheels/
#   bash benchmarks/gpu_check.sh [ARGS]     there, from the repo root (.wheels/ carried along):
#                                           install the wheels into .gpu_site/ (the system's
#                                           JAX, flax, optax, orbax are left alone) and run
#                                           python -m benchmarks.gpu_check --out=$OUT/gpu_check.json ARGS
#   --dry-run                               with either: print the commands, run nothing
#
# OUT (default /tmp/gpu_check) receives gpu_check.json and gpu_check.log. PYTHON (default
# python3) is the interpreter. ARGS go to benchmarks.gpu_check (e.g. --budget_s=300, --tiny).

set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-python3}
OUT=${OUT:-/tmp/gpu_check}
WHEELS=.wheels
SITE=.gpu_site
# What chartx imports on the check's path and the GPU machine lacks (device/KINDS.md lists its
# packages: absl-py, PyYAML, numpy, packaging, protobuf, tqdm, etils are there), at the versions
# the test suite runs here. Both are pure Python, so one wheel fits any platform.
PACKAGES=(ml-collections==1.1.0 tensorboardX==2.6.5)

die() { echo "error: $*" >&2; exit 1; }

# run CMD...: runs it, or prints it (one line of shell words) under --dry-run.
run() {
  if ((dry)); then printf '%q ' "$@" | sed 's/ $//'; echo; else "$@"; fi
}

dry=0 download=0 args=()
for a in "$@"; do
  case $a in
    --dry-run) dry=1 ;;
    --download) download=1 ;;
    -h|--help) sed -n '2,/^$/s/^# \{0,1\}//p' "$0"; exit 0 ;;
    *) args+=("$a") ;;
  esac
done

if ((download)); then
  ((${#args[@]} == 0)) || die "--download takes no other arguments, got '${args[0]}'"
  run "$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
    --platform manylinux2014_x86_64 -d "$WHEELS" "${PACKAGES[@]}"
  exit 0
fi

if ! ((dry)); then
  compgen -G "$WHEELS/*.whl" >/dev/null ||
    die "$WHEELS/ holds no wheels: run benchmarks/gpu_check.sh --download first (with network)"
  mkdir -p "$OUT"
fi
run "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target "$SITE" "$WHEELS"/*.whl
if ((dry)); then
  printf 'PYTHONPATH=.:%s ' "$SITE"
  run "$PYTHON" -m benchmarks.gpu_check "--out=$OUT/gpu_check.json" "${args[@]}"
else
  PYTHONPATH=".:$SITE" PYTHONUNBUFFERED=1 "$PYTHON" -m benchmarks.gpu_check \
    "--out=$OUT/gpu_check.json" "${args[@]}" 2>&1 | tee "$OUT/gpu_check.log"
fi
