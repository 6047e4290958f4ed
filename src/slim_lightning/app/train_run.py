"""``run_train(cfg, run_dir)``: the body of ``train.py`` (tests call it directly).

Order: validate every value (``build_train_plan``) -> evaluate the compressed model (setup
compresses, or loads ``compressed.path``) -> with ``+peft=true`` fit the adapters on the ``data``
blocks, re-quantise them, evaluate again -> rank zero writes the packed checkpoint
(``run_dir/packed``) and ``report.json`` (``ppl_before`` / ``ppl_after`` per evaluation set).

Every process runs this function (the DDP launcher re-executes ``train.py`` per rank), so the
sequence of trainer calls is the same on all ranks.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ..checkpoint.layout import linear_sizes
from ..data.evaluation import indexed_eval_loader as eval_loader
from ..memory import reset_stages, stage
from ..train.logger_plan import LoggerConfig, logger_class, resolved_offline
from ..train.plan import build_train_plan
from .export import report_header, write_outputs, write_report

log = logging.getLogger(__name__)


def build_loggers(lc: LoggerConfig, run_dir: Path) -> list:
    """The ``logger`` group's ``_target_`` node, instantiated (none: ``logger=none``).

    ``save_dir`` defaults to ``run_dir`` (wandb files under ``run_dir/wandb``); for wandb also
    ``name`` (default: the run directory's name), ``offline`` (``auto``: online only when
    WANDB_API_KEY is set or WANDB_MODE=online) and ``log_model=False`` (checkpoints stay local).
    The project extras (``slim_*``) were popped by ``build_logger_config``.
    """
    if lc.node is None:
        return []
    import inspect

    from hydra.utils import instantiate
    from lightning.pytorch.loggers import WandbLogger

    node = dict(lc.node)
    cls = logger_class(node["_target_"])
    if "save_dir" in inspect.signature(cls.__init__).parameters and node.get("save_dir") is None:
        node["save_dir"] = str(run_dir)
    if issubclass(cls, WandbLogger):
        node["name"] = node.get("name") or run_dir.name
        node["offline"] = resolved_offline(node.get("offline", "auto"))
        node.setdefault("log_model", False)
    return [instantiate(node, _convert_="all")]


def build_callbacks(cfg: DictConfig, run_dir: Path, peft: bool) -> list:
    """The ``callbacks`` group's ``_target_`` nodes (checkpoints default to
    ``run_dir/checkpoints``)."""
    from hydra.utils import instantiate
    from lightning.pytorch.callbacks import ModelCheckpoint

    out = []
    node = cfg.get("callbacks") or {}
    for sub in node.values():
        if sub is None:
            continue
        cb = instantiate(sub)
        if isinstance(cb, ModelCheckpoint):
            if not peft:
                continue
            if cb.dirpath is None:
                cb.dirpath = str(run_dir / "checkpoints")
        out.append(cb)
    return out


def _eval_name(plan: Any) -> str:
    return getattr(plan.eval, "name", None) or getattr(plan.eval, "source", "eval")


def run_train(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    """Compresses (or loads), evaluates, optionally fine-tunes the adapters; returns the report.

    The run directory is held by ``rundir.run_session`` (lock, ``status`` in report.json) and
    ``preflight`` checks the model, the compressed checkpoint, ``ckpt_path`` and every text before
    any weights load.
    """
    from .rundir import record_early_failure, run_session

    run_dir = Path(run_dir)
    try:
        tp = build_train_plan(cfg)  # every value validated before anything heavy happens
    except Exception as e:
        record_early_failure(run_dir, "train", e)
        raise
    container = OmegaConf.to_container(cfg, resolve=True)
    keep = (tp.compressed_path, tp.ckpt_path)
    with run_session(run_dir, "train", config=container, keep=keep) as status:
        tp = _resume_interrupted(tp, run_dir, status)
        return _run_train(tp, cfg, container, run_dir, status)


def _resume_interrupted(tp: Any, run_dir: Path, status: dict[str, Any]) -> Any:
    """An interrupted training run started again (no ``ckpt_path`` given) continues from its
    newest checkpoint in ``RUN/checkpoints`` (recorded as ``status["resumed_from"]``)."""
    prev = status.get("previous") or {}
    if (
        tp.ckpt_path is not None
        or prev.get("status") != "interrupted"
        or prev.get("kind") != "train"
    ):
        return tp
    ckpts = sorted(
        (run_dir / "checkpoints").glob("*.ckpt"), key=lambda p: (p.stat().st_mtime, p.name)
    )
    if not ckpts:
        return tp
    status["resumed_from"] = str(ckpts[-1])
    log.info("resuming the interrupted run from %s", ckpts[-1])
    return dataclasses.replace(tp, ckpt_path=str(ckpts[-1]))


def _check_teacher_early(plan: Any, meta: dict) -> None:
    """The distillation teacher's parent check before anything loads, where its weights are
    local files (hashed once, cached); otherwise it runs when the teacher loads."""
    from ..models.load import weights_digest
    from ..train.distill import check_teacher

    try:
        digest = weights_digest(plan.model)
    except (ValueError, OSError):  # (not local: checked on load)
        return
    check_teacher(plan, meta, digest)


def _run_train(
    tp: Any, cfg: DictConfig, container: dict, run_dir: Path, status: dict[str, Any]
) -> dict[str, Any]:
    import lightning as L

    from ..data.datamodule import SLiMDataModule
    from ..train.module import SLiMModule
    from .preflight import preflight

    t_start = time.perf_counter()
    reset_stages()  # per-stage memory of this run only
    plan = tp.plan
    prepared = preflight(
        plan,
        compress=tp.compressed_path is None and not plan.spec.is_identity,
        data=tp.data if tp.peft else None,
        compressed_path=tp.compressed_path,
        ckpt_path=tp.ckpt_path,
    )
    plan = prepared.plan  # engine.streaming decided
    tp = dataclasses.replace(tp, plan=plan)
    if tp.peft and tp.train.loss != "lm" and prepared.compressed_meta is not None:
        _check_teacher_early(plan, prepared.compressed_meta)
    L.seed_everything(plan.seed, workers=True, verbose=False)
    module = SLiMModule(plan, str(run_dir), train=tp, prepared=prepared)
    module.timings["preflight_s"] = time.perf_counter() - t_start
    tokenizer = module.get_tokenizer()
    windows = prepared.eval_windows
    loggers = build_loggers(tp.logger, run_dir)
    callbacks = build_callbacks(cfg, run_dir, tp.peft)
    val_every = tp.train.val_every_n_steps * tp.trainer.accumulate_grad_batches
    trainer = L.Trainer(
        **tp.trainer.kwargs(),
        val_check_interval=val_every or None,
        check_val_every_n_epoch=None if val_every else 1,
        logger=loggers or False,
        callbacks=callbacks,
        enable_checkpointing=any(type(c).__name__ == "ModelCheckpoint" for c in callbacks),
        default_root_dir=str(run_dir),
    )
    eval_name = _eval_name(plan) if plan.eval is not None else None
    report = report_header(status, plan, container, run_dir, peft=tp.peft)
    report.update(ppl_before={}, ppl_after={})

    module.val_prefix = "eval"
    if windows is not None and (tp.train.eval_before or not tp.peft):
        t0 = time.perf_counter()
        with stage(module.timings, "setup_and_eval_before"):  # setup compresses or loads
            trainer.validate(module, dataloaders=eval_loader(windows), verbose=False)
        setup_s = module.timings.get("compress_s", 0.0) + module.timings.get("calib_data_s", 0.0)
        module.timings["eval_before_s"] = time.perf_counter() - t0 - setup_s
        report["ppl_before"][eval_name] = module.last_val["val/ppl"]
        report["eval_windows"] = list(windows.shape)
    elif not tp.peft:
        module.setup("validate")  # nothing to evaluate: compress (fit's setup does it otherwise)

    if tp.peft:
        dm = SLiMDataModule(
            tp.data, tokenizer, validate=bool(val_every), blocks=prepared.train_blocks
        )
        accumulate = tp.trainer.accumulate_grad_batches
        steps = tp.trainer.max_steps or tp.data.num_steps(trainer.world_size, accumulate)
        trainer.fit_loop.epoch_loop.max_steps = steps
        module.val_prefix = "val"
        with stage(module.timings, "fit"):
            trainer.fit(module, datamodule=dm, ckpt_path=tp.ckpt_path)
        stats = dict(module.train_stats)
        stats["steps"] = int(trainer.global_step)
        stats["tokens_per_step"] = tp.data.tokens_per_step(trainer.world_size, accumulate)
        stats["tokens_per_s"] = stats["tokens"] / max(stats["seconds"], 1e-9)
        stats["train_blocks"] = int(dm.train_blocks.shape[0])
        stats["epochs"] = (
            stats["steps"] * stats["tokens_per_step"] / max(1, dm.train_blocks.numel())
        )
        report["train"] = stats
        report["trainable_params"] = module.n_trainable
        report["trainable_names"] = len(module.trainable_names)
        if windows is not None:
            module.val_prefix = "eval"
            with stage(module.timings, "eval_after"):
                trainer.validate(module, dataloaders=eval_loader(windows), verbose=False)
            report["ppl_after"][eval_name] = module.last_val["val/ppl"]
    else:
        report["ppl_after"] = dict(report["ppl_before"])
    report["ppl"] = report["ppl_after"]

    model = module.model.to("cpu")
    report["layers_summary"] = module.compression_summary()
    report["size"] = linear_sizes(model) if plan.export.packed else {}
    report["world_size"] = trainer.world_size
    if module.loaded_meta is not None:
        report["compressed_from"] = tp.compressed_path
    if trainer.is_global_zero:
        results = {
            k: report[k] for k in ("ppl_before", "ppl_after", "peft", "train") if k in report
        }
        write_outputs(
            report,
            model,
            tokenizer,
            run_dir,
            plan,
            module.timings,
            results=results,
            calibration=module.fingerprint,
            dtype=module.export_dtype,
            base_sha256=module.base_sha256(),
            source_sha256=module.source_sha256,
            hf=False,  # train.py writes packed/ and servable/ (hf/ is compress.py's)
        )
        report["ppl_dense"] = {}
        write_report(report, run_dir, module.timings, t_start)
        _log_final(loggers, report, tp, run_dir)
        print(f"ppl before/after fine-tuning: {report['ppl_before']} -> {report['ppl_after']}")
    else:
        module.timings["total_s"] = time.perf_counter() - t_start
        report["timings"] = module.timings
    return report


def _log_final(loggers: list, report: dict[str, Any], tp: Any, run_dir: Path) -> None:
    metrics: dict[str, float] = {}
    for k in ("ppl_before", "ppl_after"):
        for name, v in report[k].items():
            metrics[f"eval/{k}/{name}"] = float(v)
    if "size" in report and report["size"]:
        metrics["compress/ratio_vs_fp16"] = float(report["size"]["ratio_vs_fp16"])
    if "train" in report:
        metrics["train/final_tokens_per_s"] = float(report["train"]["tokens_per_s"])
    for lg in loggers:
        lg.log_metrics(metrics)
        if type(lg).__name__ == "WandbLogger":
            exp = lg.experiment
            exp.summary.update(metrics)
            if tp.logger.log_artifact and "packed_dir" in report:
                import wandb

                art = wandb.Artifact(f"packed-{run_dir.name}", type="model")
                art.add_dir(report["packed_dir"])
                exp.log_artifact(art)
        lg.finalize("success")
