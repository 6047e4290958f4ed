"""What a run leaves behind, shared by ``compress.py`` and ``train.py``.

* ``report_header``: the first keys of ``report.json`` (status, method, config, versions, ...);
* ``write_outputs``: the packed checkpoint, the servable copy and the HF model, in that order;
* ``write_packed``: the packed checkpoint (``checkpoint.save_compressed``) and its sizes measured
  from the written file (sharded, one block at a time, when a streaming run's blocks wait on
  disk);
* ``write_hf``: a plain Hugging Face model (adapters merged into dense weights);
* ``write_report``: ``report.json`` (``status: done``, timings, peak memory) written atomically,
  and the summary table printed.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint.layout import package_versions
from ..io import atomic_dir, atomic_write_json
from ..memory import peak_memory, stage
from .report import summary_table

log = logging.getLogger(__name__)


def report_header(
    status: dict[str, Any], plan: Any, container: dict, run_dir: Path, **extra: Any
) -> dict[str, Any]:
    """The keys every ``report.json`` starts with (``extra`` adds the run's own)."""
    return {
        **status,
        "method": plan.method_name,
        **extra,
        "config": container,
        "spec": asdict(plan.spec),
        "versions": package_versions(),
        "seed": plan.seed,
        "run_dir": str(run_dir),
        "threads": {  # what the timings ran with
            "torch": torch.get_num_threads(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        },
    }


def write_outputs(
    report: dict[str, Any],
    model: nn.Module,
    tokenizer: Any,
    run_dir: Path,
    plan: Any,
    timings: dict[str, float],
    *,
    results: dict[str, Any],
    calibration: str | None,
    dtype: str,
    base_sha256: str | None = None,
    source_sha256: str | None = None,
    hf: bool = True,
    blocks: Any = None,
) -> None:
    """The run's exports into ``run_dir`` (rank zero): ``packed/`` (``report["size"]`` then holds
    the sizes measured from the written file), ``servable/``, and ``hf/`` when ``hf``.

    ``blocks``: a ``checkpoint.stream_save.OffloadedBlocks`` when the decoder blocks wait on
    disk (a streaming run): ``packed/`` and ``hf/`` are then written one block at a time, as
    sharded safetensors (``app.stream_export``)."""
    if plan.export.servable and blocks is not None:  # (autostream refuses it before loading)
        from ..errors import ConfigError

        raise ConfigError("export.servable", True, "false with engine.streaming")
    with stage(timings, "export"):
        packed = bool(plan.export.packed and report["size"])
        if packed:
            report["size"] = write_packed(
                model,
                tokenizer,
                run_dir / "packed",
                plan=plan,
                results=results,
                calibration=calibration,
                dtype=dtype,
                base_sha256=base_sha256,
                source_sha256=source_sha256,
                blocks=blocks,
            )
            report["packed_dir"] = str(run_dir / "packed")
        if plan.export.servable:  # before write_hf, which merges the SLiMLinear layers away
            from ..deploy.servable import describe, write_servable

            with stage(timings, "export_servable"):
                report["servable"] = write_servable(model, tokenizer, run_dir / "servable")
            report["servable_dir"] = str(run_dir / "servable")
            log.info(describe(report["servable"]))
        if hf and plan.export.hf and blocks is not None:
            from .stream_export import write_hf_streaming

            write_hf_streaming(
                model,
                blocks,
                tokenizer,
                run_dir / "hf",
                packed=plan.export.packed,
                requantize=packed,  # as the packed export did to the whole model
            )
            report["hf_dir"] = str(run_dir / "hf")
        elif hf and plan.export.hf:
            write_hf(model, tokenizer, run_dir / "hf", packed=plan.export.packed)
            report["hf_dir"] = str(run_dir / "hf")


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
    source_sha256: str | None = None,
    blocks: Any = None,
) -> dict[str, Any]:
    """Writes the packed checkpoint to ``out``; returns its sizes (from the written bytes)."""
    from ..checkpoint import read_meta, save_compressed

    kw = {"plan": plan, "results": results, "calibration": calibration, "dtype": dtype}
    kw["source_sha256"] = source_sha256  # the dense parent's weights digest
    if blocks is not None:  # the decoder blocks wait on disk: sharded, one block at a time
        from ..checkpoint.stream_save import save_streaming

        save_streaming(model, blocks, tokenizer, out, **kw)
    else:
        save_compressed(model, tokenizer, out, base_sha256=base_sha256, **kw)
    return read_meta(out)["size"]


def write_hf(model: nn.Module, tokenizer: Any, out: Path, *, packed: bool) -> None:
    """A plain HF model at ``out`` (``SLiMLinear`` merged into dense ``nn.Linear`` first; per-
    expert linears stacked back into the family's fused expert tensors)."""
    from ..models.experts import fuse_experts
    from ..nn.adapters import merge_to_dense

    if packed:
        merge_to_dense(model)
    fuse_experts(model)
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
