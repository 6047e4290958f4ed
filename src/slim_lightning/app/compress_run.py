"""``run_compress(cfg)``: the body of ``compress.py`` (tests call it directly)."""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from ..checkpoint.layout import linear_sizes
from ..compress.engine import summarize_layers
from ..compress.plan import build_plan
from ..memory import reset_stages, stage
from .export import report_header, write_outputs, write_report
from .report import plot_layers
from .stream_export import offloaded_blocks, offloaded_metas

log = logging.getLogger(__name__)


def _zero_shot(model: torch.nn.Module, tokenizer: Any, plan: Any, device: str) -> dict[str, Any]:
    from ..data.evaluation import zero_shot

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
    from ..compress.distributed import init_distributed, shutdown
    from .rundir import record_early_failure, run_session

    run_dir = Path(run_dir)
    try:
        plan = build_plan(cfg)  # every value validated before anything heavy happens
    except Exception as e:
        record_early_failure(run_dir, "compress", e)
        raise
    container = OmegaConf.to_container(cfg, resolve=True)
    # several processes (torchrun / srun): slim_lightning.compress.distributed; one process: None
    ctx = init_distributed(plan.device)
    ok = False
    try:
        if ctx is None:
            with run_session(run_dir, "compress", config=container) as status:
                return _run_compress(plan, container, run_dir, status)
        report = _run_distributed(ctx, plan, container, run_dir)
        ok = True
        return report
    finally:
        shutdown(ctx, synchronize=ok)


def _run_distributed(ctx: Any, plan: Any, container: dict, run_dir: Path) -> dict[str, Any]:
    """``_run_compress`` on every rank: rank zero's run directory (Hydra's timestamped default
    may differ between ranks), locked and written by rank zero only; no resume state."""
    from contextlib import ExitStack

    from ..compress.distributed import follow_run_dir, resume_requested
    from ..errors import ConfigError
    from .rundir import run_session

    if plan.spec.needs_samples:  # before any weights load
        raise ConfigError(
            "quant.method",
            plan.spec.quant.method,
            f"a quantiser without calibration samples with several processes (world size "
            f"{ctx.world_size}): {plan.spec.quant.method} scores its bit allocation on each "
            "layer's real inputs, which the distributed statistics exchange does not carry; "
            "run it in one process",
        )
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
    """The six steps: preflight -> load the base -> dense evaluation -> load-or-compress (the
    LightningModule's ``setup``) -> evaluation -> outputs (rank zero)."""
    from ..compress.distributed import agreed
    from ..compress.distributed import perplexity_sharded as perplexity_on
    from ..compress.pipeline import load_base
    from ..data.evaluation import streaming_perplexity
    from ..errors import ConfigError
    from ..train.module import SLiMModule
    from .preflight import preflight

    t_start = time.perf_counter()
    reset_stages()  # per-stage memory of this run only
    if plan.export.servable and plan.spec.is_identity:
        raise ConfigError(
            "export.servable", True, "false for an identity (uncompressed) method: nothing to serve"
        )
    timings: dict[str, float] = {}
    with stage(timings, "preflight"):
        prepared = preflight(plan, compress=not plan.spec.is_identity)
    plan = prepared.plan  # engine.streaming decided
    torch.manual_seed(plan.seed)
    device = plan.device
    with stage(timings, "load_base"):
        base = load_base(plan, prepared)
    timings.update(base.timings)

    eval_name = getattr(plan.eval, "name", None) or getattr(plan.eval, "source", "eval")
    report = report_header(status, plan, container, run_dir)
    report["streaming"] = prepared.streaming
    report.update(ppl={}, ppl_dense={})
    windows = prepared.eval_windows
    streaming = getattr(plan.engine, "streaming", False) is True
    dense_ppl = None
    if streaming:  # the dense model is never whole in memory: evaluated one block at a time
        dense_ppl = functools.partial(streaming_perplexity, stream=base.stream)
    zs_tasks = tuple(getattr(plan.eval, "zero_shot", ()) or ()) if plan.eval is not None else ()
    # one perplexity loop (evaluation.perplexity) for the dense and the compressed model
    if windows is not None:
        report["eval_windows"] = list(windows.shape)
        if plan.eval_dense:
            with stage(timings, "eval_dense"):
                dense = perplexity_on(
                    ctx,
                    base.model,
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
        with stage(timings, "zero_shot_dense"):
            report["zero_shot_dense"] = _zero_shot(base.model, base.tokenizer, plan, device)

    # the LightningModule's setup compresses (pipeline.load_or_compress): one call, one result
    if streaming and base.stream is not None:  # compressed blocks wait on disk until export
        base.stream.keep_offloaded = True
    module = SLiMModule(plan, str(run_dir), prepared=prepared, base=base, dist=ctx)
    with stage(timings, "compress_setup"):
        module.setup("validate")
    loaded = module.loaded
    timings.update(loaded.timings)
    stream = loaded.stream if loaded.stream is not None and loaded.stream.offloaded else None
    if windows is not None:
        with stage(timings, "eval"):  # (streaming: one packed block in memory at a time)
            out = perplexity_on(
                ctx,
                loaded.model,
                windows,
                None if stream is None else functools.partial(streaming_perplexity, stream=stream),
                device=device,
                progress=plan.engine.progress,
            )
        report["ppl"][eval_name] = out["ppl"]
    # streaming: the exports open the packed blocks one at a time (the rest is on the CPU)
    model = loaded.model.to("cpu") if stream is None else loaded.model
    if ctx is not None:
        report["world_size"] = ctx.world_size
        report["distributed"] = _shares(ctx, timings)
        if not main:  # waits for rank zero's outputs (an error there is raised here too)
            if stream is not None:
                stream.discard_offloaded()
            ctx.agree(None, "rank 0 wrote the outputs")
            return report
    else:
        report["world_size"] = 1
    with agreed(ctx, "rank 0 wrote the outputs"):
        report = _finish(plan, loaded, model, report, run_dir, zs_tasks, timings, t_start, stream)
    if stream is not None:
        stream.discard_offloaded()  # written: a later resume re-installs from calib_state
    return report


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
    loaded: Any,
    model: torch.nn.Module,
    report: dict[str, Any],
    run_dir: Path,
    zs_tasks: tuple,
    timings: dict[str, float],
    t_start: float,
    stream: Any = None,
) -> dict[str, Any]:
    """Zero-shot, exports and ``report.json`` (rank zero of a distributed run). ``stream``: the
    ``StreamingSource`` whose packed blocks wait on disk (the exports stream them)."""
    if zs_tasks:
        with stage(timings, "zero_shot"):
            if stream is not None:  # zero-shot runs the whole model: read back for it
                stream.reinstall_all(keep=True)
            report["zero_shot"] = _zero_shot(model, loaded.tokenizer, plan, plan.device)
            if stream is not None:  # skeletons again: the exports read one block at a time
                for i in stream.offloaded_layers:
                    stream.evict_block(stream.blocks[i])

    if loaded.embeddings is not None:
        report["embeddings"] = loaded.embeddings
    calib = loaded.calib_result
    if calib is not None and calib.experts:
        report["experts"] = {
            "min_tokens": plan.engine.expert_min_tokens,
            "rule": "an expert routed fewer calibration tokens than min_tokens in a batch also "
            "saw all of that batch's tokens, for its statistics only (topped_up)",
            "layers": calib.experts,
        }
    reports = calib.reports if calib is not None else []
    report["layers"] = reports
    report["layers_summary"] = summarize_layers(reports)
    offloaded = offloaded_metas(stream) if stream is not None else None
    report["size"] = linear_sizes(model, offloaded) if plan.export.packed else {}
    if calib is not None:
        report["resumed_blocks"] = calib.resumed_blocks
        report["resume"] = {
            "resumed_blocks": calib.resumed_blocks,
            "discarded_state": calib.discarded_state,
            "fingerprint": calib.fingerprint,
        }
        report["block_seconds"] = calib.block_seconds
    write_outputs(
        report,
        model,
        loaded.tokenizer,
        run_dir,
        plan,
        timings,
        results={"ppl": report["ppl"], "ppl_dense": report["ppl_dense"]},
        calibration=loaded.fingerprint,
        dtype=loaded.export_dtype,
        source_sha256=loaded.source_sha256,
        blocks=offloaded_blocks(stream) if stream is not None else None,
    )
    plot = plot_layers(reports, run_dir / "layers.png")
    if plot is not None:
        report["plot"] = str(plot)
    return write_report(report, run_dir, timings, t_start)
