"""Distributed vs one-process compression speed, alternating runs (issue: scale).

Runs ``torchrun --standalone --nproc-per-node=P compress.py ...`` with T threads per process (A)
and ``python compress.py ...`` with P*T threads (B), alternately (A B A B ...), ``--rounds`` times
each, on the same overrides, and records each run's compression seconds (``report.json``
``timings.compress_s``) and its blocks' wall seconds (``block_seconds``: one timed step per
decoder block, 30 per SmolLM2 run). Writes medians, quartiles and the A/B ratio as JSON.

    python benchmarks/distributed_bench.py OUT.json --rounds 3 calib.nsamples=16

Run it on an otherwise idle machine: both sides share its cores.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _quartiles(xs: list[float]) -> dict[str, float]:
    q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
    return {"n": len(xs), "median": q[1], "q1": q[0], "q3": q[2], "min": min(xs), "max": max(xs)}


def _run(cmd: list[str], threads: int, run_dir: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    t0 = time.perf_counter()
    out = subprocess.run(
        [*cmd, f"hydra.run.dir={run_dir}"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{out.stderr[-3000:]}")
    rep = json.loads((run_dir / "report.json").read_text())
    return {
        "wall_s": round(wall, 2),
        "compress_s": round(rep["timings"]["compress_s"], 2),
        "block_seconds": rep["block_seconds"],
        "ppl": rep["ppl"],
        "run_dir": str(run_dir),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="threads per process on side A")
    ap.add_argument("--work", default="/tmp/distributed_bench")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_intermixed_args()
    base = [
        "compress.py",
        "eval_dense=false",
        "eval.max_windows=2",
        "engine.progress=false",
        "engine.resume=false",
        *a.overrides,
    ]
    torchrun = ["torchrun", "--standalone", f"--nproc-per-node={a.procs}"]
    sides = {
        "A": ([*torchrun, *base], a.threads),
        "B": ([sys.executable, *base], a.threads * a.procs),
    }
    runs: dict[str, list[dict]] = {"A": [], "B": []}
    for r in range(a.rounds):
        for side in ("A", "B") if r % 2 == 0 else ("B", "A"):
            cmd, threads = sides[side]
            res = _run(cmd, threads, Path(a.work) / f"{side}{r}")
            runs[side].append(res)
            print(side, r, res["compress_s"], flush=True)
    summary = {}
    for side in ("A", "B"):
        summary[side] = {
            "compress_s": _quartiles([x["compress_s"] for x in runs[side]]),
            "block_s": _quartiles([b for x in runs[side] for b in x["block_seconds"]]),
        }
    ratio = summary["B"]["compress_s"]["median"] / summary["A"]["compress_s"]["median"]
    block_ratio = summary["B"]["block_s"]["median"] / summary["A"]["block_s"]["median"]
    result = {
        "what": f"A: torchrun {a.procs} processes x {a.threads} thread(s); "
        f"B: 1 process x {a.procs * a.threads} threads; alternating, {a.rounds} rounds",
        "command": " ".join(["python", "benchmarks/distributed_bench.py", *sys.argv[1:]]),
        "overrides": base[1:],
        "summary": summary,
        "speedup_A_vs_B_compress_median": round(ratio, 3),
        "speedup_A_vs_B_block_median": round(block_ratio, 3),
        "runs": runs,
        "written": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    Path(a.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in result if k != "runs"}, indent=1))


if __name__ == "__main__":
    main()
