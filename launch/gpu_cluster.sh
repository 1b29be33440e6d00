#!/usr/bin/env bash
# Trains chartx on several GPU hosts reachable by ssh: starts one chartx.main process per host
# (each drives all GPUs of its host), host 0 being the JAX coordinator, and streams every
# host's log here with the host's name in front. Ctrl-C or any host failing stops all of them.
#
#   launch/gpu_cluster.sh --hosts=gpu0,gpu1 --config=configs/enwik8_64l.py \
#     --workdir=/shared/runs/t64 [--install] [-- CHARTX_MAIN_ARGS...]
#
# Flags (each may come from the environment instead: --hosts from CHARTX_HOSTS, ...):
#   --hosts, --config, --workdir   required; hosts comma-separated, as ssh takes them ([user@]host)
#   --coordinator   HOST:PORT the other hosts reach host 0 at; default <host 0>:8476
#   --remote-dir    the chartx checkout on every host; default this checkout's path
#   --python        interpreter on the hosts; default .venv/bin/python (in --remote-dir)
#   --install       first create that .venv on every host with chartx and jax[--jax-extra]
#   --jax-extra     the JAX build to install; default cuda13 (cuda12 for older drivers)
#   --dry-run       print the commands instead of running them (also DRY_RUN=1)
# Before renting GPUs: --mode=compile (docs/tpu.md) compiles a config for a TPU slice on any machine;
# for a GPU target it is not wired in yet (docs/tpu.md, "GPU targets").
# Words after -- are passed to chartx.main. --config is relative to --remote-dir; --workdir
# must be storage that every host sees (a shared filesystem or a gs:// bucket).

set -euo pipefail
# shellcheck source-path=SCRIPTDIR
source "$(dirname "$0")/common.sh"
FLAGS=(hosts config workdir coordinator remote-dir python jax-extra)
SWITCHES=(install dry-run)
parse_flags "$@"
require CHARTX_HOSTS CHARTX_CONFIG CHARTX_WORKDIR

IFS=, read -r -a hosts <<<"$CHARTX_HOSTS"
coordinator=${CHARTX_COORDINATOR:-${hosts[0]#*@}:8476}
dir=${CHARTX_REMOTE_DIR:-$ROOT}

if [[ ${CHARTX_INSTALL:-} == 1 ]]; then
  for host in "${hosts[@]}"; do
    run ssh "$host" "$(install_line "$dir" "${CHARTX_JAX_EXTRA:-cuda13}")"
  done
fi
# prefix HOST: copies stdin to stdout with [HOST] before each line (and no \r from the terminal).
prefix() {
  local line
  while IFS= read -r line || [[ -n $line ]]; do printf '[%s] %s\n' "$1" "${line%$'\r'}"; done
}

pids=()
# Killing an ssh that holds a terminal (-tt) hangs up its remote process: when one host fails
# or on Ctrl-C, the trap stops the others.
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT
for i in "${!hosts[@]}"; do
  cmd=(ssh -tt "${hosts[$i]}" "$(main_line "$dir" "${CHARTX_PYTHON:-.venv/bin/python}" \
    --config="$CHARTX_CONFIG" --workdir="$CHARTX_WORKDIR" "${EXTRA_ARGS[@]}" \
    --coordinator_address="$coordinator" --num_processes="${#hosts[@]}" --process_id="$i")")
  if dry_run; then
    run "${cmd[@]}"
  else
    "${cmd[@]}" </dev/null > >(prefix "${hosts[$i]}") 2>&1 &
    pids+=("$!")
  fi
done
for _ in "${pids[@]}"; do
  wait -n  # a failed host exits here with its status (set -e); the trap then stops the others
done
