"""Per-layer latency of the SLiM kernels vs dense ``torch.matmul`` on LLaMA-2 linear shapes.

Usage (on a CUDA GPU)::

    python -m slim_lightning.kernels.benchmark                 # all LLaMA-2 shapes, batch 1/4/16/64
    python -m slim_lightning.kernels.benchmark --shapes 4096x11008 --batches 1,16 --peak-gbs 3350

Shapes are ``d_out x d_in`` (``N x K``; ``nn.Linear.weight`` is ``(d_out, d_in)``). For each
shape and batch M it times, with ``triton.testing.do_bench`` (median, L2 flushed before each
call, so the weights come from HBM):

* ``fp16`` / ``bf16``: ``torch.nn.functional.linear(x, W)`` with a dense weight,
* ``slim``: the fused 2:4 4-bit kernel, no adapter (one launch),
* ``slim+lora``: rank 10% 4-bit adapter, two launches (``t = x L``, fused ``x W^T + t R``),

and reports the speed-up over dense fp16 and the achieved bandwidth (bytes of packed weight,
adapters, scales, activations in and out, divided by the time) against the GPU's peak. Prints a
markdown table. Without CUDA it refuses to time (interpreter timings mean nothing) unless
``--smoke`` is given, which runs tiny shapes once to check the code path.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import time

import torch

from slim_lightning.formats.bitpack import pack_int4
from slim_lightning.formats.nm import pack_nm

LLAMA2_SHAPES = [  # (d_out, d_in): 7B q/k/v/o, 7B up/gate, 7B down, 13B q/k/v/o, up/gate, down
    (4096, 4096),
    (11008, 4096),
    (4096, 11008),
    (5120, 5120),
    (13824, 5120),
    (5120, 13824),
]
# peak HBM bandwidth in GB/s by device-name substring (vendor data sheets)
PEAK_GBS = {"H100 80GB HBM3": 3350, "H100 PCIe": 2000, "H200": 4800, "A100-SXM4-80GB": 2039}


def _layer(n: int, k: int, rank: int, device: str, gen: torch.Generator) -> dict:
    """Random packed 2:4 4-bit weight (per-tensor scale) and 4-bit adapters (groups of 128)."""
    from slim_lightning.core.quant import absmax_quant

    mask = torch.zeros(n, k // 4, 4, dtype=torch.bool)
    idx = torch.topk(torch.rand(n, k // 4, 4, generator=gen), 2, -1).indices
    mask = mask.scatter_(-1, idx, True).reshape(n, k)  # (N, K) random 2:4
    q = torch.randint(-8, 8, (n, k), generator=gen, dtype=torch.int8) * mask
    p = pack_nm(q, mask, 2, 4)
    lq = absmax_quant(torch.randn(rank, k, generator=gen) * 0.02, 4, 128)  # L^T (r, K)
    rq = absmax_quant(torch.randn(n, rank, generator=gen) * 0.02, 4, 128)  # R^T (N, r)
    d = {
        "values": p["values"],
        "meta": p["meta"],
        "scale": torch.tensor([[0.01]], dtype=torch.float16),
        "lv": pack_int4(lq.q, pad=True),
        "ls": lq.scale.half(),
        "lg": lq.group_size,
        "rv": pack_int4(rq.q, pad=True),
        "rs": rq.scale.half(),
        "rg": rq.group_size,
    }
    return {k_: (v.to(device) if torch.is_tensor(v) else v) for k_, v in d.items()}


def _nbytes(*ts: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def _time_ms(fn, smoke: bool) -> float:
    if smoke:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def run(
    shapes: list[tuple[int, int]],
    batches: list[int],
    rank_ratio: float = 0.1,
    peak_gbs: float | None = None,
    smoke: bool = False,
) -> str:
    """Times every (shape, batch) and returns the markdown report."""
    from .sparse24 import dense4_matmul, slim24_matmul

    cuda = torch.cuda.is_available()
    if not cuda and not smoke:
        raise SystemExit("benchmark: no CUDA GPU (use --smoke for a CPU code-path check)")
    if not cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("benchmark --smoke on CPU: run with TRITON_INTERPRET=1")
    device = "cuda" if cuda else "cpu"
    name = torch.cuda.get_device_name() if cuda else "CPU (Triton interpreter, smoke only)"
    if peak_gbs is None:
        peak_gbs = next((v for k, v in PEAK_GBS.items() if k in name), None)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for n, k in shapes:
        rank = max(1, round(rank_ratio * min(n, k)))
        lay = _layer(n, k, rank, device, gen)
        w16 = torch.randn(n, k, device=device, dtype=torch.float16)
        wbf = w16.to(torch.bfloat16)
        w_bytes = _nbytes(lay["values"], lay["meta"], lay["scale"])
        a_bytes = _nbytes(lay["lv"], lay["ls"], lay["rv"], lay["rs"])
        for m in batches:
            x = torch.randn(m, k, device=device, dtype=torch.float16)
            xb = x.to(torch.bfloat16)
            args = (lay["values"], lay["meta"], lay["scale"], k)

            def slim(x=x, args=args):
                return slim24_matmul(x, *args)

            def slim_lora(x=x, args=args, lay=lay):
                t = dense4_matmul(x, lay["lv"], lay["ls"], lay["lg"], x.shape[1])
                return slim24_matmul(
                    x, *args, t=t, r_values=lay["rv"], r_scale=lay["rs"], r_group_size=lay["rg"]
                )

            t16 = _time_ms(lambda x=x, w=w16: torch.nn.functional.linear(x, w), smoke)
            tbf = _time_ms(lambda x=xb, w=wbf: torch.nn.functional.linear(x, w), smoke)
            ts = _time_ms(slim, smoke)
            tsl = _time_ms(slim_lora, smoke)
            io = 2 * m * (k + n)  # fp16 activations in and out
            gbs_s = (w_bytes + io) / ts / 1e6
            # adapter path: the t round trip (write + read) counted too
            gbs_sl = (w_bytes + a_bytes + io + 4 * m * rank) / tsl / 1e6
            rows.append((n, k, m, t16, tbf, ts, tsl, gbs_s, gbs_sl))
    run.last = {"rows": rows, "gpu": name, "peak_gbs": peak_gbs}  # type: ignore[attr-defined]
    return _report(rows, name, peak_gbs, rank_ratio, smoke)


def results_json(rows: list, gpu: str, gpu_tests: str | None) -> dict:
    """The ``kernels/results/<gpu>-<date>.json`` record (the GPU issue's format)."""
    import triton

    out_rows = []
    for n, k, m, t16, tbf, ts, tsl, gs, gsl in rows:
        out_rows.append(
            {
                "shape": f"{n}x{k}",
                "batch": m,
                "us": 1e3 * ts,
                "us_with_adapters": 1e3 * tsl,
                "us_fp16": 1e3 * t16,
                "us_bf16": 1e3 * tbf,
                "x_fp16": t16 / ts,
                "x_fp16_with_adapters": t16 / tsl,
                "gbs": gs,
                "gbs_with_adapters": gsl,
            }
        )
    return {
        "gpu": gpu,
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "kernel_configs": (
            "interpreter"
            if os.environ.get("TRITON_INTERPRET") == "1"
            else "fixed"
            if os.environ.get("SLIM_KERNEL_FIXED") == "1"
            else "autotuned"
        ),
        "gpu_tests": gpu_tests,
        "rows": out_rows,
    }


def _report(rows, name, peak, rank_ratio, smoke) -> str:
    pk = f"{peak:.0f} GB/s" if peak else "unknown"
    lines = [
        f"Device: {name}; peak bandwidth {pk}; date {datetime.date.today().isoformat()}; "
        f"torch {torch.__version__}; rank {rank_ratio:.0%}; times are do_bench medians (us)"
        + (" -- SMOKE RUN, NOT PERFORMANCE NUMBERS" if smoke else ""),
        "",
        "| d_out x d_in | M | fp16 us | bf16 us | slim us | x fp16 | GB/s (% peak) "
        "| slim+lora us | x fp16 | GB/s (% peak) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def bw(g):
        return f"{g:.0f}" + (f" ({100 * g / peak:.0f}%)" if peak else "")

    for n, k, m, t16, tbf, ts, tsl, gs, gsl in rows:
        lines.append(
            f"| {n}x{k} | {m} | {1e3 * t16:.1f} | {1e3 * tbf:.1f} | {1e3 * ts:.1f} | "
            f"{t16 / ts:.2f} | {bw(gs)} | {1e3 * tsl:.1f} | {t16 / tsl:.2f} | {bw(gsl)} |"
        )
    return "\n".join(lines)


def _parse_shapes(s: str) -> list[tuple[int, int]]:
    if s == "llama2":
        return list(LLAMA2_SHAPES)
    out = []
    for part in s.split(","):
        n, k = part.lower().split("x")
        out.append((int(n), int(k)))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="llama2", help="'llama2' or e.g. 4096x11008,11008x4096")
    ap.add_argument("--batches", default="1,4,16,64")
    ap.add_argument("--rank-ratio", type=float, default=0.1)
    ap.add_argument("--peak-gbs", type=float, default=None, help="override the peak bandwidth")
    ap.add_argument("--smoke", action="store_true", help="tiny CPU/interpreter code-path check")
    ap.add_argument("--json", default=None, help="also write the results record to this file")
    ap.add_argument("--gpu-tests", default=None, help="'N passed, M failed, K skipped' to record")
    a = ap.parse_args(argv)
    shapes = _parse_shapes(a.shapes)
    if a.smoke and a.shapes == "llama2":
        shapes = [(64, 128)]
    batches = [int(b) for b in a.batches.split(",")]
    if any(k % 4 for _, k in shapes) or not all(math.isfinite(b) and b > 0 for b in batches):
        raise SystemExit("shapes need d_in % 4 == 0 and batches must be positive")
    print(run(shapes, batches, a.rank_ratio, a.peak_gbs, a.smoke), flush=True)
    if a.json:
        import json
        from pathlib import Path

        last = run.last  # type: ignore[attr-defined]
        rec = results_json(last["rows"], last["gpu"], a.gpu_tests)
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(rec, indent=2) + "\n")
        print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
