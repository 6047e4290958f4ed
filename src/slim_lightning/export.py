"""What a run leaves behind, shared by ``compress.py`` and ``train.py``.

* ``write_packed``: the packed checkpoint (``checkpoint.save_compressed``) and its sizes measured
  from the written file;
* ``write_hf``: a plain Hugging Face model (adapters merged into dense weights);
* ``write_report``: ``report.json`` (``status: done``, timings, peak memory) written atomically,
  and the summary table printed.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from torch import nn

from .io import atomic_dir, atomic_write_json
from .report import peak_memory, summary_table


def write_packed(
    model: nn.Module,
    tokenizer: Any,
    out: Path,
    *,
    plan: Any,
    results: dict[str, Any],
    calibration: str | None,
    dtype: str,
    base_sha256: str | None = None,
) -> dict[str, Any]:
    """Writes the packed checkpoint to ``out``; returns its sizes (from the written bytes)."""
    from .checkpoint import read_meta, save_compressed

    save_compressed(
        model,
        tokenizer,
        out,
        plan=plan,
        results=results,
        calibration=calibration,
        dtype=dtype,
        base_sha256=base_sha256,
    )
    return read_meta(out)["size"]


def write_hf(model: nn.Module, tokenizer: Any, out: Path, *, packed: bool) -> None:
    """A plain HF model at ``out`` (``SLiMLinear`` merged into dense ``nn.Linear`` first)."""
    from .adapters import merge_to_dense

    if packed:
        merge_to_dense(model)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)


def write_report(
    report: dict[str, Any], run_dir: Path, timings: dict[str, float], t_start: float
) -> dict[str, Any]:
    """Finishes ``report`` (``status: done``, timings, peak memory), writes it, prints it."""
    timings["total_s"] = time.perf_counter() - t_start
    report["timings"] = timings
    report["memory"] = peak_memory()
    report["status"] = "done"
    report["finished"] = time.time()
    atomic_write_json(run_dir / "report.json", report)
    print(summary_table(report))
    print(f"report: {run_dir / 'report.json'}")
    return report
