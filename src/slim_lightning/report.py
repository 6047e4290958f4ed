"""Run reports: ``report.json``, the stdout summary table and the per-layer diagnostics plot."""

from __future__ import annotations

import os
import platform
import resource
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

import torch


def package_versions() -> dict[str, str]:
    """Versions of the packages that determine a run's numbers."""
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in (
        "slim-lightning",
        "torch",
        "transformers",
        "lightning",
        "triton",
        "datasets",
        "hydra-core",
        "safetensors",
        "wandb",
        "bitsandbytes",
        "lm-eval",
    ):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def linear_sizes(model: torch.nn.Module) -> dict[str, float]:
    """Packed bytes of the compressed linears vs their fp16 size, from the modules in memory
    (an estimate used only when nothing is written; written runs report the file's bytes)."""
    from .modules import SLiMLinear

    packed = dense = 0
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for mod in model.modules():
        if isinstance(mod, SLiMLinear) and mod is not head:
            packed += mod.packed_nbytes()
            dense += mod.in_features * mod.out_features * 2
    if dense == 0:
        return {}
    return {"packed_bytes": packed, "dense_fp16_bytes": dense, "ratio_vs_fp16": packed / dense}


def _hwm_kib() -> int:
    """This process's peak RSS since start or the last reset (KiB): VmHWM on Linux, else
    ``ru_maxrss`` (which cannot be reset)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _rss_kib() -> int:
    """Current RSS (KiB) from /proc/self/statm; 0 where unavailable."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * (os.sysconf("SC_PAGE_SIZE") // 1024)
    except (OSError, ValueError, IndexError):
        return 0


class StageMemory:
    """Peak host RSS and peak device allocation per stage of a run (``report.json["memory"]``).

    ``with stage(timings, "compress"):`` records the stage's seconds into ``timings`` and its
    peaks here. The process-wide peak watermark is never reset (``/usr/bin/time`` and
    ``ru_maxrss`` stay exact): a stage's host peak is the watermark when the stage raised it
    (exact), otherwise the highest RSS a sampling thread saw during the stage (every
    ``interval`` seconds). The device peak is ``torch.cuda.max_memory_allocated`` after
    ``reset_peak_memory_stats`` at the stage's start. Nested stages fold into enclosing ones.
    """

    def __init__(self, interval: float = 0.02) -> None:
        self.stages: dict[str, dict[str, float | None]] = {}
        self.interval = interval
        self._open: list[list] = []  # [name, host peak KiB, device peak bytes, hwm at start]
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while True:
            time.sleep(self.interval)
            kib = _rss_kib()
            with self._lock:
                for entry in self._open:
                    entry[1] = max(entry[1], kib)

    def begin(self, name: str) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._sample, daemon=True, name="slim-mem")
            self._thread.start()
        cuda = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
        with self._lock:
            for entry in self._open:  # the enclosing stages keep what they saw so far
                entry[2] = max(entry[2], cuda)
            self._open.append([name, _rss_kib(), 0, _hwm_kib()])
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def end(self) -> None:
        hwm, rss = _hwm_kib(), _rss_kib()
        cuda = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
        with self._lock:
            name, kib, dev, hwm0 = self._open.pop()
            kib = max(kib, rss, hwm if hwm > hwm0 else 0)
            dev = max(dev, cuda)
            for entry in self._open:
                entry[1] = max(entry[1], kib)
                entry[2] = max(entry[2], dev)
        self.stages[name] = {
            "host_peak_gib": kib / 2**20,
            "device_peak_gib": dev / 2**30 if torch.cuda.is_available() else None,
        }

    def reset(self) -> None:
        """Forgets the stages of an earlier run in this process (a new run starts)."""
        with self._lock:
            self.stages = {}

    def peak_rss_kib(self) -> int:
        return max(_hwm_kib(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


MEMORY = StageMemory()


def reset_stages() -> None:
    """A new run starts: forget per-stage memory recorded earlier in this process."""
    MEMORY.reset()


@contextmanager
def stage(timings: dict[str, float], name: str) -> Iterator[None]:
    """Times a stage into ``timings[name + "_s"]`` and records its peak memory (``MEMORY``)."""
    MEMORY.begin(name)
    t0 = time.perf_counter()
    try:
        yield
    finally:
        timings[f"{name}_s"] = time.perf_counter() - t0
        MEMORY.end()


def peak_memory() -> dict[str, Any]:
    """Peak resident memory of this process (GiB), peak CUDA allocation when there is one, and
    the per-stage peaks recorded by ``stage``."""
    out: dict[str, Any] = {"peak_rss_gib": MEMORY.peak_rss_kib() / 2**20}
    if torch.cuda.is_available():
        stage_peaks = [v["device_peak_gib"] or 0.0 for v in MEMORY.stages.values()]
        out["peak_cuda_gib"] = max([torch.cuda.max_memory_allocated() / 2**30, *stage_peaks])
    if MEMORY.stages:
        out["stages"] = dict(MEMORY.stages)
    return out


def held_bytes(model: torch.nn.Module) -> int:
    """Bytes of parameters, buffers and SLiMLinear caches (each storage once)."""
    from .modules import SLiMLinear

    seen, total = set(), 0
    tensors = [*model.parameters(), *model.buffers()]
    for m in model.modules():
        if isinstance(m, SLiMLinear):
            for cache in (m._dense_cache, m._adapter_cache, m._kernel_cache):
                for v in cache.values():
                    vs = v if isinstance(v, (tuple, list)) else (v,)
                    tensors += [t for t in vs if torch.is_tensor(t)]
    for t in tensors:
        key = t.untyped_storage().data_ptr()
        if key not in seen and t.device.type != "meta":
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def summarize_layers(reports: list[dict[str, Any]]) -> dict[str, float]:
    """Parameter-weighted averages of per-layer statistics over all compressed linears."""
    if not reports:
        return {}
    numel = [r["d_in"] * r["d_out"] for r in reports]
    total = float(sum(numel))
    out: dict[str, float] = {"n_layers": float(len(reports)), "compressed_params": total}
    for key in (
        "bits_per_weight",
        "sparsity",
        "err_before_adapters",
        "err_after_adapters",
        "err_final",
    ):
        vals = [(r[key], n) for r, n in zip(reports, numel) if key in r and r[key] == r[key]]
        if vals:
            out[key] = sum(v * n for v, n in vals) / sum(n for _, n in vals)
    ranks = [r["rank"] for r in reports if "rank" in r]
    if ranks:
        out["mean_rank"] = sum(ranks) / len(ranks)
    return out


def format_table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> str:
    """A GitHub-markdown table with aligned columns."""
    cols = list(zip(header, *rows))
    widths = [max(len(str(c)) for c in col) for col in cols]
    fmt = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([fmt(header), sep, *map(fmt, rows)])


def fmt_num(x: Any, digits: int = 4) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        if x != x:
            return "nan"
        return f"{x:.{digits}g}" if abs(x) < 1e5 else f"{x:.3e}"
    return str(x)


def summary_table(report: dict[str, Any]) -> str:
    """The readable end-of-run summary: dense vs compressed, side by side."""
    rows = []
    for name, ppl in report.get("ppl", {}).items():
        rows.append(
            (f"perplexity ({name})", fmt_num(report.get("ppl_dense", {}).get(name)), fmt_num(ppl))
        )
    lay = report.get("layers_summary", {})
    if lay:
        rows.append(("bits per weight (linears)", "16", fmt_num(lay.get("bits_per_weight"))))
        rows.append(("sparsity (linears)", "0", fmt_num(lay.get("sparsity"))))
        rows.append(("mean adapter rank", "-", fmt_num(lay.get("mean_rank"))))
        rows.append(("saliency-weighted rel. error", "0", fmt_num(lay.get("err_final"))))
    size = report.get("size", {})
    if size:
        rows.append(
            (
                "linear layers size (MiB)",
                fmt_num(size["dense_fp16_bytes"] / 2**20),
                fmt_num(size["packed_bytes"] / 2**20),
            )
        )
        rows.append(("size ratio vs fp16", "1", fmt_num(size["ratio_vs_fp16"])))
        if "checkpoint_bytes" in size:
            rows.append(
                (
                    "checkpoint file (MiB)",
                    fmt_num(size["checkpoint_fp16_bytes"] / 2**20),
                    fmt_num(size["checkpoint_bytes"] / 2**20),
                )
            )
            rows.append(
                ("checkpoint ratio vs fp16", "1", fmt_num(size["checkpoint_ratio_vs_fp16"]))
            )
    t = report.get("timings", {})
    rows.append(("compression wall time (s)", "-", fmt_num(t.get("compress_s"))))
    mem = report.get("memory", {})
    rows.append(("peak memory (GiB)", "-", fmt_num(mem.get("peak_rss_gib"))))
    table = format_table(rows, ("", "dense", report.get("method", "compressed")))
    stages = mem.get("stages") or {}
    if stages:  # per-stage peaks: where the memory goes
        srows = [
            (
                name,
                fmt_num(t.get(f"{name}_s"), 3),
                fmt_num(v.get("host_peak_gib"), 3),
                fmt_num(v.get("device_peak_gib"), 3)
                if v.get("device_peak_gib") is not None
                else "-",
            )
            for name, v in stages.items()
        ]
        table += "\n" + format_table(
            srows, ("stage", "seconds", "host peak GiB", "device peak GiB")
        )
    return table


def plot_layers(reports: list[dict[str, Any]], path: str | Path) -> Path | None:
    """Per-layer diagnostics PNG: error before/after adapters, sparsity, bits, rank, alpha."""
    if not reports:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = list(range(len(reports)))
    panels = [
        (
            ("err_before_adapters", "err_after_adapters", "err_final"),
            "saliency-weighted rel. error",
        ),
        (("sparsity",), "achieved sparsity"),
        (("bits_per_weight",), "bits per weight"),
        (("rank",), "effective adapter rank"),
        (("alpha",), "SLiM-Quant alpha"),
    ]
    fig, axes = plt.subplots(
        len(panels), 1, figsize=(max(8, len(x) * 0.08), 2.2 * len(panels)), sharex=True
    )
    for ax, (keys, title) in zip(axes, panels):
        for k in keys:
            ys = [r.get(k, float("nan")) for r in reports]
            ax.plot(x, ys, marker=".", lw=0.8, label=k)
        ax.set_title(title, fontsize=9)
        if len(keys) > 1:
            ax.legend(fontsize=7)
    axes[-1].set_xlabel("linear layer (in model order)")
    fig.tight_layout()
    import io

    from .io import atomic_write_bytes

    path = Path(path)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path
