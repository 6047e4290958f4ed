"""Run reports: ``report.json``, the stdout summary table and the per-layer diagnostics plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any


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
        if "bits_formula" in lay:  # SpQR / SliM-LLM: beside the file's count
            rows.append(("bits per weight (papers' count)", "16", fmt_num(lay["bits_formula"])))
            rows.append(("16-bit outlier share", "0", fmt_num(lay.get("outlier_share"))))
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
    panels: list[tuple[tuple[str, ...], str]] = [
        (
            ("err_before_adapters", "err_after_adapters", "err_final"),
            "saliency-weighted rel. error",
        ),
        (("sparsity",), "achieved sparsity"),
        (("bits_per_weight", "bits_formula"), "bits per weight (file; papers' count)"),
        (("recon_err_before", "recon_err_after"), "block output error (reconstruct=block)"),
        (("rank",), "effective adapter rank"),
        (("alpha",), "SLiM-Quant alpha"),
    ]
    panels = [p for p in panels if any(k in r for r in reports for k in p[0])] or panels[:1]
    fig, grid = plt.subplots(
        len(panels),
        1,
        figsize=(max(8, len(x) * 0.08), 2.2 * len(panels)),
        sharex=True,
        squeeze=False,
    )
    axes = list(grid[:, 0])
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

    from ..io import atomic_write_bytes

    path = Path(path)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path
