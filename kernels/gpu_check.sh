#!/usr/bin/env bash
# The GPU issue's first device call, as one script (target: under 8 minutes on an H100/H200):
#   1. makes slim_lightning importable there (no network: an offline editable install, with
#      wheels from .whl/ for anything the image lacks; see the device tool's README),
#   2. runs `pytest -m gpu` with autotuning off (SLIM_KERNEL_FIXED=1: one compile per path),
#   3. benchmarks 4096x11008, 11008x4096 and 4096x4096 at batch 1 and 16 (fixed configs),
#   4. writes kernels/results/<gpu>-<date>.json (+ the logs) and copies them to $OUT.
# Run from the repository root:  bash kernels/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 SLIM_KERNEL_FIXED=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
RES=kernels/results
mkdir -p "$RES"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if ! $PY -c "import slim_lightning.kernels" 2>/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-build-isolation -e . || {
    echo "editable install failed"; exit 2; }
fi
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" || exit 3
GPU=$($PY -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))")
DATE=$(date -u +%F)
STEM="$RES/${GPU}-${DATE}"
t0=$(date +%s)
timeout 300 $PY -m pytest -m gpu -q -p no:cacheprovider -x --no-header -rfE tests/test_kernels.py \
  2>&1 | tee "$STEM-tests.log"
SUMMARY=$(grep -Eo '[0-9]+ (passed|failed|skipped|error)[^=]*' "$STEM-tests.log" | tail -1)
echo "gpu tests: ${SUMMARY:-none ran} ($(( $(date +%s) - t0 )) s)"
timeout 240 $PY -m slim_lightning.kernels.benchmark --shapes 4096x11008,11008x4096,4096x4096 \
  --batches 1,16 --json "$STEM.json" --gpu-tests "${SUMMARY:-none ran}" 2>&1 | tee "$STEM-bench.md"
echo "total $(( $(date +%s) - t0 )) s"
if [ -n "${OUT:-}" ]; then cp "$STEM"* "$OUT"/ 2>/dev/null; fi
