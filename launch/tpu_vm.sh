#!/usr/bin/env bash
# Runs one `hps-jax` command on every worker of a Cloud TPU VM (a single host or a pod slice).
# See usage() below, or run with --help.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/tpu_vm.sh --name NAME --zone ZONE [options] -- HPS_JAX_ARGS...

Runs `hps-jax HPS_JAX_ARGS...` on every worker of the Cloud TPU VM NAME at once (gcloud ... ssh --worker=all).
On a TPU VM jax.distributed finds the coordinator, process count and process id by itself, so the same command
serves a single host (v4-8) and a pod slice (v4-32, v5litepod-16, ...). Steps, in order:
  1. with --create: gcloud compute tpus tpu-vm create
  2. put the code on every worker: a tarball of this checkout (scp --worker=all), or a git clone (--repo)
  3. pip install the checkout (editable, with the [data] extra) and jax[tpu]
  4. the job: cd REMOTE_DIR && PYTHON -m hps_jax.cli HPS_JAX_ARGS...
  5. with --delete: gcloud compute tpus tpu-vm delete (also when the job failed; not when --create failed)

Required:
  --name NAME               TPU VM name
  --zone ZONE               e.g. us-central2-b

Options:
  --project PROJECT         GCP project (default: gcloud's configured one)
  --accelerator-type TYPE   e.g. v4-8, v4-32, v5litepod-16, v5p-8, v6e-8; needed with --create
  --version RUNTIME         TPU software version for --create (default from TYPE: tpu-ubuntu2204-base for
                            v2/v3/v4, v2-alpha-tpuv5-lite for v5litepod, v2-alpha-tpuv5 for v5p,
                            v2-alpha-tpuv6e for v6e)
  --spot                    with --create: a Spot (preemptible) VM
  --create                  create the TPU VM first
  --delete                  delete the TPU VM when the job has ended
  --src DIR                 the checkout to copy (default: the one this script is in)
  --repo URL                git clone URL on every worker instead of copying a checkout
  --branch BRANCH           with --repo: the branch or tag to check out (default: the remote's default)
  --no-copy                 the code is already in REMOTE_DIR on every worker
  --remote-dir DIR          where the code lives on the workers, relative to the home dir (default: hps-jax)
  --no-install              skip the pip install step
  --python PYTHON           python on the workers (default: python3)
  --env KEY=VALUE           set KEY=VALUE for the job (repeatable)
  --dry-run                 print the commands, one per line and shell-quoted, and run nothing
  -h, --help                this help

The job writes to --workdir on every worker: give a path all workers share (a gcsfuse-mounted bucket or a Filestore / NFS mount; gs:// URLs are not written directly yet).

Example:
  launch/tpu_vm.sh --name hps --zone us-central2-b --accelerator-type v4-32 --create -- \
      train-preference --config configs/hps_classifier.py:paper --workdir /mnt/gcs/BUCKET/run1
EOF
}

die() { printf 'tpu_vm.sh: error: %s\n' "$*" >&2; exit 2; }

# shellcheck source=lib.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

NAME="" ZONE="" PROJECT="" ACCEL="" VERSION="" SPOT=0 CREATE=0 DELETE=0
SRC="" REPO="" BRANCH="" NO_COPY=0 REMOTE_DIR="hps-jax" INSTALL=1 PYTHON="python3" DRY_RUN=0
ENVS=()

need() { (($2 >= 2)) || die "$1 needs a value"; }

while (($#)); do
  case $1 in
    --) shift; break ;;
    --*=*) set -- "${1%%=*}" "${1#*=}" "${@:2}"; continue ;;
    -h|--help) usage; exit 0 ;;
    --name) need "$1" $#; NAME=$2; shift ;;
    --zone) need "$1" $#; ZONE=$2; shift ;;
    --project) need "$1" $#; PROJECT=$2; shift ;;
    --accelerator-type) need "$1" $#; ACCEL=$2; shift ;;
    --version) need "$1" $#; VERSION=$2; shift ;;
    --src) need "$1" $#; SRC=$2; shift ;;
    --repo) need "$1" $#; REPO=$2; shift ;;
    --branch) need "$1" $#; BRANCH=$2; shift ;;
    --remote-dir) need "$1" $#; REMOTE_DIR=$2; shift ;;
    --python) need "$1" $#; PYTHON=$2; shift ;;
    --env) need "$1" $#; [[ $2 =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env wants KEY=VALUE, got '$2'"
           ENVS+=("$2"); shift ;;
    --spot) SPOT=1 ;;
    --create) CREATE=1 ;;
    --delete) DELETE=1 ;;
    --no-copy) NO_COPY=1 ;;
    --no-install) INSTALL=0 ;;
    --dry-run) DRY_RUN=1 ;;
    -*) die "unknown option '$1' (see --help)" ;;
    *) die "unexpected argument '$1': the hps-jax command goes after -- (see --help)" ;;
  esac
  shift
done

[[ -n $NAME ]] || die "--name is required (see --help)"
[[ $NAME =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] || die "--name must be lower-case letters, digits and -, got '$NAME'"
[[ -n $ZONE ]] || die "--zone is required (see --help)"
(($#)) || die "no hps-jax command given: put it after --, e.g. -- train-preference --config ... --workdir ..."
[[ -z $BRANCH || -n $REPO ]] || die "--branch needs --repo"
((NO_COPY == 0 || ${#REPO} == 0)) || die "--no-copy and --repo exclude each other"
[[ -z $SRC || (-z $REPO && NO_COPY -eq 0) ]] || die "--src excludes --repo and --no-copy"
[[ -n $REMOTE_DIR && $REMOTE_DIR != /* && $REMOTE_DIR != *..* && $REMOTE_DIR != "~"* ]] ||
  die "--remote-dir must be a non-empty path relative to the home dir, got '$REMOTE_DIR'"
if ((CREATE)); then
  [[ -n $ACCEL ]] || die "--create needs --accelerator-type"
  if [[ -z $VERSION ]]; then
    case $ACCEL in
      v2-*|v3-*|v4-*) VERSION=tpu-ubuntu2204-base ;;
      v5litepod-*|v5e-*) VERSION=v2-alpha-tpuv5-lite ;;
      v5p-*) VERSION=v2-alpha-tpuv5 ;;
      v6e-*) VERSION=v2-alpha-tpuv6e ;;
      *) die "no default --version for accelerator type '$ACCEL'; pass --version" ;;
    esac
  fi
else
  ((SPOT == 0)) || die "--spot only applies with --create"
fi
if [[ -z $REPO ]] && ((NO_COPY == 0)); then
  SRC=${SRC:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
  [[ -f $SRC/setup.cfg && -d $SRC/hps_jax ]] || die "--src '$SRC' is not an hps_jax checkout"
fi

WHERE=("--zone=$ZONE")
[[ -z $PROJECT ]] || WHERE+=("--project=$PROJECT")
TPU=(gcloud compute tpus tpu-vm)

# Remote command lines are built from quoted words so that every argument reaches the workers unchanged.
RDIR=$(quote "$REMOTE_DIR")
SETUP=()
if [[ -n $REPO ]]; then
  ref=HEAD clone=(git clone --depth 1)
  [[ -z $BRANCH ]] || { ref=$BRANCH; clone+=(--branch "$BRANCH"); }
  SETUP+=("if [ -d $RDIR/.git ]; then $(quote_cmd git -C "$REMOTE_DIR" fetch --depth 1 origin "$ref") && \
$(quote_cmd git -C "$REMOTE_DIR" checkout --force FETCH_HEAD); else $(quote_cmd "${clone[@]}" "$REPO" "$REMOTE_DIR"); fi")
elif ((NO_COPY == 0)); then
  TARBALL="${TMPDIR:-/tmp}/hps_jax-$NAME.tar.gz"
  SETUP+=("$(quote_cmd mkdir -p "$REMOTE_DIR") && $(quote_cmd tar -xzf hps_jax.tar.gz -C "$REMOTE_DIR")")
fi
if ((INSTALL)); then
  SETUP+=("$(quote_cmd "$PYTHON" -m pip install -q -U pip)"
          "$(quote_cmd "$PYTHON" -m pip install -q -e "./${REMOTE_DIR}[data]" "jax[tpu]")"
          "$(quote_cmd "$PYTHON" -m pip install -q --no-deps open_clip_torch)")
fi
JOB="cd $RDIR &&"
for kv in "${ENVS[@]+"${ENVS[@]}"}"; do JOB+=" ${kv%%=*}=$(quote "${kv#*=}")"; done
JOB+=" $(quote_cmd "$PYTHON" -m hps_jax.cli "$@")"

rc=0 created=1
step() { ((rc == 0)) || return 0; run "$@" || rc=$?; }

if ((CREATE)); then
  create=("${TPU[@]}" create "$NAME" "${WHERE[@]}" "--accelerator-type=$ACCEL" "--version=$VERSION")
  ((SPOT == 0)) || create+=(--spot)
  step "${create[@]}"
  ((rc == 0)) || created=0
fi
if [[ -n ${TARBALL:-} ]]; then
  step tar -czf "$TARBALL" --exclude=.git --exclude=.venv --exclude=__pycache__ --exclude=.pytest_cache \
    '--exclude=*.egg-info' --exclude=demo_out -C "$SRC" .
  step "${TPU[@]}" scp "$TARBALL" "$NAME:hps_jax.tar.gz" "${WHERE[@]}" --worker=all
  step rm -f "$TARBALL"
fi
if ((${#SETUP[@]})); then
  setup=$(printf ' && %s' "${SETUP[@]}")
  step "${TPU[@]}" ssh "$NAME" "${WHERE[@]}" --worker=all --command "${setup# && }"
fi
step "${TPU[@]}" ssh "$NAME" "${WHERE[@]}" --worker=all --command "$JOB"
if ((DELETE && created)); then
  run "${TPU[@]}" delete "$NAME" "${WHERE[@]}" --quiet || { s=$?; ((rc)) || rc=$s; }
fi
exit "$rc"
