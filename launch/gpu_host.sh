#!/usr/bin/env bash
# Trains chartx on this machine and all its GPUs: one process drives every local GPU, so no
# distributed setup is needed. Optionally installs chartx with jax[cuda] into .venv first.
#
#   launch/gpu_host.sh --config=configs/enwik8_64l.py --workdir=DIR [--install] [-- CHARTX_MAIN_ARGS...]
#
# Flags (each may come from the environment instead: --workdir from CHARTX_WORKDIR, ...):
#   --config, --workdir   required; paths are relative to the current directory
#   --install             create .venv in this checkout with chartx and jax[--jax-extra] (uv)
#   --jax-extra           the JAX build to install; default cuda13 (cuda12 for older drivers)
#   --python              interpreter to run; default .venv/bin/python of this checkout
#   --dry-run             print the commands instead of running them (also DRY_RUN=1)
# Before renting GPUs: --mode=compile (docs/tpu.md) compiles a config for a TPU slice on any machine;
# for a GPU target it is not wired in yet (docs/tpu.md, "GPU targets").
# Words after -- are passed to chartx.main, e.g. -- --mode=eval --config.train.batch_size=32.

set -euo pipefail
# shellcheck source-path=SCRIPTDIR
source "$(dirname "$0")/common.sh"
FLAGS=(config workdir jax-extra python)
SWITCHES=(install dry-run)
parse_flags "$@"
require CHARTX_CONFIG CHARTX_WORKDIR

if [[ ${CHARTX_INSTALL:-} == 1 ]]; then
  run bash -c "$(install_line "$ROOT" "${CHARTX_JAX_EXTRA:-cuda13}")"
fi
run "${CHARTX_PYTHON:-$ROOT/.venv/bin/python}" -m chartx.main --config="$CHARTX_CONFIG" \
  --workdir="$CHARTX_WORKDIR" "${EXTRA_ARGS[@]}"
