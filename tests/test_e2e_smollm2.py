"""Slow end-to-end runs on the real embedded model (SmolLM2-135M): ``python -m pytest -m slow``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from slim_lightning import load_compressed
from slim_lightning.data.config import EvalConfig
from slim_lightning.data.evaluation import make_eval_windows, perplexity
from slim_lightning.nn.backend import held_bytes
from slim_lightning.nn.linear import SLiMLinear

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_default_compress_run_on_smollm2(tmp_path):
    """``python compress.py`` (default: slim_q, 2:4, 4-bit, 4-bit adapters) on the embedded model,
    with a smaller evaluation to keep it to a few minutes; the packed checkpoint reproduces it."""
    cmd = [sys.executable, "compress.py", "eval.max_windows=20", f"hydra.run.dir={tmp_path}"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    dense, comp = report["ppl_dense"]["embedded"], report["ppl"]["embedded"]
    assert 5 < dense < 60  # a real LM on English technical prose
    assert dense < comp < 3 * dense  # compressed, but far from broken
    assert report["size"]["ratio_vs_fp16"] <= 0.30
    assert len(report["layers"]) == 30 * 7

    model, tok, _ = load_compressed(tmp_path / "packed")
    windows = make_eval_windows(tok, EvalConfig(max_windows=20))
    ppl = perplexity(model, windows, progress=False)["ppl"]
    assert ppl == pytest.approx(comp, rel=0.005)

    # native transformers loading (issue 11): same perplexity, packed bytes only
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "packed")
    assert perplexity(hf, windows, progress=False)["ppl"] == pytest.approx(comp, rel=0.005)
    slim = [m for m in hf.modules() if isinstance(m, SLiMLinear)]
    n_dense = sum(m.in_features * m.out_features for m in slim) + sum(
        p.numel() for n, p in hf.named_parameters() if ".lora_" not in n
    )  # the dense model: compressed weights at full size + embeddings and norms
    assert held_bytes(hf) <= 0.45 * 4 * n_dense
