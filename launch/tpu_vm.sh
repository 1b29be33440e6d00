#!/usr/bin/env bash
# Trains chartx on a fresh Cloud TPU VM (one host or a pod slice): creates the VM, copies the
# committed HEAD of this checkout to every worker, installs it with jax[tpu], runs chartx.main on
# all workers with their logs streamed here, and deletes the VM when the run ends or fails.
#
#   launch/tpu_vm.sh --name=NAME --tpu-type=v4-8 --zone=us-central2-b --project=PROJECT \
#     --config=configs/enwik8_64l.py --workdir=gs://BUCKET/DIR [-- CHARTX_MAIN_ARGS...]
#
# Flags (each may come from the environment instead: --tpu-type from CHARTX_TPU_TYPE, ...):
#   --name, --tpu-type, --zone, --project, --config, --workdir   required
#   --runtime-version   TPU software version; default follows --tpu-type (v4: tpu-ubuntu2204-base)
#   --spot              create a Spot VM (cheaper, can be preempted; rerunning resumes)
#   --keep              keep the VM after the run (then --workdir may be a local path)
#   --dry-run           print the commands instead of running them (also DRY_RUN=1)
# Words after -- are passed to chartx.main, e.g. -- --mode=eval --config.train.num_steps=1000.
# --config is a path inside the repository; --workdir is read by every worker, so a gs:// path.
# Before renting the TPU, check here that the config compiles for it and fits its memory (no TPU
# needed; pip install '.[tpu]'): python -m chartx.main --config=CONFIG --workdir=/tmp/c
# --mode=compile --config.compile.topology=v4:2x2x1 (the --tpu-type's topology; docs/tpu.md).

set -euo pipefail
# shellcheck source-path=SCRIPTDIR
source "$(dirname "$0")/common.sh"
FLAGS=(name tpu-type zone project runtime-version config workdir)
SWITCHES=(spot keep dry-run)
parse_flags "$@"
require CHARTX_NAME CHARTX_TPU_TYPE CHARTX_ZONE CHARTX_PROJECT CHARTX_CONFIG CHARTX_WORKDIR
# The VM and its disk are deleted at the end: only a bucket outlives them.
[[ $CHARTX_WORKDIR == gs://* || ${CHARTX_KEEP:-} == 1 ]] ||
  die "--workdir must be a gs:// path (the VM and its disk are deleted after the run; --keep keeps them)"

# Software versions from https://cloud.google.com/tpu/docs/runtimes.
case $CHARTX_TPU_TYPE in
  v6e-*) default_runtime="v2-alpha-tpuv6e" ;;
  v5p-*) default_runtime="v2-alpha-tpuv5" ;;
  v5litepod-*) default_runtime="v2-alpha-tpuv5-lite" ;;
  *) default_runtime="tpu-ubuntu2204-base" ;;
esac
tpu=(gcloud compute tpus tpu-vm)
where=(--zone="$CHARTX_ZONE" --project="$CHARTX_PROJECT")
tarball=${TMPDIR:-/tmp}/$CHARTX_NAME-chartx.tar.gz

run "${tpu[@]}" create "$CHARTX_NAME" "${where[@]}" --accelerator-type="$CHARTX_TPU_TYPE" \
  --version="${CHARTX_RUNTIME_VERSION:-$default_runtime}" ${CHARTX_SPOT:+--spot}
if [[ ${CHARTX_KEEP:-} != 1 ]]; then
  trap 'run "${tpu[@]}" delete "$CHARTX_NAME" "${where[@]}" --quiet' EXIT
fi
run git -C "$ROOT" archive --format=tar.gz --prefix=chartx/ -o "$tarball" HEAD
run "${tpu[@]}" scp "$tarball" "$CHARTX_NAME:chartx.tar.gz" "${where[@]}" --worker=all
run "${tpu[@]}" ssh "$CHARTX_NAME" "${where[@]}" --worker=all \
  --command="set -e; tar xzf chartx.tar.gz; $(install_line ./chartx tpu)"
# Every worker runs the same command; chartx.main finds the others by itself on a TPU VM.
run "${tpu[@]}" ssh "$CHARTX_NAME" "${where[@]}" --worker=all --command="$(main_line ./chartx \
  .venv/bin/python --config="$CHARTX_CONFIG" --workdir="$CHARTX_WORKDIR" "${EXTRA_ARGS[@]}")"
