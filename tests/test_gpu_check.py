"""scripts/gpu_check.py --dry-run: every step of the GPU check runs on CPU with tiny shapes, so
the script is known to work before it first meets a GPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from gpu_check import compare_ppl, tok_per_s  # noqa: E402

STEPS = ["tests", "compress", "train", "qlora_and_dense_generate", "generate", "kernels"]


def test_dry_run_runs_every_step_and_writes_one_record(tmp_path):
    p = subprocess.run(
        [sys.executable, "scripts/gpu_check.py", "--dry-run", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    (rec_file,) = tmp_path.glob("gpu_check-cpu-dry-run-*.json")
    rec = json.loads(rec_file.read_text())
    status = {s["name"]: s["status"] for s in rec["steps"]}
    assert list(status) == STEPS
    failed = {s["name"]: s["output_tail"][-1500:] for s in rec["steps"] if s["status"] != "ok"}
    assert not failed, failed
    assert p.returncode == 0 and rec["ok"] is True and rec["dry_run"] is True
    by = {s["name"]: s for s in rec["steps"]}
    assert by["compress"]["ppl"] > 1 and by["compress"]["vs_cpu"]["agrees"] is True
    assert by["train"]["train"]["steps"] == 3
    assert by["generate"]["tok_per_s"] > 0
    assert "gen_dense" in by["qlora_and_dense_generate"]["table"]
    assert rec["versions"]["torch"]
    for s in rec["steps"]:
        assert s["seconds"] >= 0 and "device_peak_mib" in s


def test_ppl_agreement_and_rate_parsing():
    assert compare_ppl(26.2, 26.157)["agrees"] is True
    assert compare_ppl(27.0, 26.157)["agrees"] is False
    assert compare_ppl(None, 26.0)["agrees"] is None
    assert tok_per_s("[12 new tokens in 0.50 s: 24.00 tok/s | prompt 5]") == 24.0
    assert tok_per_s("no rate here") is None
