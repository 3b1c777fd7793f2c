#!/usr/bin/env bash
# Every GPU check in one call (at most ~8 minutes on a fresh GPU machine), all figures into one results file:
#   1. setup: a Python with a CUDA torch, trickbag importable (installed from this tree without network if not);
#   2. the GPU-marked tests (pytest -m gpu): CUDA autocast, the fp16 scaler, metrics/losses/mixing on CUDA;
#   3. every benchmark that takes --device (today losses, metrics, mixing) with --device cuda --quick;
#   4. recipes/cifar10_fast on the GPU (precision/layout/compile auto: the probe's choice is in the log).
#
#   bash benchmarks/gpu_suite.sh [--data /path/to/cifar10] [--out gpu_results.md]
#   bash benchmarks/gpu_suite.sh --dry-run      # on a CPU: checks every step's command parses and imports
#
# --dry-run runs each step's cheap stand-in (test collection, each benchmark's --help, the recipe's config
# check) so the script cannot rot without a GPU; tests/test_hardware.py runs it in the normal suite.
# Each step has its own time limit, so one hung step cannot eat the whole budget; a failed step is recorded
# as FAILED with its exit code and the suite goes on (exit code 1 at the end if any step failed).
set -u
cd "$(dirname "$0")/.."

DRY=0
DATA="${TRICKBAG_CIFAR10:-/work/data/cifar10}"
OUT="gpu_results.md"
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --data) DATA="$2"; shift ;;
    --out) OUT="$2"; shift ;;
    *) echo "gpu_suite.sh: unknown argument $1 (use --dry-run, --data DIR, --out FILE)" >&2; exit 2 ;;
  esac
  shift
done

# 1. setup -------------------------------------------------------------------------------------------------
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  for candidate in .venv/bin/python python3 python; do
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c "import torch" >/dev/null 2>&1; then
      PY="$candidate"; break
    fi
  done
fi
if [ -z "$PY" ]; then echo "gpu_suite.sh: no Python with torch found (set PYTHON=...)" >&2; exit 2; fi
if ! "$PY" -c "import trickbag" >/dev/null 2>&1; then
  "$PY" -m pip install --no-deps --no-build-isolation -q -e . || { echo "gpu_suite.sh: cannot install trickbag" >&2; exit 2; }
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
FAILED=0
STARTED=$(date +%s)
{
  echo "# GPU suite $(date -u '+%Y-%m-%d %H:%M UTC')$([ $DRY = 1 ] && echo ' (dry run on CPU: commands checked, no figures)')"
  echo
  echo '```'
  "$PY" -c "import torch, platform; print('torch', torch.__version__, '| CUDA', torch.version.cuda, '| python', platform.python_version()); print('GPU:', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'); print('bf16:', torch.cuda.is_available() and torch.cuda.is_bf16_supported())"
  command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  echo '```'
} > "$OUT"

step() {  # step NAME TIMEOUT_S COMMAND...: run it, append its output's tail and its status to $OUT
  local name="$1" limit="$2"; shift 2
  local began=$(date +%s) log
  log=$(mktemp)
  timeout "$limit" "$@" >"$log" 2>&1
  local rc=$?
  local took=$(( $(date +%s) - began ))
  {
    echo
    if [ $rc -eq 0 ]; then echo "## $name: ok (${took} s)"; else echo "## $name: FAILED (exit $rc after ${took} s)"; fi
    echo '```'
    echo "\$ $*"
    tail -n 40 "$log"
    echo '```'
  } >> "$OUT"
  [ $rc -eq 0 ] || FAILED=1
  echo "$name: exit $rc (${took} s)"
  rm -f "$log"
}

# 2.-4. the steps ------------------------------------------------------------------------------------------
# Every benchmark whose command line has --device (the others are CPU-only by design: cifar10_cpu, ddp_cpu...).
BENCHMARKS=$(grep -l 'add_argument("--device"' benchmarks/*.py | xargs -n1 basename | sed 's/\.py$//' | tr '\n' ' ')
if [ $DRY = 1 ]; then
  step "gpu tests (collected)" 120 "$PY" -m pytest -q -m gpu --collect-only tests
  for bench in $BENCHMARKS; do
    step "benchmarks/$bench.py (--help has --device and --quick)" 60 bash -c \
      "'$PY' benchmarks/$bench.py --help > /tmp/gpu_suite_help.$$ && grep -q -- --device /tmp/gpu_suite_help.$$ && grep -q -- --quick /tmp/gpu_suite_help.$$"
  done
  step "cifar10_fast config on cuda (validated)" 60 "$PY" -c \
    "from trickbag.config import load_config; c = load_config('recipes/cifar10_fast.yaml', ['device=cuda', 'data.root=$DATA']); print(c.precision, c.data.channels_last, c.compile)"
else
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || { echo "gpu_suite.sh: no CUDA device visible (use --dry-run on a CPU)" >&2; exit 2; }
  step "gpu tests" 150 "$PY" -m pytest -q -m gpu tests
  for bench in $BENCHMARKS; do
    step "benchmarks/$bench.py --device cuda --quick" 60 "$PY" "benchmarks/$bench.py" --device cuda --quick
  done
  if [ -d "$DATA/train" ]; then
    step "cifar10_fast on cuda" 180 "$PY" -m trickbag train recipes/cifar10_fast.yaml "data.root=$DATA" \
      device=cuda output_dir=runs/gpu_suite --quiet
    grep -h "precision\|compile" runs/gpu_suite/*/train.log 2>/dev/null | tail -n 3 >> "$OUT"
  else
    echo -e "\n## cifar10_fast on cuda: SKIPPED (no CIFAR-10 folder at $DATA; pass --data DIR)" >> "$OUT"
  fi
fi
echo -e "\ntotal $(( $(date +%s) - STARTED )) s; $([ $FAILED = 0 ] && echo 'all steps ok' || echo 'some steps FAILED')" >> "$OUT"
echo "results: $OUT"
exit $FAILED
