"""``run_compress(cfg)``: the body of ``compress.py`` (tests call it directly).

``eval_loader``, ``make_eval_windows`` (:mod:`.evaluation`) and ``linear_sizes``
(:mod:`.report`) are re-exported here for existing callers.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from .config import build_plan, resolve_device
from .evaluation import eval_loader, make_eval_windows
from .report import (
    linear_sizes,
    package_versions,
    plot_layers,
    reset_stages,
    stage,
    summarize_layers,
)

__all__ = ["eval_loader", "linear_sizes", "make_eval_windows", "run_compress"]

log = logging.getLogger(__name__)


def _zero_shot(model: torch.nn.Module, tokenizer: Any, plan: Any, device: str) -> dict[str, Any]:
    from .evaluation import zero_shot

    return zero_shot(
        model,
        tokenizer,
        tasks=plan.eval.zero_shot,
        limit=plan.eval.zero_shot_limit,
        device=device,
        batch_size=plan.engine.batch_size,
        cache_dir=getattr(plan.eval, "cache_dir", None),
    )


def run_compress(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    """Compresses, evaluates and exports; returns the report (also written to run_dir).

    Order: validate the config -> lock the run directory (``rundir.run_session``) -> preflight
    (model config, dimensions, tokenizer, every text; seconds) -> load weights -> dense
    evaluation -> compression -> evaluation -> exports -> ``report.json`` with ``status: done``.
    """
    from .distributed import init_distributed, shutdown
    from .rundir import run_session

    run_dir = Path(run_dir)
    plan = build_plan(cfg)  # every value validated before anything heavy happens
    container = OmegaConf.to_container(cfg, resolve=True)
    # several processes (torchrun / srun): slim_lightning.distributed; one process: None
    ctx = init_distributed(resolve_device(plan.device))
    try:
        if ctx is None:
            with run_session(run_dir, "compress", config=container) as status:
                return _run_compress(plan, container, run_dir, status)
        return _run_distributed(ctx, plan, container, run_dir)
    finally:
        shutdown(ctx)


def _run_distributed(ctx: Any, plan: Any, container: dict, run_dir: Path) -> dict[str, Any]:
    """``_run_compress`` on every rank: rank zero's run directory (Hydra's timestamped default
    may differ between ranks), locked and written by rank zero only; no resume state."""
    from contextlib import ExitStack

    from .distributed import follow_run_dir, resume_requested
    from .errors import ConfigError
    from .rundir import run_session

    if plan.engine.resume:
        if resume_requested():
            raise ConfigError(
                "engine.resume",
                True,
                f"false with several processes (world size {ctx.world_size}): the resume "
                "state is single-process; a distributed run starts from block 0",
            )
        log.warning("engine.resume is off with several processes (no resume state is written)")
    local, run_dir = run_dir, Path(ctx.broadcast_object(str(run_dir), src=0))
    if not ctx.is_main:
        follow_run_dir(local, run_dir)
    with ExitStack() as stack:
        err, status = None, None
        try:
            status = stack.enter_context(run_session(run_dir, "compress", config=container))
        except Exception as e:  # noqa: BLE001 - agreed: rank 0 could not take the directory
            err = e
        ctx.agree(err, "taking the run directory")
        return _run_compress(plan, container, run_dir, status, ctx)


def _run_compress(
    plan: Any, container: dict, run_dir: Path, status: dict[str, Any], ctx: Any = None
) -> dict[str, Any]:
    from .distributed import agreed
    from .distributed import perplexity_sharded as perplexity_on
    from .errors import ConfigError
    from .lightning_module import SLiMModule
    from .pipeline import is_identity
    from .preflight import preflight

    t_start = time.perf_counter()
    reset_stages()  # per-stage memory of this run only
    if plan.export.servable and is_identity(plan.spec):
        raise ConfigError(
            "export.servable", True, "false for an identity (uncompressed) method: nothing to serve"
        )
    timings: dict[str, float] = {}
    with stage(timings, "preflight"):
        prepared = preflight(plan, compress=not is_identity(plan.spec))
    torch.manual_seed(plan.seed)
    device = resolve_device(plan.device)
    module = SLiMModule(plan, str(run_dir), prepared=prepared)
    module.timings.update(timings)
    with stage(module.timings, "load_base"):
        module.load_base()

    eval_name = getattr(plan.eval, "name", None) or getattr(plan.eval, "source", "eval")
    report: dict[str, Any] = {
        **status,
        "method": plan.method_name,
        "config": container,
        "spec": asdict(plan.spec),
        "versions": package_versions(),
        "seed": plan.seed,
        "run_dir": str(run_dir),
        "ppl": {},
        "ppl_dense": {},
    }
    windows = prepared.eval_windows
    streaming = getattr(plan.engine, "streaming", False)
    dense_ppl = None
    if streaming:  # the dense model is never whole in memory: evaluated one block at a time
        import functools

        from .streaming import streaming_perplexity

        dense_ppl = functools.partial(streaming_perplexity, stream=module.loaded.stream)
    zs_tasks = tuple(getattr(plan.eval, "zero_shot", ()) or ()) if plan.eval is not None else ()
    # one perplexity loop (evaluation.perplexity) for the dense and the compressed model
    if windows is not None:
        report["eval_windows"] = list(windows.shape)
        if plan.eval_dense:
            with stage(module.timings, "eval_dense"):
                dense = perplexity_on(
                    ctx,
                    module.model,
                    windows,
                    dense_ppl,
                    device=device,
                    progress=plan.engine.progress,
                )
            report["ppl_dense"][eval_name] = dense["ppl"]
    main = ctx is None or ctx.is_main  # zero-shot, exports and the report: rank zero only
    if zs_tasks and plan.eval_dense and streaming:
        report["zero_shot_dense_skipped"] = "engine.streaming: zero-shot needs the whole model"
    elif zs_tasks and plan.eval_dense and main:
        with stage(module.timings, "zero_shot_dense"):
            report["zero_shot_dense"] = _zero_shot(module.model, module.tokenizer, plan, device)

    # the LightningModule's setup compresses (pipeline.load_or_compress)
    with stage(module.timings, "compress_setup"):
        module.setup("validate")
    if windows is not None:
        with stage(module.timings, "eval"):
            out = perplexity_on(
                ctx, module.model, windows, device=device, progress=plan.engine.progress
            )
        report["ppl"][eval_name] = out["ppl"]
    model = module.model.to("cpu")
    if ctx is not None:
        report["world_size"] = ctx.world_size
        report["distributed"] = _shares(ctx, module.timings)
        if not main:  # waits for rank zero's outputs (an error there is raised here too)
            ctx.agree(None, "rank 0 wrote the outputs")
            return report
    else:
        report["world_size"] = 1
    with agreed(ctx, "rank 0 wrote the outputs"):
        return _finish(plan, module, model, report, run_dir, zs_tasks, device, t_start)


def _shares(ctx: Any, timings: dict[str, float]) -> dict[str, Any]:
    """Each rank's share of the work (linears, seconds, batches), gathered on every rank."""
    mine = {
        "rank": ctx.rank,
        "linears": int(ctx.shares.get("linears", 0)),
        "batches": int(ctx.shares.get("batches", 0)),
        "compress_linears_s": round(float(ctx.shares.get("compress_s", 0.0)), 4),
        "forward_s": round(float(ctx.shares.get("forward_s", 0.0)), 4),
        "comm_s": round(float(ctx.shares.get("comm_s", 0.0)), 4),
        "compress_s": round(float(timings.get("compress_s", 0.0)), 4),
    }
    return {
        "world_size": ctx.world_size,
        "backend": ctx.backend,
        "resume": False,
        "ranks": ctx.all_gather_object(mine),
    }


def _finish(
    plan: Any,
    module: Any,
    model: torch.nn.Module,
    report: dict[str, Any],
    run_dir: Path,
    zs_tasks: tuple,
    device: str,
    t_start: float,
) -> dict[str, Any]:
    """Zero-shot, exports and ``report.json`` (rank zero of a distributed run)."""
    from .export import write_hf, write_packed, write_report

    if zs_tasks:
        with stage(module.timings, "zero_shot"):
            report["zero_shot"] = _zero_shot(model, module.tokenizer, plan, device)

    if module.loaded is not None and module.loaded.embeddings is not None:
        report["embeddings"] = module.loaded.embeddings
    reports = module.calib_result.reports if module.calib_result is not None else []
    report["layers"] = reports
    report["layers_summary"] = summarize_layers(reports)
    report["size"] = linear_sizes(model) if plan.export.packed else {}
    if module.calib_result is not None:
        report["resumed_blocks"] = module.calib_result.resumed_blocks
        report["resume"] = {
            "resumed_blocks": module.calib_result.resumed_blocks,
            "discarded_state": module.calib_result.discarded_state,
            "fingerprint": module.calib_result.fingerprint,
        }
        report["block_seconds"] = module.calib_result.block_seconds
    with stage(module.timings, "export"):
        if plan.export.packed and report["size"]:
            report["size"] = write_packed(  # sizes measured from the written file
                model,
                module.tokenizer,
                run_dir / "packed",
                plan=plan,
                results={"ppl": report["ppl"], "ppl_dense": report["ppl_dense"]},
                calibration=module.fingerprint,
                dtype=module.export_dtype,
            )
            report["packed_dir"] = str(run_dir / "packed")
        if plan.export.servable:  # before write_hf, which merges the SLiMLinear layers away
            from .servable import describe, write_servable

            with stage(module.timings, "export_servable"):
                report["servable"] = write_servable(model, module.tokenizer, run_dir / "servable")
            report["servable_dir"] = str(run_dir / "servable")
            log.info(describe(report["servable"]))
        if plan.export.hf:
            write_hf(model, module.tokenizer, run_dir / "hf", packed=plan.export.packed)
            report["hf_dir"] = str(run_dir / "hf")
    plot = plot_layers(reports, run_dir / "layers.png")
    if plot is not None:
        report["plot"] = str(plot)
    return write_report(report, run_dir, module.timings, t_start)
