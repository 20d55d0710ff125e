#!/usr/bin/env bash
# Runs one `hps-jax` command as a single process that drives all GPUs of this machine.
# See usage() below, or run with --help.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/gpu_node.sh [options] -- HPS_JAX_ARGS...

Runs `hps-jax HPS_JAX_ARGS...` as ONE process that sees every local GPU (JAX drives them all from one
controller; the mesh in hps_jax.parallel spans them). No jax.distributed setup: HPS_COORDINATOR,
HPS_NUM_PROCESSES and HPS_PROCESS_ID are unset. The command runs in the current directory.

Options:
  --gpus LIST          only these GPUs, e.g. 0,1,2,3 (sets CUDA_VISIBLE_DEVICES; default: all)
  --mem-fraction F     fraction of each GPU's memory JAX preallocates (XLA_PYTHON_CLIENT_MEM_FRACTION,
                       default 0.90; JAX's own default is 0.75)
  --no-preallocate     allocate GPU memory on demand instead (XLA_PYTHON_CLIENT_PREALLOCATE=false;
                       slower, but leaves memory to other processes)
  --xla-flags FLAGS    XLA_FLAGS to set (default: --xla_gpu_enable_latency_hiding_scheduler=true, which
                       overlaps collectives with compute); an XLA_FLAGS already in the environment is appended
  --venv DIR           run DIR/bin/hps-jax (default: hps-jax from PATH)
  --install            first create the venv (--venv, default: .venv in this checkout) and pip install this
                       checkout (editable, with the [data] extra), jax[JAX_EXTRA] and the CLIP BPE vocabulary
  --jax-extra EXTRA    the jax extra --install adds (default: cuda12)
  --env KEY=VALUE      also export KEY=VALUE (repeatable)
  --dry-run            print the commands and exports, one per line and shell-quoted, and run nothing
  -h, --help           this help

Example:
  launch/gpu_node.sh --venv .venv -- train-preference --config configs/hps_classifier.py:paper --workdir runs/hps
EOF
}

die() { printf 'gpu_node.sh: error: %s\n' "$*" >&2; exit 2; }

# shellcheck source=lib.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# Exports NAME=VALUE, or only prints the export line with --dry-run.
setenv() {
  if ((DRY_RUN)); then
    printf 'export %s=%s\n' "$1" "$(quote "$2")"
  else
    export "$1=$2"
  fi
}

GPUS="" MEM_FRACTION=0.90 PREALLOCATE=1 XLA_DEFAULT="--xla_gpu_enable_latency_hiding_scheduler=true"
VENV="" INSTALL=0 JAX_EXTRA=cuda12 DRY_RUN=0
ENVS=()

need() { (($2 >= 2)) || die "$1 needs a value"; }

while (($#)); do
  case $1 in
    --) shift; break ;;
    --*=*) set -- "${1%%=*}" "${1#*=}" "${@:2}"; continue ;;
    -h|--help) usage; exit 0 ;;
    --gpus) need "$1" $#; [[ $2 =~ ^[0-9]+(,[0-9]+)*$ ]] || die "--gpus wants a list like 0,1,2,3, got '$2'"
            GPUS=$2; shift ;;
    --mem-fraction) need "$1" $#; [[ $2 =~ ^(0?\.[0-9]*[1-9][0-9]*|1(\.0*)?)$ ]] ||
                      die "--mem-fraction wants a number in (0, 1], got '$2'"
                    MEM_FRACTION=$2; shift ;;
    --xla-flags) need "$1" $#; XLA_DEFAULT=$2; shift ;;
    --venv) need "$1" $#; VENV=$2; shift ;;
    --jax-extra) need "$1" $#; [[ $2 =~ ^[A-Za-z0-9_.-]+$ ]] || die "--jax-extra wants a name like cuda12"
                 JAX_EXTRA=$2; shift ;;
    --env) need "$1" $#; [[ $2 =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env wants KEY=VALUE, got '$2'"
           ENVS+=("$2"); shift ;;
    --no-preallocate) PREALLOCATE=0 ;;
    --install) INSTALL=1 ;;
    --dry-run) DRY_RUN=1 ;;
    -*) die "unknown option '$1' (see --help)" ;;
    *) die "unexpected argument '$1': the hps-jax command goes after -- (see --help)" ;;
  esac
  shift
done

(($#)) || die "no hps-jax command given: put it after --, e.g. -- train-preference --config ... --workdir ..."
SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if ((INSTALL)); then
  VENV=${VENV:-$SRC/.venv}
  run python3 -m venv "$VENV"
  run "$VENV/bin/pip" install -q -U pip
  run "$VENV/bin/pip" install -q -e "${SRC}[data]" "jax[$JAX_EXTRA]"
  run "$VENV/bin/pip" install -q --no-deps open_clip_torch
fi
HPS_JAX=hps-jax
[[ -z $VENV ]] || HPS_JAX=$VENV/bin/hps-jax

[[ -z $GPUS ]] || setenv CUDA_VISIBLE_DEVICES "$GPUS"
if ((PREALLOCATE)); then
  setenv XLA_PYTHON_CLIENT_MEM_FRACTION "$MEM_FRACTION"
else
  setenv XLA_PYTHON_CLIENT_PREALLOCATE false
fi
xla_flags="$XLA_DEFAULT${XLA_FLAGS:+ $XLA_FLAGS}"
xla_flags=${xla_flags# }
[[ -z $xla_flags ]] || setenv XLA_FLAGS "$xla_flags"
for kv in "${ENVS[@]+"${ENVS[@]}"}"; do setenv "${kv%%=*}" "${kv#*=}"; done
if ((DRY_RUN)); then
  echo "unset HPS_COORDINATOR HPS_NUM_PROCESSES HPS_PROCESS_ID"
  quote_cmd "$HPS_JAX" "$@"
  exit 0
fi
unset HPS_COORDINATOR HPS_NUM_PROCESSES HPS_PROCESS_ID
printf '+ %s\n' "$(quote_cmd "$HPS_JAX" "$@")" >&2
exec "$HPS_JAX" "$@"
