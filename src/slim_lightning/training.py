"""Typed, validated fine-tuning settings and the pieces ``train_run`` assembles.

Groups of ``train.py`` (besides the compression groups of ``compress.py``):

* ``trainer``: :class:`TrainerConfig` (presets cpu / gpu / ddp / fsdp) -> ``lightning.Trainer``.
* ``logger``: :class:`LoggerConfig` (wandb, offline unless a key is configured / csv / none).
* ``optimizer``: a ``_partial_`` Hydra node (AdamW, Adafactor, bitsandbytes AdamW8bit).
* ``callbacks``: ``_target_`` nodes (Lightning checkpointing of the adapters).
* ``data``: ``slim_lightning.datamodule.TrainDataConfig``.
* ``train`` (plain section): :class:`TrainConfig` (what trains, schedule, checkpointing).

:func:`build_train_plan` validates all of it before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import CompressPlan, build_plan, instantiate_group
from .errors import ConfigError, check_choice, check_range

STRATEGIES = ("auto", "ddp", "fsdp")
PRECISIONS = ("auto", "32-true", "bf16-mixed", "16-mixed", "bf16-true")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda")


def _int(key: str, v: Any, lo: int) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v < lo:
        raise ConfigError(key, v, f"an integer >= {lo}")


def _bool(key: str, v: Any) -> None:
    if not isinstance(v, bool):
        raise ConfigError(key, v, "true or false")


def make_dataclass(cls: type, group: str, values: dict) -> Any:
    """Builds dataclass ``cls`` from ``values``, naming the key of an unknown field."""
    names = {f.name for f in dataclasses.fields(cls)}
    for k in values:
        if k not in names:
            raise ConfigError(f"{group}.{k}", values[k], "keys " + ", ".join(sorted(names)))
    return cls(**values)


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
        throughput_steps: > 0 times this many steps of adapter training on the compressed model
            and on a dense copy with the same adapters (tokens/s into the report; single process).
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
    throughput_steps: int = 0

    def __post_init__(self) -> None:
        for k in ("norms", "embeddings", "lm_head", "gradient_checkpointing", "requantize"):
            _bool(f"train.{k}", getattr(self, k))
        _bool("train.eval_before", self.eval_before)
        _bool("train.rank_hashes", self.rank_hashes)
        _int("train.warmup_steps", self.warmup_steps, 0)
        check_choice("train.schedule", self.schedule, ("linear", "cosine", "constant"))
        _int("train.val_every_n_steps", self.val_every_n_steps, 0)
        _int("train.throughput_steps", self.throughput_steps, 0)


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
            _int("trainer.devices", self.devices, 1)
        _int("trainer.num_nodes", self.num_nodes, 1)
        check_choice("trainer.strategy", self.strategy, STRATEGIES)
        check_choice("trainer.precision", self.precision, PRECISIONS)
        if self.max_steps is not None:
            _int("trainer.max_steps", self.max_steps, 1)
        _int("trainer.accumulate_grad_batches", self.accumulate_grad_batches, 1)
        if self.gradient_clip_val is not None:
            check_range("trainer.gradient_clip_val", self.gradient_clip_val, 0.0, 1e9)
        check_choice(
            "trainer.gradient_clip_algorithm", self.gradient_clip_algorithm, ("norm", "value")
        )
        check_range("trainer.limit_val_batches", self.limit_val_batches, 0.0, 1e9)
        _int("trainer.log_every_n_steps", self.log_every_n_steps, 1)
        _bool("trainer.enable_progress_bar", self.enable_progress_bar)
        _bool("trainer.deterministic", self.deterministic)
        _int("trainer.dist_timeout_min", self.dist_timeout_min, 1)

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


@dataclass(frozen=True)
class LoggerConfig:
    """Experiment logging (the ``logger`` group).

    Attributes:
        kind: ``wandb`` | ``csv`` | ``none``.
        project, entity, name, group, tags: wandb run identity (name defaults to the run dir).
        offline: ``auto`` (online only when WANDB_API_KEY is set or WANDB_MODE=online),
            true, or false. wandb files go to ``run_dir/wandb``.
        log_artifact: upload the final packed checkpoint as a wandb artifact.
    """

    kind: str = "wandb"
    project: str = "slim-lightning"
    entity: str | None = None
    name: str | None = None
    group: str | None = None
    tags: tuple | list = ()
    offline: bool | str = "auto"
    log_artifact: bool = False

    def __post_init__(self) -> None:
        check_choice("logger.kind", self.kind, ("wandb", "csv", "none"))
        if self.offline not in ("auto", True, False):
            raise ConfigError("logger.offline", self.offline, "auto, true, false")
        _bool("logger.log_artifact", self.log_artifact)

    def resolved_offline(self) -> bool:
        if self.offline != "auto":
            return bool(self.offline)
        mode = os.environ.get("WANDB_MODE", "")
        return not (os.environ.get("WANDB_API_KEY") or mode == "online")


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

    from .datamodule import TrainDataConfig, check_disjoint

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
    log_values = {k: v for k, v in section("logger").items() if k != "_target_"}
    logger = make_dataclass(LoggerConfig, "logger", log_values)
    comp = section("compressed")
    for k in comp:
        if k not in ("path", "save"):
            raise ConfigError(f"compressed.{k}", comp[k], "keys path, save")
    path = comp.get("path")
    if path is not None and not (Path(str(path)).expanduser() / "slim.json").is_file():
        raise ConfigError("compressed.path", path, "a packed checkpoint directory (with slim.json)")
    save = comp.get("save", True)
    _bool("compressed.save", save)
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
                "data._target_", type(data).__name__, "slim_lightning.datamodule.TrainDataConfig"
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


# -- what trains ----------------------------------------------------------------------------------
def mark_trainable(
    model: nn.Module, *, norms: bool = False, embeddings: bool = False, lm_head: bool = False
) -> list[str]:
    """Freezes ``model`` except the SLiM adapters (and optionally norms / embeddings / lm_head).

    Returns:
        The names of the trainable parameters (``named_parameters`` of ``model``, tied weights
        once).
    """
    from .modules import SLiMLinear

    for p in model.parameters():
        p.requires_grad_(False)
    for mod in model.modules():
        if isinstance(mod, SLiMLinear) and mod.rank > 0:
            mod.lora_l.requires_grad_(True)
            mod.lora_r.requires_grad_(True)
        elif norms and "norm" in type(mod).__name__.lower():
            for p in mod.parameters(recurse=False):
                p.requires_grad_(True)
    if embeddings:
        model.get_input_embeddings().weight.requires_grad_(True)
    if lm_head and model.get_output_embeddings() is not None:
        model.get_output_embeddings().weight.requires_grad_(True)
    return [n for n, p in model.named_parameters() if p.requires_grad]


def count_trainable(model: nn.Module) -> int:
    """Number of distinct trainable scalars (a tied weight counts once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def requantize_all(model: nn.Module) -> int:
    """Snaps every quantised adapter back to its 4-bit grid and every fp adapter to its storage
    dtype, so the packed checkpoint holds exactly the model that was evaluated; returns the
    number of layers."""
    from .modules import SLiMLinear

    n = 0
    for mod in model.modules():
        if isinstance(mod, SLiMLinear):
            mod.requantize_adapters()
            mod.round_fp_adapters()  # fp adapters: onto their storage dtype
            n += 1
    return n


def state_hashes(model: nn.Module) -> dict[str, str]:
    """sha256 of the compressed base (every SLiMLinear buffer) and of the adapter parameters."""
    from .modules import SLiMLinear

    base, adapters = hashlib.sha256(), hashlib.sha256()
    for name, mod in sorted(model.named_modules(), key=lambda kv: kv[0]):
        if not isinstance(mod, SLiMLinear):
            continue
        for bname, buf in sorted(mod.named_buffers(recurse=False)):
            if buf is None or bname.startswith("adapter_"):
                continue
            base.update(f"{name}.{bname}".encode())
            base.update(buf.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        for pname, p in sorted(mod.named_parameters(recurse=False)):
            adapters.update(f"{name}.{pname}".encode())
            adapters.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return {"base": base.hexdigest(), "adapters": adapters.hexdigest()}


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


# -- throughput: SLiM adapters vs the same adapters on a dense base -------------------------------
class DenseLoRALinear(nn.Module):
    """``y = x W^T + (x L) R + b`` with a frozen dense fp32 ``W (d_out, d_in)`` (comparison only)."""

    def __init__(self, weight: torch.Tensor, lora_l: torch.Tensor, lora_r: torch.Tensor, bias):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.lora_l = nn.Parameter(lora_l.clone())
        self.lora_r = nn.Parameter(lora_r.clone())
        self.register_buffer("bias", None if bias is None else bias.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.linear(x, self.weight.to(x.dtype))
        y = y + (x @ self.lora_l.to(x.dtype)) @ self.lora_r.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)


def dense_lora_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose SLiMLinear layers are dense matrices plus fp32 adapters.

    The dense matrices hold the dequantised base (same FLOPs and bytes as the uncompressed model);
    the adapters start from the SLiM adapters and are trainable, nothing else is.
    """
    import copy

    from .modules import SLiMLinear

    dense = copy.deepcopy(model)
    for name, mod in list(dense.named_modules()):
        if isinstance(mod, SLiMLinear) and mod.rank > 0:
            new = DenseLoRALinear(
                mod.dense_weight(), mod.lora_l.detach(), mod.lora_r.detach(), mod.bias
            )
            dense.set_submodule(name, new)
    for p in dense.parameters():
        p.requires_grad_(False)
    for mod in dense.modules():
        if isinstance(mod, DenseLoRALinear):
            mod.lora_l.requires_grad_(True)
            mod.lora_r.requires_grad_(True)
    return dense


def adapter_throughput(
    model: nn.Module, batches: Iterable[torch.Tensor], optimizer_factory: Callable, steps: int
) -> dict[str, float]:
    """Times ``steps`` plain training steps (forward, backward, optimiser) after one warm-up step.

    The trainable parameters are restored afterwards. Returns ``{"tokens_per_s", "s_per_step"}``.
    """
    from .evaluation import per_window_nll

    params = [p for p in model.parameters() if p.requires_grad]
    saved = [p.detach().clone() for p in params]
    opt = optimizer_factory(params)
    was_training = model.training
    model.train()
    batches = list(batches)
    tokens, elapsed = 0, 0.0
    try:
        for i in range(steps + 1):
            ids = batches[i % len(batches)]
            t0 = time.perf_counter()
            nll, n = per_window_nll(model, ids)
            (nll / n).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i > 0:  # the first step pays one-off costs (allocations, caches)
                elapsed += time.perf_counter() - t0
                tokens += ids.numel()
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved, strict=True):
                p.copy_(s)
        model.train(was_training)
    return {"tokens_per_s": tokens / elapsed, "s_per_step": elapsed / steps}
