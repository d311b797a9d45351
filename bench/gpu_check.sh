#!/usr/bin/env bash
# Every GPU-only check in one call, for a machine with torch, triton and CUDA but no network:
# the `gpu`-marked tests and the GPU kernel benchmarks. Results go to $1, else $OUT, else ./gpu-results.
#
#   bash bench/gpu_check.sh /path/to/results
#
# About 9 minutes on an H200 (2026-11-27: tests ~3, kernel benchmarks ~1, four 1B pretrain runs ~3;
# each step has a time limit below). Where only a few files may come back (the device tool's $OUT),
# archive the folder: bash bench/gpu_check.sh /tmp/r; tar czf "$OUT/gpu-results.tgz" -C /tmp r
#
# DeepSpeed, pydantic and hjson are not on such machines: build their wheels beforehand into .whl/
# (the two pip commands in docs/cpu-testing.md, "GPU checks from a CPU machine"), carry .whl/ along,
# and this script installs them into /tmp/site (--no-index: nothing is downloaded).
set -uo pipefail

cd "$(dirname "$0")/.."
RESULTS=${1:-${OUT:-gpu-results}}
mkdir -p "$RESULTS"
RESULTS=$(cd "$RESULTS" && pwd)
PY=${PYTHON:-$(command -v python3 || command -v python)}

if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>&1 | tail -3
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
unset TRITON_INTERPRET INSTAR_KERNELS  # the compiled kernels, chosen by the dispatcher

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  $PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'" || exit 2
  for mod in transformers safetensors pydantic yaml deepspeed pytest; do
    $PY -c "import $mod" 2>/dev/null || echo "missing python module: $mod"
  done
} 2>&1 | tee "$RESULTS/env.txt"
[ "${PIPESTATUS[0]}" = 0 ] || { echo "no usable CUDA device: see $RESULTS/env.txt"; exit 2; }

status=0
step() {  # step NAME SECONDS COMMAND...: run (killed after SECONDS), log to $RESULTS/NAME.log, go on
  local name=$1 limit=$2; shift 2
  echo "== $name (at most ${limit}s): $*"
  local t0=$SECONDS
  timeout -k 10 "$limit" "$@" 2>&1 | tee "$RESULTS/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "$name rc=$rc $((SECONDS - t0))s$([ "$rc" = 124 ] && echo ' (timed out)')" | tee -a "$RESULTS/summary.txt"
  [ "$rc" = 0 ] || status=1
}
# Each step's time limit (seconds) scales with GPU_CHECK_SCALE, so a shorter device lease can fit.
scale=${GPU_CHECK_SCALE:-1}
limit() { echo $(( $1 * scale )); }

# Every `gpu`-marked test (tests/test_gpu_pipeline.py trains every stage kind on the GPU; a module that cannot be imported here is reported, the rest still run).
step gpu-tests "$(limit 240)" $PY -m pytest -q -m gpu tests -p no:cacheprovider --continue-on-collection-errors \
  --junitxml="$RESULTS/gpu-tests.xml"

# Kernel benchmarks: FP8 linear vs bf16 (8192^3, target >= 1.3x), fused RMSNorm vs HF (hidden 4096,
# target >= 3x), fused linear + CE memory (target <= 0.3x of HF) and speed.
step kernels "$(limit 70)" $PY bench/kernels.py --gpu --no-cpu --no-results --out "$RESULTS"

# Collage AdamW's fused step: achieved HBM bandwidth, light and plus (target >= 80 % of the peak).
step collage-bandwidth "$(limit 40)" $PY bench/collage_bandwidth.py --out "$RESULTS"

# A ~1.1B Llama pretrain stage (recipes/llama-1b) in bf16, fp8, collage-light and collage-plus:
# tokens/s, MFU and peak memory through instar's own loop.
step pretrain-1b "$(limit 220)" $PY bench/gpu_pretrain.py --steps "${PRETRAIN_STEPS:-15}" --warmup 5 --out "$RESULTS"

echo "results in $RESULTS (summary.txt); exit $status"
exit $status
