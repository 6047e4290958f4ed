"""Typed, validated fine-tuning settings (``train.py``'s groups), checked before any model loads.

Groups of ``train.py`` (besides the compression groups of ``compress.py``):

* ``trainer``: :class:`TrainerConfig` (presets cpu / gpu / ddp / fsdp) -> ``lightning.Trainer``.
* ``logger``: a Lightning logger ``_target_`` node (wandb, offline unless a key is configured /
  csv / none), validated into :class:`LoggerConfig`; ``train_run.build_loggers`` instantiates it.
* ``optimizer``: a ``_partial_`` Hydra node (AdamW, Adafactor, bitsandbytes AdamW8bit).
* ``callbacks``: ``_target_`` nodes (Lightning checkpointing of the adapters).
* ``data``: ``slim_lightning.data.datamodule.TrainDataConfig``.
* ``train`` (plain section): :class:`TrainConfig` (what trains, schedule, checkpointing).

:func:`build_train_plan` validates all of it before any model is loaded.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..compress.plan import CompressPlan, build_plan, instantiate_group
from ..errors import (
    ConfigError,
    check_bool,
    check_choice,
    check_int,
    check_range,
    make_dataclass,
)
from .logger_plan import LoggerConfig, build_logger_config

STRATEGIES = ("auto", "ddp", "fsdp")
PRECISIONS = ("auto", "32-true", "bf16-mixed", "16-mixed", "bf16-true")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda")


@dataclass(frozen=True)
class TrainConfig:
    """What trains and how (the ``train`` section of ``conf/train.yaml``).

    Attributes:
        norms: also train the norm weights (the reference trains norms, embeddings and lm_head).
        embeddings: also train the token embeddings (tied to lm_head in SmolLM2).
        lm_head: also train the output projection.
        warmup_steps: linear warm-up from 0 over this many optimiser steps.
        schedule: ``linear`` (decay to 0 at the last step, the reference), ``cosine``,
            ``constant`` (after warm-up).
        gradient_checkpointing: recompute block activations in the backward (large models).
        requantize: snap quantised adapters back to their 4-bit grid when fitting ends.
        eval_before: evaluate the compressed model before fine-tuning (``ppl_before``).
        val_every_n_steps: validation on the held-out blocks every N optimiser steps (0: never).
        rank_hashes: each rank writes sha256 of its base buffers and adapters to
            ``run_dir/rank_hashes/`` after setup and after fitting (checks DDP consistency).
        loss: ``lm`` (next-token loss on the data), ``kd`` (KL to the dense parent, ``model=``,
            as a frozen teacher: ``train.distill``), ``kd_squarehead`` (``kd`` + per-layer
            feature matching).
        kd_temperature: softmax temperature of ``kd`` (the loss is scaled by ``T^2``).
        lm_weight: weight of the next-token loss added to the ``kd*`` losses (0: none).
        squarehead_weight: weight of the feature term of ``kd_squarehead``.
        teacher_dtype: ``auto`` (bfloat16 on a GPU, float32 on CPU), float32, bfloat16, float16.
    """

    norms: bool = False
    embeddings: bool = False
    lm_head: bool = False
    warmup_steps: int = 5
    schedule: str = "linear"
    gradient_checkpointing: bool = False
    requantize: bool = True
    eval_before: bool = True
    val_every_n_steps: int = 50
    rank_hashes: bool = False
    loss: str = "lm"
    kd_temperature: float = 1.0
    lm_weight: float = 0.0
    squarehead_weight: float = 1.0
    teacher_dtype: str = "auto"

    def __post_init__(self) -> None:
        check_choice("train.loss", self.loss, ("lm", "kd", "kd_squarehead"))
        check_range("train.kd_temperature", self.kd_temperature, 0.0, 100.0, lo_open=True)
        check_range("train.lm_weight", self.lm_weight, 0.0, 100.0)
        check_range("train.squarehead_weight", self.squarehead_weight, 0.0, 100.0)
        check_choice(
            "train.teacher_dtype", self.teacher_dtype, ("auto", "float32", "bfloat16", "float16")
        )
        for k in ("norms", "embeddings", "lm_head", "gradient_checkpointing", "requantize"):
            check_bool(f"train.{k}", getattr(self, k))
        check_bool("train.eval_before", self.eval_before)
        check_bool("train.rank_hashes", self.rank_hashes)
        check_int("train.warmup_steps", self.warmup_steps, 0)
        check_choice("train.schedule", self.schedule, ("linear", "cosine", "constant"))
        check_int("train.val_every_n_steps", self.val_every_n_steps, 0)


@dataclass(frozen=True)
class TrainerConfig:
    """Lightning Trainer settings (the ``trainer`` group).

    ``max_steps: null`` derives the step count from the token budget ``data.train_tokens``.
    ``strategy`` ``ddp`` uses buffers that never change (packed weights), so it does not broadcast
    buffers every step; ``dist_timeout_min`` bounds how long other ranks wait at the barrier while
    rank zero compresses.
    """

    accelerator: str = "auto"
    devices: int | str = 1
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "auto"
    max_steps: int | None = None
    accumulate_grad_batches: int = 1
    gradient_clip_val: float | None = 1.0
    gradient_clip_algorithm: str = "norm"
    limit_val_batches: int | float = 1.0
    log_every_n_steps: int = 1
    enable_progress_bar: bool = True
    deterministic: bool = False
    dist_timeout_min: int = 120

    def __post_init__(self) -> None:
        check_choice("trainer.accelerator", self.accelerator, ACCELERATORS)
        if self.devices != "auto":
            check_int("trainer.devices", self.devices, 1)
        check_int("trainer.num_nodes", self.num_nodes, 1)
        check_choice("trainer.strategy", self.strategy, STRATEGIES)
        check_choice("trainer.precision", self.precision, PRECISIONS)
        if self.max_steps is not None:
            check_int("trainer.max_steps", self.max_steps, 1)
        check_int("trainer.accumulate_grad_batches", self.accumulate_grad_batches, 1)
        if self.gradient_clip_val is not None:
            check_range("trainer.gradient_clip_val", self.gradient_clip_val, 0.0, 1e9)
        check_choice(
            "trainer.gradient_clip_algorithm", self.gradient_clip_algorithm, ("norm", "value")
        )
        check_range("trainer.limit_val_batches", self.limit_val_batches, 0.0, 1e9)
        check_int("trainer.log_every_n_steps", self.log_every_n_steps, 1)
        check_bool("trainer.enable_progress_bar", self.enable_progress_bar)
        check_bool("trainer.deterministic", self.deterministic)
        check_int("trainer.dist_timeout_min", self.dist_timeout_min, 1)

    def resolved_precision(self) -> str:
        """``auto``: bf16-mixed on a CUDA device with bf16 support, else 32-true."""
        if self.precision != "auto":
            return self.precision
        gpu = self.accelerator in ("gpu", "cuda") or (
            self.accelerator == "auto" and torch.cuda.is_available()
        )
        if gpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return "bf16-mixed"
        return "32-true"

    def strategy_object(self) -> Any:
        """The Lightning strategy (string or configured object)."""
        from datetime import timedelta

        timeout = timedelta(minutes=self.dist_timeout_min)
        if self.strategy == "ddp":
            from lightning.pytorch.strategies import DDPStrategy

            # packed weights are frozen buffers: broadcasting them every step is pure traffic
            return DDPStrategy(timeout=timeout, broadcast_buffers=False)
        if self.strategy == "fsdp":
            from lightning.pytorch.strategies import FSDPStrategy

            # frozen packed buffers and trainable adapters share wrapped units: orig params needed
            return FSDPStrategy(timeout=timeout, use_orig_params=True)
        return "auto"

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``lightning.Trainer`` (max_steps is set after the budget)."""
        return {
            "accelerator": self.accelerator,
            "devices": self.devices,
            "num_nodes": self.num_nodes,
            "strategy": self.strategy_object(),
            "precision": self.resolved_precision(),
            "max_epochs": -1,
            "max_steps": self.max_steps or -1,
            "accumulate_grad_batches": self.accumulate_grad_batches,
            "gradient_clip_val": self.gradient_clip_val,
            "gradient_clip_algorithm": self.gradient_clip_algorithm,
            "limit_val_batches": self.limit_val_batches,
            "log_every_n_steps": self.log_every_n_steps,
            "enable_progress_bar": self.enable_progress_bar,
            "deterministic": self.deterministic,
            "num_sanity_val_steps": 0,
            "enable_model_summary": False,
        }


HYDRA_KEYS = ("_target_", "_args_", "_recursive_", "_convert_", "_partial_")


@dataclass(frozen=True)
class TrainPlan:
    """Everything ``train.py`` needs, validated before any model is loaded."""

    plan: CompressPlan
    peft: bool
    train: TrainConfig
    trainer: TrainerConfig
    logger: LoggerConfig
    data: Any  # datamodule.TrainDataConfig | None
    optimizer: Callable[..., torch.optim.Optimizer] | None
    compressed_path: str | None
    save_compressed: bool
    ckpt_path: str | None


OPTIMIZER_HINT = (
    "an importable optimizer class, e.g. torch.optim.AdamW, transformers.optimization.Adafactor, "
    "bitsandbytes.optim.AdamW8bit (conf/optimizer/*.yaml)"
)


def build_optimizer_factory(cfg: Any) -> Callable[..., torch.optim.Optimizer]:
    """Validates the ``optimizer`` node and returns its ``functools.partial`` (params missing)."""
    from omegaconf import OmegaConf

    node = cfg.get("optimizer")
    if node is None:
        raise ConfigError("optimizer", None, "an optimizer group, e.g. optimizer=adamw")
    values = OmegaConf.to_container(node, resolve=True)
    target = values.get("_target_")
    if not values.get("_partial_", False):
        raise ConfigError("optimizer._partial_", values.get("_partial_"), "true")
    check_range("optimizer.lr", values.get("lr"), 0.0, 10.0, lo_open=True)
    if "weight_decay" in values:
        check_range("optimizer.weight_decay", values["weight_decay"], 0.0, 10.0)
    try:
        factory = instantiate_group(cfg, "optimizer")
    except ConfigError:
        raise
    except Exception as e:  # Hydra's wrapper for a missing module / class / bad keyword
        raise ConfigError("optimizer._target_", target, f"{OPTIMIZER_HINT} ({e})") from None
    if not callable(factory):
        raise ConfigError("optimizer._target_", target, OPTIMIZER_HINT)
    return factory


def build_train_plan(cfg: Any) -> TrainPlan:
    """Validates a composed ``train.yaml`` config (no model is loaded)."""
    from omegaconf import OmegaConf

    from ..data.config import TrainDataConfig, check_disjoint

    plan = build_plan(cfg)
    peft = cfg.get("peft", False)
    if not isinstance(peft, bool):
        raise ConfigError("peft", peft, "true or false (+peft=true)")

    def section(key: str) -> dict:
        node = cfg.get(key)
        return {} if node is None else OmegaConf.to_container(node, resolve=True)

    train = make_dataclass(TrainConfig, "train", section("train"))
    trainer_values = {k: v for k, v in section("trainer").items() if k != "_target_"}
    trainer = make_dataclass(TrainerConfig, "trainer", trainer_values)
    logger = build_logger_config(section("logger"))
    comp = section("compressed")
    for k in comp:
        if k not in ("path", "save"):
            raise ConfigError(f"compressed.{k}", comp[k], "keys path, save")
    path = comp.get("path")
    if path is not None and not (Path(str(path)).expanduser() / "slim.json").is_file():
        raise ConfigError("compressed.path", path, "a packed checkpoint directory (with slim.json)")
    save = comp.get("save", True)
    check_bool("compressed.save", save)
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path is not None and ckpt_path != "last" and not Path(str(ckpt_path)).is_file():
        raise ConfigError("ckpt_path", ckpt_path, "an existing Lightning .ckpt file or null")
    if trainer.strategy != "auto" and not plan.export.packed:
        raise ConfigError("export.packed", False, "true with a distributed strategy")
    data = optimizer = None
    if peft:
        if not plan.export.packed:
            raise ConfigError(
                "export.packed", False, "true with +peft=true (adapters must stay separate)"
            )
        _check_tables_trainable(train, plan, path)
        extra = train.norms or train.embeddings or train.lm_head
        if plan.spec.lowrank.method == "none" and path is None and not extra:
            raise ConfigError(
                "lowrank.method",
                "none",
                "slim or naive with +peft=true (nothing to train), or train.norms=true",
            )
        data = instantiate_group(cfg, "data")
        if not isinstance(data, TrainDataConfig):
            raise ConfigError(
                "data._target_", type(data).__name__, "slim_lightning.data.TrainDataConfig"
            )
        check_disjoint(data, plan.eval)
        optimizer = build_optimizer_factory(cfg)
    return TrainPlan(
        plan=plan,
        peft=peft,
        train=train,
        trainer=trainer,
        logger=logger,
        data=data,
        optimizer=optimizer,
        compressed_path=None if path is None else str(Path(str(path)).expanduser()),
        save_compressed=save,
        ckpt_path=None if ckpt_path is None else str(ckpt_path),
    )


def _check_tables_trainable(train: Any, plan: Any, path: Any) -> None:
    """``train.embeddings`` / ``train.lm_head`` need float tables: refused (before any weights
    load) when the run quantises them (``embeddings.bits``) or the checkpoint stores them as
    codes (``slim.json`` of ``compressed.path``)."""
    import json

    wanted = [k for k in ("embeddings", "lm_head") if getattr(train, k)]
    if not wanted:
        return
    if path is not None:
        meta_file = Path(str(path)).expanduser() / "slim.json"
        try:
            packed = json.loads(meta_file.read_text()).get("embeddings") or {}
        except (OSError, ValueError, AttributeError):
            return  # the loader names a damaged checkpoint itself
        if packed:
            raise ConfigError(
                f"train.{wanted[0]}",
                True,
                f"false: compressed.path={path} stores {', '.join(sorted(packed))} as quantised "
                "codes (not trainable); compress again with embeddings.bits=null to train them",
            )
    elif plan.embeddings.bits is not None:
        raise ConfigError(
            f"train.{wanted[0]}",
            True,
            f"false while embeddings.bits={plan.embeddings.bits} (the tables become quantised "
            "codes, not trainable); set embeddings.bits=null to train them",
        )


def lr_lambda(warmup: int, total: int, schedule: str) -> Callable[[int], float]:
    """Multiplier of the base lr at optimiser step ``s``: linear warm-up, then the schedule."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if schedule == "constant" or total <= warmup:
            return 1.0
        frac = min(1.0, (step - warmup) / max(1, total - warmup))
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * frac))
        return max(0.0, 1.0 - frac)

    return f
