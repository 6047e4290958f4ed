"""Typed, validated run plans built from Hydra configs.

Hydra composes a ``DictConfig``; :func:`build_plan` turns it into frozen dataclasses and validates
every value *before* any model is loaded, so a typo or an impossible value fails at start with the
key, the bad value and what is allowed (:class:`~slim_lightning.errors.ConfigError`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .core.registry import ADAPTERS, PRUNERS, QUANTIZERS
from .core.types import CompressSpec, LowRankSpec, PrunerSpec, QuantSpec, SparsitySpec
from .errors import ConfigError, check_choice, check_range


@dataclass(frozen=True)
class EngineConfig:
    """Layer-wise calibration engine settings (``engine.*``)."""

    batch_size: int = 8
    resume: bool = True
    progress: bool = True
    offload_inputs: bool = False


@dataclass(frozen=True)
class ExportConfig:
    """What the run writes besides ``report.json`` (``export.*``)."""

    hf: bool = False
    packed: bool = True
    # storage dtype of what stays uncompressed (embeddings, norms, lm_head, biases, fp adapters):
    # auto = the original checkpoint's dtype (float16 for GGUF files, which hold no 16-bit dtype)
    dtype: str = "auto"

    def __post_init__(self) -> None:
        check_choice("export.dtype", self.dtype, ("auto", "float32", "float16", "bfloat16"))
        for key in ("hf", "packed"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"export.{key}", getattr(self, key), "true or false")


@dataclass(frozen=True)
class CompressPlan:
    """Everything one compression run needs, validated."""

    model: Any  # slim_lightning.models.ModelConfig
    calib: Any  # slim_lightning.data.CalibConfig
    eval: Any  # slim_lightning.data.EvalConfig | None
    spec: CompressSpec
    engine: EngineConfig
    export: ExportConfig
    method_name: str = "custom"
    seed: int = 0
    device: str = "auto"
    eval_dense: bool = True
    # keep a dequantised dense copy of every compressed layer (CPU speed for the memory of the
    # dense model); off, only packed weights stay resident and are dequantised just in time
    dense_cache: bool = False


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_int(key: str, v: Any, lo: int, hi: int | None = None) -> None:
    if not _is_int(v) or v < lo or (hi is not None and v > hi):
        raise ConfigError(key, v, f"an integer in [{lo}, {hi if hi is not None else 'inf'}]")


def _make(cls: type, group: str, values: dict) -> Any:
    """Builds dataclass ``cls`` from ``values``, naming the key of an unknown field."""
    names = {f.name for f in dataclasses.fields(cls)}
    for k in values:
        if k not in names:
            raise ConfigError(f"{group}.{k}", values[k], "keys " + ", ".join(sorted(names)))
    return cls(**values)


def validate_spec(spec: CompressSpec) -> None:
    """Raises ConfigError for any impossible compression setting."""
    q, s, p, lr = spec.quant, spec.sparsity, spec.pruner, spec.lowrank
    check_choice("quant.method", q.method, tuple(QUANTIZERS))
    if q.method != "none":
        _check_int("quant.bits", q.bits, 2, 8)
    if not (_is_int(q.group_size) and (q.group_size == -1 or q.group_size >= 1)):
        raise ConfigError("quant.group_size", q.group_size, "-1 (per-channel) or an integer >= 1")
    check_choice("quant.error_model", q.error_model, ("reference", "exact"))
    check_range("quant.outlier_ratio", q.outlier_ratio, 0.0, 0.5)
    check_range("quant.outlier_scale", q.outlier_scale, 1.0, 1e3)
    if q.outlier_ratio > 0 and q.method != "slim_quant":
        raise ConfigError(
            "quant.outlier_ratio", q.outlier_ratio, "0 unless quant.method=slim_quant"
        )

    check_choice("sparsity.pattern", s.pattern, ("dense", "nm", "unstructured"))
    if s.pattern == "nm":
        _check_int("sparsity.m", s.m, 2, 64)
        _check_int("sparsity.n", s.n, 1, s.m - 1)
    if s.pattern == "unstructured":
        check_range("sparsity.ratio", s.ratio, 0.0, 1.0, lo_open=True, hi_open=True)

    check_choice("pruner.method", p.method, tuple(PRUNERS))
    check_choice("pruner.order", p.order, ("mask_then_quant", "quant_then_mask"))
    _check_int("pruner.blocksize", p.blocksize, 1)
    check_range("pruner.damp", p.damp, 0.0, 1.0, lo_open=True)
    pruner = PRUNERS[p.method]
    if pruner.prune is not None and s.pattern == "nm" and p.blocksize % s.m:
        raise ConfigError(
            "pruner.blocksize", p.blocksize, f"a multiple of sparsity.m={s.m} (column blocks)"
        )
    if p.joint_quant and not pruner.joint_quant:
        joint = ", ".join(k for k, v in PRUNERS.items() if v.joint_quant)
        raise ConfigError("pruner.joint_quant", True, f"true only with pruner={joint}")
    if p.joint_quant and q.method != "absmax":
        raise ConfigError(
            "quant.method", q.method, "absmax with pruner.joint_quant=true (OPTQ grid)"
        )

    check_choice("lowrank.method", lr.method, tuple(ADAPTERS))
    check_range("lowrank.rank_ratio", lr.rank_ratio, 0.0, 1.0, lo_open=True)
    check_choice("lowrank.rank_rounding", lr.rank_rounding, ("none", "up", "down"))
    _check_int("lowrank.rank_multiple", lr.rank_multiple, 1)
    check_choice("lowrank.svd", lr.svd, ("exact", "randomized"))
    _check_int("lowrank.oversample", lr.oversample, 0)
    _check_int("lowrank.niter", lr.niter, 0)
    check_choice("lowrank.split", lr.split, ("left", "balanced"))
    _check_int("lowrank.refit_rounds", lr.refit_rounds, 1, 20)
    if lr.quant_bits is not None:
        _check_int("lowrank.quant_bits", lr.quant_bits, 2, 8)
    _check_int("lowrank.quant_group_size", lr.quant_group_size, 1)
    check_choice("lowrank.stat", lr.stat, ("sq", "abs"))
    for key, v in (
        ("pruner.joint_quant", p.joint_quant),
        ("lowrank.refit", lr.refit),
        ("lowrank.quant_before_refit", lr.quant_before_refit),
        ("lowrank.quant_in_scale", lr.quant_in_scale),
    ):
        if not isinstance(v, bool):
            raise ConfigError(key, v, "true or false")


def spec_from_cfg(cfg: Any) -> CompressSpec:
    """Builds and validates the CompressSpec from the ``quant/sparsity/pruner/lowrank`` groups."""
    from omegaconf import OmegaConf

    def group(name: str) -> dict:
        node = cfg.get(name)
        if node is None:
            return {}
        return OmegaConf.to_container(node, resolve=True)  # type: ignore[return-value]

    spec = CompressSpec(
        quant=_make(QuantSpec, "quant", group("quant")),
        sparsity=_make(SparsitySpec, "sparsity", group("sparsity")),
        pruner=_make(PrunerSpec, "pruner", group("pruner")),
        lowrank=_make(LowRankSpec, "lowrank", group("lowrank")),
    )
    validate_spec(spec)
    return spec


def instantiate_group(cfg: Any, key: str) -> Any:
    """``hydra.utils.instantiate`` that re-raises our ConfigError instead of Hydra's wrapper."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    node = cfg.get(key)
    if node is None:
        return None
    try:
        return instantiate(node, _convert_="all")
    except InstantiationException as e:
        cause = e.__cause__ or e.__context__
        while cause is not None and not isinstance(cause, ConfigError):
            cause = cause.__cause__ or cause.__context__
        if cause is not None:
            raise cause from None
        raise


def build_plan(cfg: Any) -> CompressPlan:
    """Validates a composed compress/train config and returns the typed plan (no heavy work)."""
    from omegaconf import OmegaConf

    spec = spec_from_cfg(cfg)
    engine = _make(EngineConfig, "engine", OmegaConf.to_container(cfg.get("engine", {})) or {})
    _check_int("engine.batch_size", engine.batch_size, 1)
    export = _make(ExportConfig, "export", OmegaConf.to_container(cfg.get("export", {})) or {})
    device = str(cfg.get("device", "auto"))
    if not (device in ("auto", "cpu", "cuda") or device.startswith("cuda:")):
        raise ConfigError("device", device, "auto, cpu, cuda, cuda:N")
    seed = cfg.get("seed", 0)
    _check_int("seed", seed, 0)
    dense_cache = cfg.get("dense_cache", False)
    if not isinstance(dense_cache, bool):
        raise ConfigError("dense_cache", dense_cache, "true or false")
    return CompressPlan(
        model=instantiate_group(cfg, "model"),
        calib=instantiate_group(cfg, "calib"),
        eval=instantiate_group(cfg, "eval"),
        spec=spec,
        engine=engine,
        export=export,
        method_name=str(cfg.get("method_name", "custom")),
        seed=seed,
        device=device,
        eval_dense=bool(cfg.get("eval_dense", True)),
        dense_cache=dense_cache,
    )


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device", device, "cpu or auto (no CUDA device is visible)")
    return device
