"""Summarise a Hydra multirun of ``compress.py`` into one markdown table.

Usage::

    python -m slim_lightning.summarize runs/multirun/quality [--out table.md]

Reads every ``*/report.json`` under the directory (recursively) and prints one row per run:
method, sparsity, perplexity (dense and compressed), bits per weight (everything counted), packed
size vs fp16, compression wall time and peak memory.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .report import fmt_num, format_table


def collect(root: str | Path) -> list[dict]:
    """All reports under ``root``, sorted by (sparsity, perplexity)."""
    reports = []
    for p in sorted(Path(root).rglob("report.json")):
        r = json.loads(p.read_text())
        r["_path"] = str(p.parent)
        reports.append(r)
    return reports


def table(reports: list[dict]) -> str:
    rows = []
    for r in reports:
        spec = r.get("spec", {})
        sp = spec.get("sparsity", {})
        pattern = sp.get("pattern", "?")
        sparsity = (
            f"{sp.get('n')}:{sp.get('m')}"
            if pattern == "nm"
            else f"{int(round(100 * sp.get('ratio', 0)))}% unstr."
            if pattern == "unstructured"
            else "dense"
        )
        ppl = next(iter(r.get("ppl", {}).values()), None)
        dense = next(iter(r.get("ppl_dense", {}).values()), None)
        lay = r.get("layers_summary", {})
        size = r.get("size", {})
        bits = lay.get("bits_per_weight", 16.0 if r.get("method") == "dense" else None)
        rows.append(
            (
                r.get("method", "?"),
                sparsity,
                fmt_num(ppl),
                fmt_num(dense),
                fmt_num(bits, 3),
                fmt_num(size.get("ratio_vs_fp16"), 3),
                fmt_num(r.get("timings", {}).get("compress_s"), 3),
                fmt_num(r.get("memory", {}).get("peak_rss_gib"), 3),
            )
        )
    rows.sort(key=lambda row: (row[1], float(row[2]) if row[2] not in ("-", "nan") else 1e30))
    header = (
        "method",
        "sparsity",
        "PPL",
        "dense PPL",
        "bits/weight",
        "size vs fp16",
        "compress s",
        "peak GiB",
    )
    return format_table(rows, header)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("root", help="a multirun directory (or any directory with */report.json)")
    ap.add_argument("--out", help="also write the table to this file")
    args = ap.parse_args(argv)
    reports = collect(args.root)
    if not reports:
        raise SystemExit(f"no report.json under {args.root}")
    text = table(reports)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
