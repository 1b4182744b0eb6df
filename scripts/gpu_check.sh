#!/usr/bin/env bash
# The project's GPU check: one command, about 5 minutes on one H200 (estimated: no GPU has run it
# yet); the steps stop at BUDGET_S seconds (default 420), so with the report it stays under 8
# minutes. No network, no DeepSpeed. Run from anywhere:
#
#   OUT=/path/to/results bash scripts/gpu_check.sh              # on a GPU machine
#   OUT=/tmp/smoke bash scripts/gpu_check.sh --cpu-smoke        # every step, tiny sizes, on the CPU (or DEV=cpu)
#
# Needs python3 (or PY=...) with torch (CUDA build), triton, accelerate, tokenizers and pytest;
# uses the project from this checkout (PYTHONPATH), the shipped data/ and a scratch folder.
# COMMIT=... names the code where the checkout has no .git (else `git describe`).
#
# Steps, in this order, each under its own timeout (cut to what is left of the budget; a step
# that fails or times out does not stop the others):
#   env           machine facts: GPU, torch/CUDA/Triton, C compiler and Python.h (Triton's launcher)
#   kernel_tests  the Triton kernel tests (tests/test_triton_*.py but the AOT one), compiled on the GPU
#   kernels       python -m launch.bench kernels (GPT-2 small's stacks, bf16 training step)
#   syncs         host-device syncs of bregtop-vn-v2 steps on GPT-2 small, by file:line
#   lm_bregtop    40 steps of launch.lm on GPT-2 small (bf16 autocast), bregtop-vn-v2
#   lm_adamw      the same with AdamW
#   launches      python -m launch.bench launches --device cuda (ops, kernel launches, host reads per step)
#   precision     python -m launch.bench precision (rotation_precision tf32/bf16 against fp32)
# then report.md. $OUT gets 8 files: report.md, env.txt, logs.txt, kernels.json, syncs.json,
# launches.json, precision.json, lm_metrics.jsonl. The exit status is 0 when every step
# exited 0, else 1.
set -u

MODE=gpu
for arg in "$@"; do
  case "$arg" in
    --cpu-smoke) MODE=cpu-smoke ;;
    -h | --help) awk 'NR > 1 && !/^#/ { exit } NR > 1 { print }' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$arg' (allowed: --cpu-smoke, --help)" >&2; exit 2 ;;
  esac
done
if [ "${DEV:-cuda}" = cpu ]; then MODE=cpu-smoke; fi

cd "$(dirname "$0")/.." || exit 2
ROOT=$PWD
PY=${PY:-python3}
OUT=${OUT:-$ROOT/runs/gpu_check}
COMMIT=${COMMIT:-$(git describe --always --dirty 2>/dev/null || echo unknown)}
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
rm -f "$OUT/report.md" "$OUT/env.txt" "$OUT/logs.txt" "$OUT/kernels.json" "$OUT/syncs.json" \
  "$OUT/launches.json" "$OUT/precision.json" "$OUT/lm_metrics.jsonl"
SCRATCH=$(mktemp -d)
trap 'rm -rf "$SCRATCH"' EXIT
LOGS=$SCRATCH/logs
STEPS=$SCRATCH/steps.tsv
mkdir -p "$LOGS"
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=$SCRATCH/triton
unset BREGTOP_BACKEND BREGTOP_ACCELERATOR_PATHS

if [ "$MODE" = gpu ]; then
  unset TRITON_INTERPRET  # the kernels compiled, not interpreted
  BUDGET_S=${BUDGET_S:-420}
  DEVICE=cuda
  KERNELS_ARGS=()
  SYNCS_ARGS=(--device cuda)
  LM_ARGS=(--preset gpt2 --batch-size 8 --max-steps 40 --eval-every 20 --eval-batches 2)
  LM_PRECISION=${LM_PRECISION:-bf16}
  LAUNCHES_ARGS=(--methods "kl,f-v1,bregtop-vn-v2,bregtop-f-v1")  # CI holds all ten on the CPU
  PRECISION_ARGS=(--device cuda --steps 300 --repeats 3)
  KERNEL_TESTS_K=${KERNEL_TESTS_K:-}
else
  export TRITON_INTERPRET=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # the Triton rows run interpreted
  BUDGET_S=${BUDGET_S:-150}
  DEVICE=cpu
  KERNELS_ARGS=(--quick)
  SYNCS_ARGS=(--device cpu --scale 16 --vocab 512)
  LM_ARGS=(--preset tiny --batch-size 2 --max-steps 4 --eval-every 2 --eval-batches 1 --cpu)
  LM_PRECISION=${LM_PRECISION:-no}
  LAUNCHES_ARGS=(--methods bregtop-vn-v2 --layers 1)
  PRECISION_ARGS=(--device cpu --steps 3 --repeats 1)
  # a few quick kernel tests only: the smoke checks the wiring, CI runs them all
  KERNEL_TESTS_K=${KERNEL_TESTS_K-test_kernel_equals_reference or test_sums_and_momentum or test_every_entry}
fi
DEADLINE=$((SECONDS + BUDGET_S - 10))  # the last 10 s are the report's

# step NAME LIMIT_S COMMAND...: run COMMAND under `timeout`, its output in $LOGS/NAME.log;
# append "NAME<TAB>rc<TAB>seconds<TAB>limit" to $STEPS. Skipped when under 5 s are left.
step() {
  local name=$1 limit=$2 left start rc
  shift 2
  left=$((DEADLINE - SECONDS))
  if [ "$left" -lt 5 ]; then
    printf '%s\tskipped\t0\t%s\n' "$name" "$limit" >>"$STEPS"
    echo "== $name: skipped (the ${BUDGET_S}s budget is spent)"
    return
  fi
  if [ "$limit" -gt "$left" ]; then limit=$left; fi
  echo "== $name (limit ${limit}s)"
  start=$SECONDS
  if declare -F "$1" >/dev/null; then  # a function of this script: run it in a child bash
    timeout -k 10 "$limit" bash -c "$(declare -f "$1"); $(printf '%q ' "$@")" >"$LOGS/$name.log" 2>&1
  else
    timeout -k 10 "$limit" "$@" >"$LOGS/$name.log" 2>&1
  fi
  rc=$?
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" "$limit" >>"$STEPS"
  echo "   rc=$rc in $((SECONDS - start))s; $(tail -n 1 "$LOGS/$name.log")"
}

# env_facts: what the figures depend on (run by `step`, in a child bash under its timeout)
# shellcheck disable=SC2317  # called indirectly, through step
env_facts() {
  echo "mode: $MODE"
  echo "commit: $COMMIT"
  echo "nvidia-smi -L: $(timeout 20 nvidia-smi -L 2>&1 | tr '\n' ' ')"
  echo "nvidia-smi: $(timeout 20 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit \
    --format=csv,noheader 2>&1 | tr '\n' ' ')"
  echo "uname: $(uname -srm)"
  "$PY" scripts/gpu_env.py
}

# lm_metrics METHOD: the run's metrics.jsonl, each row tagged with the method, into lm_metrics.jsonl;
# the run's checkpoint (a few GB for GPT-2 small) is deleted
lm_metrics() {
  if [ -f "$SCRATCH/lm_$1/metrics.jsonl" ]; then
    sed "s/^{/{\"method\": \"$1\", /" "$SCRATCH/lm_$1/metrics.jsonl" >>"$OUT/lm_metrics.jsonl"
  fi
  rm -rf "$SCRATCH/lm_$1/ckpt"
}
export MODE COMMIT PY  # env_facts runs in a child bash

echo "gpu_check: mode $MODE, budget ${BUDGET_S}s, results in $OUT"
step env 60 env_facts
if [ -f "$LOGS/env.log" ]; then cp "$LOGS/env.log" "$OUT/env.txt"; fi
KERNEL_TESTS=()  # every kernel's tests; the ahead-of-time compile test needs no GPU and is left to CI
for f in tests/test_triton_*.py; do [ "$f" = tests/test_triton_aot.py ] || KERNEL_TESTS+=("$f"); done
step kernel_tests 180 "$PY" -m pytest -p no:cacheprovider -rfE --tb=short ${KERNEL_TESTS_K:+-k "$KERNEL_TESTS_K"} \
  "${KERNEL_TESTS[@]}"
step kernels 180 "$PY" -m launch.bench kernels "${KERNELS_ARGS[@]}" --out "$OUT/kernels.json"
step syncs 120 env BREGTOP_ACCELERATOR_PATHS=1 "$PY" scripts/gpu_syncs.py "${SYNCS_ARGS[@]}" --out "$OUT/syncs.json"
for method in bregtop-vn-v2 adamw; do
  if [ "$method" = adamw ]; then limit=100; else limit=150; fi
  step "lm_${method%%-*}" "$limit" env ACCELERATE_MIXED_PRECISION="$LM_PRECISION" "$PY" -m launch.lm \
    --method "$method" "${LM_ARGS[@]}" --ckpt-every 100000 --out "$SCRATCH/lm_$method" --cache-dir "$SCRATCH/cache"
  lm_metrics "$method"
done
# launches: on the device the step really runs on (CUDA: the accelerator paths, the real kernels)
if timeout 30 "$PY" -m launch.bench launches --help 2>/dev/null | grep -q -- --device; then
  step launches 150 env -u TRITON_INTERPRET "$PY" -m launch.bench launches --device "$DEVICE" "${LAUNCHES_ARGS[@]}" \
    --out "$OUT/launches.json"
else
  step launches 150 env -u TRITON_INTERPRET "$PY" -m launch.bench launches "${LAUNCHES_ARGS[@]}" \
    --out "$OUT/launches.json"
fi
step precision 120 "$PY" -m launch.bench precision "${PRECISION_ARGS[@]}" --out "$OUT/precision.json"

# logs.txt: every step's output in order; then report.md (a plain table if the report script fails)
while IFS=$'\t' read -r name rc secs limit; do
  printf '\n===== %s: rc=%s, %ss (limit %ss) =====\n' "$name" "$rc" "$secs" "$limit"
  cat "$LOGS/$name.log" 2>/dev/null
done <"$STEPS" >"$OUT/logs.txt"
if ! timeout 30 "$PY" scripts/gpu_report.py --out "$OUT" --steps "$STEPS" --logs "$LOGS" --mode "$MODE" \
  --commit "$COMMIT" >/dev/null 2>"$LOGS/report.err"; then
  {
    echo "# GPU check ($MODE, commit $COMMIT): scripts/gpu_report.py failed, steps only"
    echo
    echo "| step | rc | seconds | limit |"
    echo "|---|---|---|---|"
    while IFS=$'\t' read -r name rc secs limit; do echo "| $name | $rc | $secs | $limit |"; done <"$STEPS"
    echo
    sed 's/^/    /' "$LOGS/report.err"
  } >"$OUT/report.md"
fi
cat "$OUT/report.md"
echo "gpu_check: ${SECONDS}s; $(find "$OUT" -type f | wc -l) files in $OUT"
if cut -f2 "$STEPS" | grep -qv '^0$'; then exit 1; fi
exit 0
