#!/usr/bin/env bash
# The one entry point of the GPU check (issue: the whole GPU path in one prepared run):
#   bash scripts/gpu_check.sh            # on a CUDA machine: tests, compress, train vs QLoRA,
#                                        # generation, kernel table -> benchmarks/results/*.json
#   bash scripts/gpu_check.sh --dry-run  # the same steps on CPU, tiny shapes (tested in CI)
# Makes slim_lightning importable first (offline: wheels from .whl/ for what the image lacks,
# then an editable install without network), then runs scripts/gpu_check.py.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if ! $PY -c "import slim_lightning" 2>/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-build-isolation -e . || {
    echo "editable install failed"; exit 2; }
fi
exec $PY scripts/gpu_check.py "$@"
