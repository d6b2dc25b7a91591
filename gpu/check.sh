#!/usr/bin/env bash
# The GPU check: one command on a bare one-GPU machine without network, the kit from gpu/prepare.sh carried
# in .gpu-kit/. Installs the kit, builds grouped_gemm and MegaBlocks there, runs the gpu tests and the quick CPU
# tests, trains Tiny Shakespeare S2MoE and SMoE top-2 in bf16 through the deepspeed launcher with
# backend=local and backend=megablocks (then eval and sample on the GPU), runs the layer benchmark at a
# realistic size, and writes one Markdown report (docs/gpu.md).
#
#   bash gpu/check.sh "$OUT"                  # on the GPU machine; under 8 minutes
#   bash gpu/check.sh --cpu-dry-run DIR       # anywhere: every step that needs no CUDA, on the CPU at tiny sizes
#
# Options: --kit DIR (default .gpu-kit)   --budget SECONDS (default 450; steps that would not fit are skipped)
#   --work DIR (scratch folder, kept; default a temporary one, removed)   --train-steps N (default 300, dry 20)
#   (a step the budget leaves no time for fails as 'not started', so the report shows what was not checked)
#   --unit-tests 'PYTEST ARGS' (default: every test not marked slow or gpu; dry run: two quick modules)
#   --only 'STEP,STEP' (run only these steps, shell patterns allowed, e.g. 'gpu-tests,train-*-megablocks';
#   kit and install always run; a step that needs another's output needs it selected too: data for train-*)
# Environment: PYTHON (the interpreter that has torch; default python3), S2MOE_GPU_CHECK_CACHE (where the kit
#   is installed and DeepSpeed builds its ops; default ~/.cache/s2moe-gpu-check).
# Writes gpu-report.md, check.json and check-logs.tar.gz (every step's log) to the folder (default $OUT).
# Exit status: 0 every step passed (a dry run's CUDA-only steps are skipped), 1 a step failed (the others
# still ran and the report says which), 2 bad arguments or a kit that cannot be used at all.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
KIT="$REPO_ROOT/.gpu-kit"
DEST=${OUT:-}
MODE=gpu
BUDGET=450
WORK=
TRAIN_STEPS=
UNIT_TESTS=
ONLY=
PYTHON=${PYTHON:-python3}

die() {
  echo "check.sh: error: $*" >&2
  exit 2
}

while [ $# -gt 0 ]; do
  case "$1" in
    --cpu-dry-run) MODE=dry; shift ;;
    --kit) KIT=${2:?--kit needs the folder gpu/prepare.sh wrote}; shift 2 ;;
    --budget) BUDGET=${2:?--budget needs seconds}; shift 2 ;;
    --work) WORK=${2:?--work needs a folder}; shift 2 ;;
    --train-steps) TRAIN_STEPS=${2:?--train-steps needs a number}; shift 2 ;;
    --unit-tests) UNIT_TESTS=${2?--unit-tests needs pytest arguments}; shift 2 ;;
    --only) ONLY=${2:?--only needs step names, e.g. gpu-tests,train-*-megablocks}; shift 2 ;;
    -h | --help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    -*) die "unknown option '$1' (see --help)" ;;
    *) DEST=$1; shift ;;
  esac
done

[ -n "$DEST" ] || die "name the folder for the report: bash gpu/check.sh DIR (or set OUT)"
[[ "$BUDGET" =~ ^[0-9]+$ ]] || die "--budget must be whole seconds, got '$BUDGET'"
[ -z "$TRAIN_STEPS" ] || [[ "$TRAIN_STEPS" =~ ^[1-9][0-9]*$ ]] || die "--train-steps must be a positive number, got '$TRAIN_STEPS'"
[ -f "$KIT/kit.json" ] || die "no kit at '$KIT' (no kit.json): run 'bash gpu/prepare.sh' where PyPI is reachable and carry .gpu-kit"
command -v "$PYTHON" > /dev/null || die "'$PYTHON' is not on PATH; set PYTHON to the interpreter that has torch"
"$PYTHON" -c 'import torch' 2> /dev/null || die "'$PYTHON' cannot import torch; set PYTHON to the interpreter that has it"
mkdir -p "$DEST"
DEST=$(cd "$DEST" && pwd)
KIT=$(cd "$KIT" && pwd)

HAS_CUDA=$("$PYTHON" -c 'import torch; print(int(torch.cuda.is_available()))')
if [ "$MODE" = gpu ] && [ "$HAS_CUDA" != 1 ]; then
  die "torch sees no CUDA device here; on a CPU machine run 'bash gpu/check.sh --cpu-dry-run DIR'"
fi
if [ "$MODE" = dry ]; then
  DEVICE=cpu PRECISION=fp32 DS_CONFIG=ds_configs/zero2.json TRAIN_STEPS=${TRAIN_STEPS:-20}
  UNIT_TESTS=${UNIT_TESTS:-tests/test_backends.py tests/test_config.py}
  BENCH_ARGS="--device cpu --dtype fp32 --d-model 64 --d-ff 128 --experts 4 8 --tokens 256 --rounds 2 --warmup 1"
  EVAL_ARGS="--max-batches 4"
else
  DEVICE=cuda PRECISION=bf16 DS_CONFIG=ds_configs/zero2_bf16.json TRAIN_STEPS=${TRAIN_STEPS:-300}
  UNIT_TESTS=${UNIT_TESTS:--m 'not slow and not gpu'}
  BENCH_ARGS="--device cuda --dtype bf16 --d-model 2048 --d-ff 8192 --experts 8 64 --tokens 16384 --rounds 10"
  EVAL_ARGS=""
fi

KEEP_WORK=1
if [ -z "$WORK" ]; then
  WORK=$(mktemp -d "${TMPDIR:-/tmp}/s2moe-gpu-check.XXXXXX")
  KEEP_WORK=0
fi
mkdir -p "$WORK/logs" "$WORK/runs"
WORK=$(cd "$WORK" && pwd)
: > "$WORK/steps.tsv"
# The kit's packages go to a fixed folder (not one per run) and DeepSpeed's JIT-built ops to one of their own:
# on a CPU machine DeepSpeed compiles its shared-memory comm op for every process (1-2 minutes), keyed on
# the path and mtime of its sources, so a per-run folder would rebuild it every run, and sharing the
# project's own TORCH_EXTENSIONS_DIR would make it and the project's venv rebuild each other's.
CACHE=${S2MOE_GPU_CHECK_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/s2moe-gpu-check}
PY_VERSION=$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
SITE="$CACHE/site-py$PY_VERSION"
STARTED=$(date -u '+%Y-%m-%d %H:%M:%S')
START=$SECONDS
DEADLINE=$((SECONDS + BUDGET))
COMMAND="bash gpu/check.sh$([ "$MODE" = dry ] && echo " --cpu-dry-run") (budget ${BUDGET} s, ${TRAIN_STEPS} training steps)"

# Everything the steps run sees the kit's packages first, then the extensions built here, then the repository.
export PYTHONPATH="$SITE:$WORK/ext/grouped_gemm:$WORK/ext/megablocks:$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$SITE/bin:$PATH"
export TORCH_EXTENSIONS_DIR="$CACHE/torch_extensions"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export REPO_ROOT KIT WORK SITE MODE DEVICE PRECISION DS_CONFIG TRAIN_STEPS PYTHON PY_VERSION EVAL_ARGS BENCH_ARGS

# run_step NAME SECONDS FUNCTION [ARGS...]: run FUNCTION in its own bash under a time limit (cut to what is left
# of the budget), its output in logs/NAME.log; record PASS, FAIL or SKIP (exit 77), the seconds and the last
# '::note::' line it printed in steps.tsv. Never fails itself: the check goes on with the next step.
run_step() {
  local name=$1 limit=$2 t0=$SECONDS rc=0 status text left pattern selected=1 patterns=()
  shift 2
  if [ -n "$ONLY" ] && [ "$name" != kit ] && [ "$name" != install ]; then
    selected=0
    IFS=, read -ra patterns <<< "$ONLY"
    for pattern in "${patterns[@]}"; do
      # shellcheck disable=SC2053  # the pattern is meant to match as a glob
      [[ "$name" == $pattern ]] && selected=1
    done
  fi
  if [ "$selected" = 0 ]; then
    printf '%s\tSKIP\t0\tnot selected (--only %s)\n' "$name" "$ONLY" >> "$WORK/steps.tsv"
    return 0
  fi
  left=$((DEADLINE - SECONDS - 20))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 10 ]; then
    printf '%s\tFAIL\t0\tnot started: the %s s budget was spent\n' "$name" "$BUDGET" >> "$WORK/steps.tsv"
    echo "[check] $name: FAIL (not started: out of time)"
    return 0
  fi
  echo "[check] $name: started (limit ${limit} s)"
  timeout -k 10 "$limit" bash -c 'set -euo pipefail; "$@"' _ "$@" > "$WORK/logs/$name.log" 2>&1 || rc=$?
  text=$(grep '^::note:: ' "$WORK/logs/$name.log" | tail -n 1 | cut -c10- || true)
  case $rc in
    0) status=PASS ;;
    77) status=SKIP ;;
    124 | 137) status=FAIL; text="timed out after ${limit} s${text:+; $text}" ;;
    *) status=FAIL; [ -n "$text" ] || text="exit $rc: $(grep -v '^\s*$' "$WORK/logs/$name.log" | tail -n 1 | cut -c1-200)" ;;
  esac
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - t0))" "${text//$'\t'/ }" >> "$WORK/steps.tsv"
  echo "[check] $name: $status ($((SECONDS - t0)) s) $text"
}

note() { echo "::note:: $*"; }

stamp() {  # prefix each line with the time of day (the launcher's own lines have it, the trainer's do not)
  local line
  while IFS= read -r line; do printf '%(%H:%M:%S)T %s\n' -1 "$line"; done
}

step_kit() {
  local dry=()
  [ "$MODE" = dry ] && dry=(--dry-run)
  "$PYTHON" "$REPO_ROOT/gpu/checklib.py" verify-kit "$KIT" --python "$PY_VERSION" "${dry[@]}"
}

step_install() {
  local names=()
  mapfile -t names < <(grep -E '^[A-Za-z0-9_.-]+==' "$REPO_ROOT/gpu/kit-requirements.txt")
  names+=("deepspeed==$("$PYTHON" -c 'import json, sys; print(json.load(open(sys.argv[1]))["pins"]["deepspeed"])' "$KIT/kit.json")")
  rm -rf "$SITE"
  # --no-deps: the GPU image has torch and the rest; pip would otherwise look for them in the kit and stop
  "$PYTHON" -m pip install --no-index --no-deps --no-compile --disable-pip-version-check --target "$SITE" \
    --find-links "$KIT/wheels" "${names[@]}"
  "$PYTHON" -m pip install --no-index --no-deps --no-compile --no-build-isolation --disable-pip-version-check \
    --target "$SITE" "$KIT"/sdists/stanford_stk-*.tar.gz
  # one fixed mtime: a reinstall of the same files must not look like changed sources to the JIT build above
  find "$SITE" -exec touch -h -d '2000-01-01 00:00:00 UTC' {} +
  "$PYTHON" - "$SITE" << 'EOF'
import sys
from pathlib import Path

import deepspeed, hjson, pydantic  # noqa: E401,F401
site = Path(sys.argv[1]).resolve()
assert Path(deepspeed.__file__).resolve().is_relative_to(site), f"deepspeed imported from {deepspeed.__file__}, not the kit"
assert (site / "stk").is_dir(), "stanford-stk did not install"
print(f"::note:: deepspeed {deepspeed.__version__}, pydantic {pydantic.VERSION}, stanford-stk into {site}")
EOF
  command -v deepspeed > /dev/null || { echo "the deepspeed launcher is not on PATH after the install" >&2; return 1; }
  # on a CPU machine DeepSpeed needs its shared-memory comm op in every multi-process job: build it once here
  # (cached in TORCH_EXTENSIONS_DIR), not in two training runs at once; nothing to build where CUDA is the
  # accelerator (world_size=2: the op is what a job of two processes loads)
  "$PYTHON" -c 'from s2moe_ds.comm_op import prepare_comm_op; prepare_comm_op(world_size=2)'
}

# step_build NAME: build the sdist's CUDA extension into a wheel against this machine's torch and nvcc, for
# this GPU's architecture only, and install it into ext/NAME (on PYTHONPATH). A dry run checks the archive.
step_build() {
  local name=$1 sdist arch listing
  sdist=$(ls "$KIT"/sdists/"$name"-*.tar.gz)
  listing=$(tar -tzf "$sdist") || { echo "$sdist is not a readable .tar.gz" >&2; return 1; }
  grep -q '/setup.py$' <<< "$listing" || { echo "$sdist holds no setup.py" >&2; return 1; }
  grep -q '/csrc/.*\.cu$' <<< "$listing" || { echo "$sdist holds no CUDA sources (csrc/*.cu)" >&2; return 1; }
  if [ "$MODE" = dry ]; then
    note "needs CUDA (nvcc and a CUDA torch): not built in a dry run; $(basename "$sdist") is intact and holds setup.py and csrc/*.cu"
    return 77
  fi
  arch=$("$PYTHON" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')
  echo "+ TORCH_CUDA_ARCH_LIST=$arch MAX_JOBS=${MAX_JOBS:-16} pip wheel --no-build-isolation $sdist"
  TORCH_CUDA_ARCH_LIST=$arch MAX_JOBS=${MAX_JOBS:-16} "$PYTHON" -m pip wheel -v --no-index --no-deps --no-build-isolation \
    --disable-pip-version-check -w "$WORK/built/$name" "$sdist"
  "$PYTHON" -m pip install --no-index --no-deps --no-compile --disable-pip-version-check --target "$WORK/ext/$name" \
    "$WORK/built/$name"/*.whl
  note "built for sm_${arch/./} with nvcc $(nvcc --version | sed -n 's/.*release \([0-9.]*\).*/\1/p')"
}

step_data() {
  local out
  out=$("$PYTHON" -m s2moe_ds.cli prepare --no-progress --config "$REPO_ROOT/configs/shakespeare_s2moe.yaml" \
    "data.source=$KIT/data/tinyshakespeare.txt" "data.data_dir=$WORK/data/shakespeare")
  echo "$out"
  note "$(echo "$out" | tail -n 1 | cut -c1-200)"
}

# step_pytest JUNIT_NAME [checklib options] -- PYTEST ARGS...
step_pytest() {
  local junit="$WORK/$1" judge=() extra=() rc=0
  shift
  while [ "$1" != "--" ]; do judge+=("$1"); shift; done
  shift
  # in parallel where pytest-xdist is installed (the GPU image has it), one module per worker
  "$PYTHON" -c 'import xdist' 2> /dev/null && [ "$MODE" = gpu ] && extra+=(-n 6 --dist loadfile)
  "$PYTHON" -c 'import pytest_timeout' 2> /dev/null && extra+=(--timeout 180)
  cd "$REPO_ROOT"
  "$PYTHON" -m pytest -q -rfEs -p no:cacheprovider --junitxml="$junit" "${extra[@]}" "$@" || rc=$?
  "$PYTHON" "$REPO_ROOT/gpu/checklib.py" pytest "$junit" "${judge[@]}"
}

# step_train NAME BACKEND [OVERRIDES...]: Tiny Shakespeare through the deepspeed launcher (one process),
# then eval and sample from the run on the same device; the loss must fall and both must run on DEVICE.
step_train() {
  local name=$1 backend=$2 run="$WORK/runs/$1" port
  shift 2
  if [ "$backend" = megablocks ] && [ "$MODE" = dry ]; then
    note "needs CUDA (backend=megablocks runs grouped_gemm kernels): skipped in a dry run"
    return 77
  fi
  cd "$REPO_ROOT"
  port=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  deepspeed --num_gpus 1 --master_port "$port" --module s2moe_ds.train --config configs/shakespeare_s2moe.yaml \
    "data.data_dir=$WORK/data/shakespeare" "train.out_dir=$run" "train.steps=$TRAIN_STEPS" \
    "train.precision=$PRECISION" "train.ds_config=$DS_CONFIG" "model.moe.backend=$backend" \
    "train.warmup_steps=$((TRAIN_STEPS / 10))" "train.log_interval=$(((TRAIN_STEPS + 29) / 30))" \
    "train.eval_interval=$TRAIN_STEPS" "train.eval_iters=10" "train.save_interval=$TRAIN_STEPS" \
    train.progress=false train.portable_checkpoints=false "$@" 2>&1 | stamp | tee "$run.train.log"
  # shellcheck disable=SC2086  # EVAL_ARGS is a list of options
  "$PYTHON" -m s2moe_ds.cli eval "$run" --device "$DEVICE" --json $EVAL_ARGS | tee "$run.eval.json"
  "$PYTHON" -m s2moe_ds.cli sample "$run" --device "$DEVICE" --prompt "ROMEO:" --tokens 120 | tee "$run.sample.txt"
  "$PYTHON" "$REPO_ROOT/gpu/checklib.py" run "$run" --log "$run.train.log" --eval "$run.eval.json" \
    --sample "$run.sample.txt" --device "$DEVICE"
}

# the benchmark exits 1 when a candidate failed (the rest are still measured and written)
step_bench() {
  local rc=0
  cd "$REPO_ROOT"
  # shellcheck disable=SC2086  # BENCH_ARGS is a list of options
  "$PYTHON" benchmarks/bench_moe_layer_gpu.py $BENCH_ARGS --json "$WORK/bench.json" || rc=$?
  [ -f "$WORK/bench.json" ] || return "$((rc ? rc : 1))"
  "$PYTHON" - "$WORK/bench.json" << 'EOF'
import json, sys
b = json.load(open(sys.argv[1]))
parts = []
for r in b["results"]:
    train = [x for x in r["rows"] if x["mode"] == "train" and not x["name"].startswith("dense")]
    text = f"{r['experts']} experts: "
    if train:
        best = max(train, key=lambda x: x["of_dense"])
        text += f"best fwd+bwd {best['name']} {best['of_dense']:.2f} of dense"
    failed = [n for n, why in r["skipped"].items() if why.startswith("FAILED")]
    missing = len(r["skipped"]) - len(failed)
    text += (f", not measured: {missing}" if missing else "") + (f", FAILED: {', '.join(failed)}" if failed else "")
    parts.append(text)
print("::note:: " + "; ".join(parts))
EOF
  return "$rc"
}

export -f step_kit step_install step_build step_data step_pytest step_train step_bench note stamp

finish() {
  local seconds=$((SECONDS - START))
  "$PYTHON" "$REPO_ROOT/gpu/checklib.py" versions "$WORK/versions.json" --kit "$KIT" > /dev/null 2>&1 || true
  "$PYTHON" "$REPO_ROOT/gpu/checklib.py" report "$WORK" "$DEST/gpu-report.md" --mode "$MODE" --started "$STARTED" \
    --seconds "$seconds" --command "$COMMAND" || echo "check.sh: the report could not be written" >&2
  "$PYTHON" "$REPO_ROOT/gpu/checklib.py" summary "$WORK" "$DEST/check.json" --mode "$MODE" --seconds "$seconds" \
    || echo "check.sh: check.json could not be written" >&2
  (
    shopt -s nullglob
    cd "$WORK" && tar -czf "$DEST/check-logs.tar.gz" logs steps.tsv runs/*.log runs/*.json runs/*.txt \
      runs/*/metrics.jsonl runs/*/config.yaml runs/*/check-summary.json
  ) || echo "check.sh: could not pack the logs" >&2
  [ "$KEEP_WORK" = 1 ] || rm -rf "$WORK"
  cat "$DEST/gpu-report.md" 2> /dev/null || true
  echo "[check] done in ${seconds} s: $DEST/gpu-report.md, check.json, check-logs.tar.gz"
}

mapfile -t UNIT_ARGS < <("$PYTHON" -c 'import shlex, sys; print("\n".join(shlex.split(sys.argv[1])))' "$UNIT_TESTS")
echo "[check] mode=$MODE device=$DEVICE python=$PYTHON ($PY_VERSION) kit=$KIT work=$WORK budget=${BUDGET}s"
run_step kit 60 step_kit
if ! grep -q $'^kit\tPASS' "$WORK/steps.tsv"; then
  echo "check.sh: the kit at $KIT cannot be used (see the kit step above); nothing else runs" >&2
  finish
  exit 2
fi
run_step install 300 step_install

# The CUDA extensions build in the background while the steps that do not need them run: the CPU tests,
# the data and the two backend=local runs (all at once: the GPU and 16 cores have room for them).
run_step build-grouped_gemm 360 step_build grouped_gemm &
builds=("$!")
run_step build-megablocks 360 step_build megablocks &
builds+=("$!")
run_step unit-tests 300 step_pytest junit-unit.xml -- "${UNIT_ARGS[@]}" &
unit=$!
run_step data 60 step_data
run_step train-s2moe-local 240 step_train s2moe-local local &
local_runs=("$!")
run_step train-smoe-top2-local 240 step_train smoe-top2-local local \
  model.moe.s2moe.enabled=false model.moe.k=2 model.moe.eval_k=2 &
local_runs+=("$!")
wait "${builds[@]}" "${local_runs[@]}"

GPU_JUDGE=(--all-must-run)
[ "$MODE" = dry ] && GPU_JUDGE=(--expect-skipped)
run_step gpu-tests 240 step_pytest junit-gpu.xml "${GPU_JUDGE[@]}" -- -m gpu tests/
run_step train-s2moe-megablocks 240 step_train s2moe-megablocks megablocks &
mb_runs=("$!")
run_step train-smoe-top2-megablocks 240 step_train smoe-top2-megablocks megablocks \
  model.moe.s2moe.enabled=false model.moe.k=2 model.moe.eval_k=2 &
mb_runs+=("$!")
wait "${mb_runs[@]}" "$unit"
# the benchmark last, alone on the GPU, so nothing else moves its timings
run_step bench 240 step_bench

FAILED=$(grep -c $'\tFAIL\t' "$WORK/steps.tsv" || true)
finish
if [ "$FAILED" != 0 ]; then
  echo "check.sh: $FAILED step(s) failed; the report says which and holds the end of their logs" >&2
  exit 1
fi
