#!/usr/bin/env bash
# The oldest transformers pyproject.toml allows (5.0.0, deploy/hf_quantizer.SUPPORTED) against
# the loaders: a throw-away venv that sees the installed packages and overrides transformers
# (and what that version pins). The newest is what the main install resolved.
# Usage (from the repository root, after the README's install): bash scripts/test_oldest_transformers.sh
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${TMPDIR:-/tmp}/slim-lightning-transformers-5.0"
rm -rf "$VENV"
python -m venv --system-site-packages "$VENV"
# transformers 5.0.0 imports Hugging Face's optional `kernels` package when it is installed (5.25
# requires it); kernels >= 0.12 rejects 5.0.0's hub mapping at import ("Either a revision or a
# version must be specified"), so the venv gets the kernels release of 5.0.0's time
"$VENV/bin/python" -m pip install -q "transformers==5.0.0" "kernels==0.11.7" 2>&1 | grep -v "is ignored" || true
"$VENV/bin/python" -c "import transformers; assert transformers.__version__ == '5.0.0', transformers.__version__"
"$VENV/bin/python" -m pytest -q tests/test_hf_quantizer.py tests/test_loader_trust.py tests/test_packed.py
# discovery, per-block replay, fused experts and the pack/reload matrix (one method) on 5.0.0 too
"$VENV/bin/python" -m pytest -q tests/test_experts.py tests/test_any_arch.py \
    -k "replay or alternating or experts or (compress_pack and slim_q_fast)"
rm -rf "$VENV"
