"""Quality levers, each alone and together: perplexity and compression time of compress.py runs.

Every config runs in its own process, one after the other (nothing else should run on the
machine), with the same calibration, evaluation text and thread count; the table is written to
``--json`` with each run's command, perplexity, dense perplexity, ratio and compression seconds.

    python benchmarks/quality_ablation.py --json benchmarks/results/quality_ablation_smollm2.json
    python benchmarks/quality_ablation.py --configs oneshot,block --threads 2   # a subset
    python benchmarks/quality_ablation.py --configs methods --threads 1 \
        --json benchmarks/results/methods_smollm2.json calib.nsamples=16 eval.max_windows=16

``--configs methods`` is every ``method_*`` config (the README's method table). The JSON is
rewritten after every run, so an interrupted sweep keeps its finished rows.
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

# the default method before issue 34's levers (2026-12-07)
OLD = ["lowrank.alternate=0", "lowrank.permute=false", "reconstruct.epochs=2"]
# name -> compress.py overrides (on top of the default method, slim_q 2:4 + 4-bit)
CONFIGS: dict[str, list[str]] = {
    "oneshot": ["reconstruct=none"],
    "block": ["reconstruct=block"],
    "block_1epoch": ["reconstruct=block", "reconstruct.epochs=1"],
    "block_no_weights": ["reconstruct=block", "reconstruct.train_weights=false"],
    "block_no_norms": ["reconstruct=block", "reconstruct.train_norms=false"],
    "block_mix": ["reconstruct=block", "reconstruct.target_mix=0.5"],
    "unstructured_oneshot": ["sparsity=unstructured50", "reconstruct=none"],
    "unstructured_block": ["sparsity=unstructured50", "reconstruct=block"],
    # issue 34's levers, each alone on top of the default before them, then stacked (= the
    # default since 2026-12-07: alternate=1, permute=auto, epochs=3)
    "levers_none": OLD,
    "alternate1": [*OLD, "lowrank.alternate=1"],
    "permute": [*OLD, "lowrank.permute=true"],
    "mask_refine": [*OLD, "reconstruct.mask=refine"],
    "epochs3": [*OLD, "reconstruct.epochs=3"],
    "calib128_1epoch": [*OLD, "calib.nsamples=128", "reconstruct.epochs=1"],
    "stack": [],
}
# the README's method table: every method at its own defaults, one process each
METHODS = (
    "dense",
    "slim_q",
    "slim_q_fast",
    "sparsegpt_optq",
    "slim",
    "wanda_absmax",
    "naive_lora",
    "magnitude_absmax",
)
CONFIGS.update({f"method_{m}": [f"method={m}"] for m in METHODS})
CONFIGS.update(
    {
        f"method_{m}_unstructured50": [f"method={m}", "sparsity=unstructured50"]
        for m in ("slim_q", "slim_q_fast", "sparsegpt_optq")
    }
)


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
        return row_from_report(name, overrides + extra, Path(d) / "run" / "report.json", wall)


def row_from_report(name: str, overrides: list[str], report: Path, wall: float | None) -> dict:
    """One table row from a finished run's ``report.json``."""
    r = json.loads(Path(report).read_text())
    ((ev, ppl),) = r["ppl"].items()
    dense = r["ppl_dense"].get(ev)
    summ = r.get("layers_summary", {})
    recon = [x for x in r.get("layers", []) if "recon_err_before" in x]
    return {
        "name": name,
        "overrides": overrides,
        "eval": ev,
        "ppl": ppl,
        "ppl_dense": dense,
        "ratio": None if not dense else ppl / dense,
        "compress_s": r["timings"].get("compress_s"),
        "wall_s": wall,
        "bits_per_weight": summ.get("bits_per_weight"),
        "sparsity": summ.get("sparsity"),
        "recon_err_before_mean": _mean([x["recon_err_before"] for x in recon]),
        "recon_err_after_mean": _mean([x["recon_err_after"] for x in recon]),
        "peak_rss_gib": (r.get("memory") or {}).get("peak_rss_gib"),
        "versions": r.get("versions"),
    }


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    ap.add_argument(
        "extra", nargs="*", help="overrides added to every run (e.g. calib.nsamples=128)"
    )
    ap.add_argument(
        "--from-reports",
        nargs="+",
        default=None,
        metavar="NAME=REPORT",
        help="build the table from finished runs' report.json instead of running them",
    )
    a = ap.parse_args()
    rows = []
    for item in a.from_reports or []:
        name, _, path = item.partition("=")
        rows.append(row_from_report(name, CONFIGS.get(name, []), Path(path), None))
    names = [c for c in CONFIGS if c.startswith("method_")] if a.configs == "methods" else None
    names = names or a.configs.split(",")
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        ap.error(f"--configs: unknown {unknown}; known: methods, {', '.join(CONFIGS)}")
    out = {
        "command": " ".join(["python", "benchmarks/quality_ablation.py", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, CPU only",
        "threads": a.threads,
        "model": "SmolLM2-135M-Instruct (embedded GGUF Q4_1 weights)",
        "rows": rows,
    }

    def write() -> None:
        if a.json:
            Path(a.json).write_text(json.dumps(out, indent=1) + "\n")

    for name in names if a.from_reports is None else []:
        row = run_one(name, CONFIGS[name], a.threads, a.extra)
        rows.append(row)
        print(json.dumps(row), flush=True)
        write()
    write()


if __name__ == "__main__":
    main()
