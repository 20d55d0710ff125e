#!/usr/bin/env bash
# One-shot benchmark suite for the day a GPU is lent: every bench at the paper's settings, JAX against the PyTorch
# reference in the same process, one JSON per result, a markdown summary with MFU from XLA's FLOP counts.
#
#   bash bench/gpu_suite.sh                 # on the GPU machine, from the repo root (results: bench/results/)
#   bash bench/gpu_suite.sh --cpu-smoke     # the same script on this CPU at tiny sizes (tests/test_gpu_suite.py)
#
# Options: --outdir DIR (default bench/results, or bench/results/smoke with --cpu-smoke), --budget SECONDS (whole
# suite; default 540 on a GPU, 900 for the smoke run), --only NAME[,NAME] (a subset of the benches below).
# Environment: PYTHON (default .venv/bin/python when present, else python3), HPS_SITE (where missing wheels are
# installed, default /tmp/hps_jax_site, put on PYTHONPATH), XLA_PYTHON_CLIENT_MEM_FRACTION (GPU: default 0.5, so
# the PyTorch reference that runs in the same process after JAX has the other half of the memory).
#
# Steps: (1) install from .whl/ (`make wheelhouse` here, then carry .whl to the machine) the wheels whose
# distribution is missing (--no-index --no-deps: the wheelhouse lists every missing dependency explicitly);
# (2) record versions and the device (env_TAG.json; TAG from the device, e.g. h200); (3) each bench under
# `timeout`: its own cap, never more than what is left of the suite budget (a bench that would start with under
# 20 s left is recorded as skipped), a failed or timed-out bench is recorded and the suite goes on; logs in
# OUTDIR/logs/; (4) gpu_suite_TAG.md + gpu_suite_TAG.json (bench/gpu_suite_summary.py) check every result file
# (expected keys, finite numbers). Exit status: 0 when no bench failed, 1 otherwise.
#
# Paper settings (GPU): scoring CLIP ViT-L/14 (HPS v1) and ViT-H/14 (HPS v2) at 224 px, batch 64, bf16 and fp32;
# the preference train step on ViT-L/14 (batch 5 prompts x 4 images, last 10 vision / 6 text blocks trainable,
# AdamW) in bf16; the SD v1.4 UNet train step at 64x64 latents (512² images), batch 8, bf16; the LoRA step (rank
# 32, batch 40, bf16 with per-block remat: what batch 40 needs); 50-step PNDM sampling at 512², CFG 7.5, negative
# prompt, batch 4, bf16; FID Inception features (batch 200) and the 2048-d Frechet distance. Attention is 'auto'
# everywhere: cuDNN flash attention wherever cuDNN takes the shapes in bf16 (the JSONs' attention_impls say
# which ran), XLA elsewhere.
# (the whole body is one { ... } block: bash reads it completely before running, so editing this file during a
# run cannot change the run)
{
set -u -o pipefail
cd "$(dirname "$0")/.."

MODE=gpu
OUTDIR=""
BUDGET=""
ONLY=""
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu-smoke) MODE=smoke ;;
    --outdir) OUTDIR=$2; shift ;;
    --budget) BUDGET=$2; shift ;;
    --only) ONLY=$2; shift ;;
    -h|--help) sed -n '2,/^# (the whole body/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_suite.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if [ "$MODE" = smoke ]; then
  OUTDIR=${OUTDIR:-bench/results/smoke}; BUDGET=${BUDGET:-900}
  export JAX_PLATFORMS=cpu CUDA_VISIBLE_DEVICES=""
else
  OUTDIR=${OUTDIR:-bench/results}; BUDGET=${BUDGET:-540}
  # JAX preallocates this share of the GPU; the PyTorch reference in the same process gets the rest
  export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.5}
fi
mkdir -p "$OUTDIR/logs"
START=$(date +%s)
DEADLINE=$((START + BUDGET))
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
log() { echo "[gpu_suite $(( $(date +%s) - START ))s] $*"; }

# ---- 1. wheels: install what is missing -------------------------------------------------------------------
SITE=${HPS_SITE:-/tmp/hps_jax_site}
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
if ls .whl/*.whl >/dev/null 2>&1; then
  MISSING=$("$PYTHON" -m bench.gpu_suite_summary missing-wheels .whl) || MISSING=""
  if [ -n "$MISSING" ]; then
    log "installing $(echo "$MISSING" | wc -w) wheels into $SITE: $(for w in $MISSING; do basename "$w"; done | tr '\n' ' ')"
    # shellcheck disable=SC2086
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
      --target "$SITE" $MISSING || log "WARNING: pip install failed; benches needing those packages will fail"
  else
    log "every wheel in .whl/ is already installed"
  fi
else
  log "no .whl/ wheelhouse here: using what is installed (make wheelhouse builds it)"
fi

# ---- 2. environment and device tag -------------------------------------------------------------------------
ENVTMP="$OUTDIR/env.json"
TAG=$("$PYTHON" -m bench.gpu_suite_summary env "$ENVTMP" 2>"$OUTDIR/logs/env.log" | tail -1)
if [ -z "$TAG" ]; then
  log "could not start jax (see $OUTDIR/logs/env.log):"; tail -5 "$OUTDIR/logs/env.log"; exit 1
fi
[ "$MODE" = smoke ] && TAG="${TAG}_smoke"
mv "$ENVTMP" "$OUTDIR/env_$TAG.json"
RUNS="$OUTDIR/gpu_suite_$TAG.runs.jsonl"
: > "$RUNS"
log "device tag $TAG, budget ${BUDGET}s, results in $OUTDIR"

# ---- 3. benches ----------------------------------------------------------------------------------------------
selected() { [ -z "$ONLY" ] || [[ ",$ONLY," == *",$1,"* ]]; }

# run_bench NAME KIND CAP_SECONDS "OUTPUT[ OUTPUT...]" -- python -m bench.X ARGS...
run_bench() {
  local name=$1 kind=$2 cap=$3 outs=$4; shift 5
  selected "$name" || return 0
  local o outargs=()
  for o in $outs; do outargs+=(--output "$o"); rm -f "$o"; done
  local left=$((DEADLINE - $(date +%s)))
  if [ "$left" -lt 20 ]; then
    log "$name: skipped (suite budget spent)"
    "$PYTHON" -m bench.gpu_suite_summary record "$RUNS" --name "$name" --kind "$kind" "${outargs[@]}" \
      --skipped "suite budget spent (${left}s left)" -- "$@"
    return 0
  fi
  local t=$(( cap < left ? cap : left ))
  log "$name: start (timeout ${t}s): $*"
  local t0 rc ms secs
  t0=$(date +%s%N)
  timeout --signal=TERM --kill-after=15 "$t" "$@" >"$OUTDIR/logs/$name.log" 2>&1
  rc=$?
  ms=$(( ($(date +%s%N) - t0) / 1000000 ))
  secs="$((ms / 1000)).$(printf %03d $((ms % 1000)))"
  log "$name: exit $rc after ${secs}s"
  [ "$rc" -ne 0 ] && tail -3 "$OUTDIR/logs/$name.log" | sed 's/^/    /'
  "$PYTHON" -m bench.gpu_suite_summary record "$RUNS" --name "$name" --kind "$kind" --rc "$rc" --seconds "$secs" \
    --timeout "$t" --log "$OUTDIR/logs/$name.log" "${outargs[@]}" -- "$@"
}

O=$OUTDIR
PYM="$PYTHON -m"
if [ "$MODE" = gpu ]; then
  # paper settings on the GPU (see the header); caps sized so the whole suite fits the budget
  SCORE_L="--model vit_l14 --batch 64 --iters 5 --warmup 1"
  SCORE_H="--model vit_h14 --batch 64 --iters 5 --warmup 1"
  TRAIN_PREF="--model vit_l14 --batch 5 --images 4 --dtype bfloat16 --iters 5 --warmup 1"
  UNET="--preset sd14 --batch 8 --latent-size 64 --dtype bfloat16 --iters 5 --warmup 1"
  LORA="--preset sd14 --batch 40 --resolution 512 --rank 32 --dtype bfloat16 --remat --iters 3 --warmup 1"
  SAMPLE="--preset sd14 --steps 50 --resolution 512 --batch 4 --dtype bfloat16 --iters 2 --warmup 1"
  FID="--batch 200 --size 256 --iters 3 --warmup 1 --frechet-iters 2"
  E2E="--model vit_l14 --batch 64 --n 1024 --size 512 --workers 16 --worker-type process --dtype bfloat16 --iters 3"
  CAP_SCORE_L=100; CAP_SCORE_H=130; CAP_PREF=90; CAP_UNET=110; CAP_FID=70; CAP_LORA=150; CAP_SAMPLE=150; CAP_E2E=90
else
  # the same benches and switches at toy sizes (every SD 1.x block type, CLIP 'tiny'), 1 timed iteration
  SCORE_L="--model tiny --batch 2 --iters 1 --warmup 1"
  SCORE_H="--model tiny --batch 2 --iters 1 --warmup 1"
  TRAIN_PREF="--model tiny --batch 1 --images 2 --dtype bfloat16 --iters 1 --warmup 1"
  UNET="--preset tiny --batch 1 --latent-size 8 --dtype bfloat16 --iters 1 --warmup 1"
  LORA="--preset tiny --batch 1 --resolution 32 --rank 4 --dtype bfloat16 --remat --iters 1 --warmup 1"
  SAMPLE="--preset tiny --steps 2 --resolution 32 --batch 1 --dtype bfloat16 --iters 1 --warmup 1"
  FID="--batch 2 --size 64 --iters 1 --warmup 1 --frechet-dim 64 --frechet-iters 1"
  E2E="--model tiny --batch 2 --n 8 --size 64 --workers 2 --iters 1"
  CAP_SCORE_L=180; CAP_SCORE_H=180; CAP_PREF=180; CAP_UNET=180; CAP_LORA=180; CAP_SAMPLE=180; CAP_FID=180
  CAP_E2E=180
fi

# shellcheck disable=SC2086
{
run_bench score_vit_l14 score $CAP_SCORE_L "$O/score_vit_l14_bf16_$TAG.json $O/score_vit_l14_fp32_$TAG.json" -- \
  $PYM bench.score $SCORE_L --dtype bfloat16,float32 --attention auto --out "$O/score_vit_l14_{dtype}_$TAG.json"
run_bench score_vit_h14 score $CAP_SCORE_H "$O/score_vit_h14_bf16_$TAG.json $O/score_vit_h14_fp32_$TAG.json" -- \
  $PYM bench.score $SCORE_H --dtype bfloat16,float32 --attention auto --out "$O/score_vit_h14_{dtype}_$TAG.json"
run_bench train_preference train_preference $CAP_PREF "$O/train_preference_bf16_$TAG.json" -- \
  $PYM bench.train_preference $TRAIN_PREF --attention auto --out "$O/train_preference_bf16_$TAG.json"
run_bench unet_step unet_step $CAP_UNET "$O/unet_step_bf16_$TAG.json" -- \
  $PYM bench.unet_step $UNET --attention auto --out "$O/unet_step_bf16_$TAG.json"
run_bench fid fid $CAP_FID "$O/fid_$TAG.json" -- \
  $PYM bench.fid $FID --out "$O/fid_$TAG.json"
run_bench train_lora train_lora $CAP_LORA "$O/train_lora_bf16_$TAG.json" -- \
  $PYM bench.train_lora $LORA --attention auto --out "$O/train_lora_bf16_$TAG.json"
run_bench sample sample $CAP_SAMPLE "$O/sample_bf16_$TAG.json" -- \
  $PYM bench.sample $SAMPLE --out "$O/sample_bf16_$TAG.json"
}

# scoring end to end from image files: bench/score_e2e.py (another engineer's script); only the flags it has
if selected score_e2e; then
  if [ -f bench/score_e2e.py ]; then
    HELP=$("$PYTHON" -m bench.score_e2e --help 2>/dev/null || true)
    ARGS=()
    set -- $E2E
    while [ $# -gt 0 ]; do  # FLAG [VALUE] pairs: kept when --help names FLAG
      flag=$1; val=()
      if [ $# -gt 1 ] && [[ "$2" != --* ]]; then val=("$2"); shift; fi
      shift
      if echo "$HELP" | grep -qE -- "(^|[^a-z-])$flag([^a-z-]|$)"; then ARGS+=("$flag" "${val[@]}"); fi
    done
    run_bench score_e2e score_e2e $CAP_E2E "$O/score_e2e_$TAG.json" -- \
      $PYM bench.score_e2e "${ARGS[@]}" --out "$O/score_e2e_$TAG.json"
  else
    log "score_e2e: skipped (bench/score_e2e.py does not exist yet)"
    "$PYTHON" -m bench.gpu_suite_summary record "$RUNS" --name score_e2e --kind score_e2e \
      --skipped "bench/score_e2e.py does not exist in this checkout"
  fi
fi

# ---- 4. summary -----------------------------------------------------------------------------------------------
WALL=$(( $(date +%s) - START ))
"$PYTHON" -m bench.gpu_suite_summary summarize "$RUNS" --env "$OUTDIR/env_$TAG.json" --mode "$MODE" --tag "$TAG" \
  --budget "$BUDGET" --wall "$WALL" --md "$OUTDIR/gpu_suite_$TAG.md" --json "$OUTDIR/gpu_suite_$TAG.json"
rc=$?
log "done in ${WALL}s: $OUTDIR/gpu_suite_$TAG.md"
exit $rc
}
