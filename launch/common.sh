# Shared by the launch scripts (sourced, not run): flag parsing, the dry-run wrapper, and the
# shell lines that install chartx and start chartx.main on a host.
# shellcheck shell=bash disable=SC2034  # ROOT and EXTRA_ARGS are for the scripts that source this file

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON_VERSION=3.12  # what uv installs into the venv; chartx needs >= 3.11, TPU VM images ship 3.10

# die MESSAGE: one-line error, exit 2.
die() { echo "$(basename "$0"): error: $*" >&2; exit 2; }

# usage: the script's header comment, without the shebang.
usage() { sed -n '2,/^$/s/^# \{0,1\}//p' "$0"; exit 0; }

# parse_flags ARGS...: `--key=VALUE` or `--key VALUE` for each key in FLAGS sets CHARTX_KEY
# (upper case, dashes to underscores); each key in SWITCHES sets CHARTX_KEY=1. A variable left
# unset by a flag keeps its value from the environment. Words after `--` go to chartx.main
# (EXTRA_ARGS).
parse_flags() {
  EXTRA_ARGS=()
  while (($#)); do
    local key=${1#--} value=1
    case $1 in
      --) shift; EXTRA_ARGS=("$@"); return ;;
      -h|--help) usage ;;
      --*=*) key=${key%%=*}; value=${1#*=}
        [[ " ${FLAGS[*]} " == *" $key "* ]] || die "unknown flag --$key" ;;
      --*) if [[ " ${FLAGS[*]} " == *" $key "* ]]; then
          (($# > 1)) || die "flag --$key needs a value"; value=$2; shift
        elif [[ " ${SWITCHES[*]} " != *" $key "* ]]; then
          die "unknown flag --$key"
        fi ;;
      *) die "unexpected argument '$1' (arguments for chartx.main go after --)" ;;
    esac
    key=${key//-/_}
    printf -v "CHARTX_${key^^}" '%s' "$value"
    shift
  done
}

# require VAR...: exit 2 naming the first flag whose CHARTX_ variable is empty.
require() {
  local var flag
  for var in "$@"; do
    flag=${var#CHARTX_}; flag=${flag,,}; flag=${flag//_/-}
    [[ -n ${!var:-} ]] || die "missing required flag --$flag (or env $var)"
  done
}

dry_run() { [[ ${CHARTX_DRY_RUN:-} == 1 || ${DRY_RUN:-} == 1 ]]; }

# quote ARGS...: ARGS as one line of shell words, quoted only where a shell needs it, in double
# quotes where they suffice, and a --flag= prefix left outside the quotes.
quote() {
  local words=() a flag
  for a in "$@"; do
    flag=
    [[ $a =~ ^--[A-Za-z0-9_.-]+= ]] && flag=${BASH_REMATCH[0]} && a=${a#"$flag"}
    if [[ $a =~ ^[A-Za-z0-9_./:=@,+%-]+$ ]]; then words+=("$flag$a")
    elif [[ $a != *[\"\$\`\\!]* ]]; then words+=("$flag\"$a\"")
    else words+=("$flag'${a//\'/\'\\\'\'}'"); fi
  done
  echo "${words[*]}"
}

# run CMD ARGS...: runs the command, or under --dry-run prints it as one line of shell.
run() { if dry_run; then quote "$@"; else "$@"; fi; }

# install_line DIR JAX_EXTRA: a shell line that puts chartx (checked out in DIR, a path with a
# slash), its gs:// support and jax[JAX_EXTRA] into the venv DIR/.venv, fetching uv and a recent
# Python when missing.
install_line() {
  local dir=$1 extra=$2
  echo "export PATH=\"\$HOME/.local/bin:\$PATH\";" \
    "command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh;" \
    "uv venv --allow-existing --python $PYTHON_VERSION $(quote "$dir/.venv") &&" \
    "uv pip install --python $(quote "$dir/.venv/bin/python") $(quote "jax[$extra]") -e $(quote "${dir}[gcs]")"
}

# main_line DIR PYTHON ARGS...: a shell line that runs chartx.main with ARGS from DIR, its
# output unbuffered so that the logs stream through ssh.
main_line() {
  local dir=$1 python=$2
  shift 2
  echo "cd $(quote "$dir") && PYTHONUNBUFFERED=1 $(quote "$python") -m chartx.main${*:+ $(quote "$@")}"
}
