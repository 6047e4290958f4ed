"""Peak host memory of compressing ONE linear with a method's one-shot work (issue 35).

    OMP_NUM_THREADS=1 python benchmarks/linear_peak.py 2048 5632 [overrides...]

Builds a random 16-bit ``(d_out, d_in)`` weight and the X^T X of 1024 random tokens (consumed in
place, as the engine lets SparseGPT do), then runs ``compress_linear`` under the method's spec
(``method=slim_q`` unless overridden) while a thread samples the resident set every millisecond.
Prints the peak above the process before the call (which holds the weight and the Hessian) and
the innermost frames where it was reached. glibc's mmap threshold is fixed as streaming runs fix
it, so freed tensors leave the resident set.
"""

from __future__ import annotations

import sys
import threading
import time
import traceback
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from slim_lightning.compress.plan import build_plan
from slim_lightning.core.compress import compress_linear
from slim_lightning.core.types import LayerStats
from slim_lightning.memory import mmap_large_allocations


def rss() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096


def main(d_out: int, d_in: int, overrides: list[str]) -> None:
    mmap_large_allocations()
    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        plan = build_plan(compose(config_name="compress", overrides=["method=slim_q", *overrides]))
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(d_out, d_in, generator=g) * 0.02).half()
    x = torch.randn(1024, d_in, generator=g)
    stats = LayerStats(sq_sum=(x**2).sum(0), abs_sum=x.abs().sum(0), n_tokens=1024, hessian=x.T @ x)
    stats.cache = {"consume_hessian": True}
    del x
    base = rss()
    best = {"rss": base, "stack": None}
    main_id = threading.main_thread().ident

    def sample() -> None:
        while True:
            r = rss()
            if r > best["rss"]:
                frame = sys._current_frames().get(main_id)
                best["rss"], best["stack"] = r, traceback.extract_stack(frame)[-4:]
                del frame  # (a held frame would keep its tensors alive)
            time.sleep(0.001)

    threading.Thread(target=sample, daemon=True).start()
    t0 = time.perf_counter()
    compress_linear(w, stats, plan.spec)
    above = best["rss"] - base
    print(
        f"{d_out} x {d_in} ({d_out * d_in / 1e6:.1f} M weights): process {base / 2**30:.3f} GiB, "
        f"peak +{above / 2**20:.0f} MiB ({above / (d_out * d_in):.1f} B per weight), "
        f"{time.perf_counter() - t0:.1f} s"
    )
    for f in best["stack"] or []:
        print(f"    {Path(f.filename).name}:{f.lineno} {f.name}: {f.line}")


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:])
