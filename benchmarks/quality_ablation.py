"""Quality levers, each alone and together: perplexity and compression time of compress.py runs.

Every config runs in its own process, one after the other (nothing else should run on the
machine), with the same calibration, evaluation text and thread count; the table is written to
``--json`` with each run's command, perplexity, dense perplexity, ratio and compression seconds.

    python benchmarks/quality_ablation.py --json benchmarks/results/quality_ablation_smollm2.json
    python benchmarks/quality_ablation.py --configs oneshot,block --threads 2   # a subset
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# name -> compress.py overrides (on top of the default method, slim_q 2:4 + 4-bit)
CONFIGS: dict[str, list[str]] = {
    "oneshot": ["reconstruct=none"],
    "block": ["reconstruct=block"],
    "block_no_weights": ["reconstruct=block", "reconstruct.train_weights=false"],
    "block_no_norms": ["reconstruct=block", "reconstruct.train_norms=false"],
    "block_mix": ["reconstruct=block", "reconstruct.target_mix=0.5"],
    "unstructured_oneshot": ["sparsity=unstructured", "reconstruct=none"],
    "unstructured_block": ["sparsity=unstructured", "reconstruct=block"],
}


def run_one(name: str, overrides: list[str], threads: int, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as d:
        cmd = [
            sys.executable,
            "compress.py",
            *overrides,
            *extra,
            "engine.progress=false",
            "export.servable=false",
            f"hydra.run.dir={d}/run",
        ]
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        t0 = time.perf_counter()
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if p.returncode != 0:
            return {"name": name, "overrides": overrides, "error": p.stderr[-2000:]}
        r = json.loads((Path(d) / "run" / "report.json").read_text())
    ((ev, ppl),) = r["ppl"].items()
    dense = r["ppl_dense"].get(ev)
    summ = r.get("layers_summary", {})
    return {
        "name": name,
        "overrides": overrides + extra,
        "eval": ev,
        "ppl": ppl,
        "ppl_dense": dense,
        "ratio": None if not dense else ppl / dense,
        "compress_s": r["timings"].get("compress_s"),
        "wall_s": wall,
        "bits_per_weight": summ.get("bits_per_weight"),
        "sparsity": summ.get("sparsity"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    ap.add_argument(
        "extra", nargs="*", help="overrides added to every run (e.g. calib.nsamples=128)"
    )
    a = ap.parse_args()
    rows = []
    for name in a.configs.split(","):
        row = run_one(name, CONFIGS[name], a.threads, a.extra)
        rows.append(row)
        print(json.dumps(row), flush=True)
    out = {
        "command": " ".join(["python", "benchmarks/quality_ablation.py", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, CPU only",
        "threads": a.threads,
        "model": "SmolLM2-135M-Instruct (embedded GGUF Q4_1 weights)",
        "rows": rows,
    }
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
