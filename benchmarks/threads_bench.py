"""Per-block compression time, idle and with one competing CPU-bound process, per variant.

Each run is a fresh ``python compress.py`` process (the one-shot preset on the embedded model by
default); a variant is a set of environment variables and overrides. Runs alternate between
the variants, for ``--rounds`` rounds per condition; the loaded condition starts a 1-thread
busy loop (``nice 0``) before the run and stops it after. Per-block seconds come from each
run's ``report.json["block_seconds"]``.

    python benchmarks/threads_bench.py OUT.json --rounds 2 \\
        --variant 'default:|engine.omp_wait=null' --variant passive:OMP_WAIT_POLICY=PASSIVE \\
        -- method=slim_q_fast calib.nsamples=8 eval.max_windows=1 eval_dense=false \\
           export.packed=false engine.progress=false engine.resume=false

A variant is ``NAME:KEY=VALUE,KEY=VALUE`` (environment) with optional ``+override`` items after
a ``|`` (``NAME:ENV|override override``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUSY = "import time\nwhile True:\n    sum(i * i for i in range(10000))\n"


def parse_variant(text: str) -> tuple[str, dict[str, str], list[str]]:
    name, _, rest = text.partition(":")
    env_part, _, over = rest.partition("|")
    env = dict(kv.split("=", 1) for kv in env_part.split(",") if kv)
    return name, env, over.split()


def one_run(env: dict[str, str], overrides: list[str], loaded: bool) -> dict:
    busy = None
    if loaded:
        busy = subprocess.Popen([sys.executable, "-c", BUSY])
        time.sleep(1.0)  # (the competitor is running before the run starts)
    try:
        with tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter()
            cmd = [sys.executable, str(ROOT / "compress.py"), *overrides, f"hydra.run.dir={d}"]
            proc = subprocess.run(
                cmd, env={**os.environ, **env}, capture_output=True, text=True, cwd=ROOT
            )
            wall = time.perf_counter() - t0
            if proc.returncode != 0:
                raise RuntimeError(f"{cmd} failed:\n{proc.stderr[-3000:]}")
            report = json.loads((Path(d) / "report.json").read_text())
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()
    blocks = report["block_seconds"]
    return {
        "wall_s": round(wall, 1),
        "compress_s": round(report["timings"]["compress_s"], 2),
        "block_s": blocks,
        "ppl": report["ppl"],
    }


def summary(blocks: list[float]) -> dict:
    q = statistics.quantiles(blocks, n=4)
    return {
        "block_s_median": round(statistics.median(blocks), 3),
        "block_s_q1": round(q[0], 3),
        "block_s_q3": round(q[2], 3),
        "block_s_min": round(min(blocks), 3),
        "block_s_max": round(max(blocks), 3),
        "n_blocks": len(blocks),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--variant", action="append", required=True)
    ap.add_argument("--conditions", default="idle,loaded")
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    args = ap.parse_args(argv[:cut])
    args.overrides = argv[cut + 1 :]
    variants = [parse_variant(v) for v in args.variant]
    conditions = args.conditions.split(",")
    runs: list[dict] = []
    for r in range(args.rounds):
        for cond in conditions:
            order = variants if r % 2 == 0 else variants[::-1]  # alternate who goes first
            for name, env, over in order:
                res = one_run(env, [*args.overrides, *over], cond == "loaded")
                res.update(variant=name, condition=cond, round=r)
                runs.append(res)
                print(json.dumps({k: res[k] for k in ("variant", "condition", "compress_s")}))
    rows = {}
    for name, env, over in variants:
        for cond in conditions:
            mine = [x for x in runs if x["variant"] == name and x["condition"] == cond]
            blocks = [b for x in mine for b in x["block_s"]]
            rows[f"{cond}_{name}"] = {
                "variant": name,
                "env": env,
                "overrides": over,
                "condition": cond,
                **summary(blocks),
                "compress_s_runs": [x["compress_s"] for x in mine],
                "ppl": [x["ppl"] for x in mine],
            }
    idle = {n: rows.get(f"idle_{n}", {}).get("block_s_median") for n, _, _ in variants}
    for name, _, _ in variants:
        lo = rows.get(f"loaded_{name}")
        if lo and idle.get(name):
            lo["slowdown_vs_own_idle"] = round(lo["block_s_median"] / idle[name], 3)
    out = {
        "what": "per-block compression seconds per variant, idle and with one competing "
        "CPU-bound process (a 1-thread Python busy loop)",
        "command": "python benchmarks/threads_bench.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.platform()}",
        "date": time.strftime("%Y-%m-%d"),
        "rows": rows,
        "runs": runs,
    }
    args.out.write_text(json.dumps(out, indent=1))
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
