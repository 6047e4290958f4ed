"""Typed, validated run plans built from Hydra configs.

Every config group is a ``_target_`` to a frozen dataclass that validates itself in
``__post_init__`` (``QuantConfig``, ``SparsityConfig``, ``PrunerConfig``, ``LowRankConfig``,
``EngineConfig``, ``ExportConfig`` here; ``ModelConfig``, ``CalibConfig``, ``EvalConfig``,
``TrainDataConfig``, ``TrainerConfig`` next to their code). :func:`build_plan` instantiates them
once, adds the cross-group checks (:func:`validate_spec`) and returns the ``CompressPlan`` that
the entry point passes down; nothing downstream reads the raw config again. A typo or an
impossible value fails at start with the key, the bad value and what is allowed
(:class:`~slim_lightning.errors.ConfigError`). Allowed method names come from the registries
in ``core.registry``.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

from ..core.registry import ADAPTERS, PRUNERS, QUANTIZERS
from ..core.types import CompressSpec, LowRankSpec, PrunerSpec, QuantSpec, SparsitySpec
from ..device import check_omp_wait, resolve_device
from ..errors import ConfigError, check_bool, check_choice, check_int, check_range, make_dataclass
from .permute import check_permute
from .recon_mask import check_refine


# -- per-group validators (also applied to specs built in code: validate_spec) -------------------
def _validate_quant(q: QuantSpec) -> None:
    check_choice("quant.method", q.method, tuple(QUANTIZERS))
    if q.method != "none":
        check_int("quant.bits", q.bits, 2, 8)
    if not (isinstance(q.group_size, int) and (q.group_size == -1 or q.group_size >= 1)):
        raise ConfigError("quant.group_size", q.group_size, "-1 (per-channel) or an integer >= 1")
    check_choice("quant.error_model", q.error_model, ("reference", "exact"))
    check_range("quant.outlier_ratio", q.outlier_ratio, 0.0, 0.5)
    check_range("quant.outlier_scale", q.outlier_scale, 1.0, 1e3)
    if q.outlier_ratio > 0 and q.method != "slim_quant":
        raise ConfigError(
            "quant.outlier_ratio", q.outlier_ratio, "0 unless quant.method=slim_quant"
        )
    if QUANTIZERS[q.method].needs_hessian:
        _validate_own_pass(q)


def _validate_own_pass(q: QuantSpec) -> None:
    """The quantisers with their own GPTQ pass (spqr, slim_llm): widths the packer stores
    (1..8 bits per group; SliM-LLM uses N-1..N+1), a reachable SpQR bit budget."""
    from ..core.grouped import spqr_bits_formula

    mixed = q.method == "slim_llm"
    check_int("quant.bits", q.bits, 2, 7 if mixed else 8)
    check_range("quant.damp", q.damp, 0.0, 100.0, lo_open=True)
    check_bool("quant.act_order", q.act_order)
    check_int("quant.blocksize", q.blocksize, 1)
    if q.stat_bits is not None:
        check_int("quant.stat_bits", q.stat_bits, 1, 8)
    check_int("quant.stat_group", q.stat_group, 1)
    check_range("quant.tau", q.tau, 0.0, 1e6, lo_open=True)
    check_range("quant.tau_min", q.tau_min, 0.0, 64.0, lo_open=True, hi_open=True)
    check_range("quant.sqc_lambda", q.sqc_lambda, 0.0, 1e3)
    check_int("quant.kl_tokens", q.kl_tokens, 1)
    if q.target_bpw is not None:
        if mixed:
            raise ConfigError("quant.target_bpw", q.target_bpw, "null unless quant.method=spqr")
        g = q.group_size if q.group_size > 0 else 4096  # per-channel: a wide row's overhead
        floor = spqr_bits_formula(q.bits, q.stat_bits, g, q.stat_group, 0.0)
        check_range("quant.target_bpw", q.target_bpw, floor, 32.0)


def _validate_sparsity(s: SparsitySpec) -> None:
    check_choice("sparsity.pattern", s.pattern, ("dense", "nm", "unstructured"))
    if s.pattern == "nm":
        check_int("sparsity.m", s.m, 2, 64)
        check_int("sparsity.n", s.n, 1, s.m - 1)
    if s.pattern == "unstructured":
        check_range("sparsity.ratio", s.ratio, 0.0, 1.0, lo_open=True, hi_open=True)


def _validate_pruner(p: PrunerSpec) -> None:
    check_choice("pruner.method", p.method, tuple(PRUNERS))
    check_choice("pruner.order", p.order, ("mask_then_quant", "quant_then_mask"))
    check_int("pruner.blocksize", p.blocksize, 1)
    check_range("pruner.damp", p.damp, 0.0, 1.0, lo_open=True)
    check_bool("pruner.joint_quant", p.joint_quant)
    if p.joint_quant and not PRUNERS[p.method].joint_quant:
        joint = ", ".join(k for k, v in PRUNERS.items() if v.joint_quant)
        raise ConfigError("pruner.joint_quant", True, f"true only with pruner={joint}")


def _validate_lowrank(lr: LowRankSpec) -> None:
    check_choice("lowrank.method", lr.method, tuple(ADAPTERS))
    check_range("lowrank.rank_ratio", lr.rank_ratio, 0.0, 1.0, lo_open=True)
    check_choice("lowrank.rank_rounding", lr.rank_rounding, ("none", "up", "down"))
    check_int("lowrank.rank_multiple", lr.rank_multiple, 1)
    check_choice("lowrank.svd", lr.svd, ("exact", "randomized"))
    check_int("lowrank.oversample", lr.oversample, 0)
    check_int("lowrank.niter", lr.niter, 0)
    check_choice("lowrank.split", lr.split, ("left", "balanced"))
    check_int("lowrank.refit_rounds", lr.refit_rounds, 1, 20)
    check_int("lowrank.alternate", lr.alternate, 0, 20)
    if lr.quant_bits is not None:
        check_int("lowrank.quant_bits", lr.quant_bits, 2, 8)
    check_int("lowrank.quant_group_size", lr.quant_group_size, 1)
    check_choice("lowrank.stat", lr.stat, ("sq", "abs"))
    check_choice("lowrank.fit", lr.fit, ("diag", "whitened"))
    check_range("lowrank.fit_damp", lr.fit_damp, 0.0, 1.0, lo_open=True)
    if lr.permute != "auto":
        check_bool("lowrank.permute", lr.permute)
    for key in ("refit", "quant_before_refit", "quant_in_scale"):
        check_bool(f"lowrank.{key}", getattr(lr, key))


@dataclass(frozen=True)
class QuantConfig(QuantSpec):
    """The ``quant`` group: a ``QuantSpec`` that validates itself."""

    def __post_init__(self) -> None:
        _validate_quant(self)


@dataclass(frozen=True)
class SparsityConfig(SparsitySpec):
    """The ``sparsity`` group: a ``SparsitySpec`` that validates itself."""

    def __post_init__(self) -> None:
        _validate_sparsity(self)


@dataclass(frozen=True)
class PrunerConfig(PrunerSpec):
    """The ``pruner`` group: a ``PrunerSpec`` that validates itself."""

    def __post_init__(self) -> None:
        _validate_pruner(self)


@dataclass(frozen=True)
class LowRankConfig(LowRankSpec):
    """The ``lowrank`` group: a ``LowRankSpec`` that validates itself."""

    def __post_init__(self) -> None:
        _validate_lowrank(self)


@dataclass(frozen=True)
class EngineConfig:
    """Layer-wise calibration engine settings (``engine.*``)."""

    batch_size: int = 8
    resume: bool = True
    progress: bool = True
    offload_inputs: bool = False
    # read each decoder block from the checkpoint's safetensors just before it is compressed
    # (the model is built on the meta device; slim_lightning.compress.streaming): for models larger
    # than host memory. The dense evaluation (eval_dense) streams the blocks the same way;
    # dense_cache is off.
    # true | false | auto: stream when the whole model would exceed streaming_share of the
    # available memory (slim_lightning.app.autostream; decided before any weights load)
    streaming: Any = "auto"
    streaming_share: float = 0.8
    # torch threads of the per-linear solvers (SparseGPT/OPTQ column sweeps, SLiM-Quant, the
    # low-rank fit): thousands of small BLAS/LAPACK calls whose OpenMP workers spin-wait at every
    # barrier. null = torch's setting (default); "auto" = 1 on CPU; an integer = that many. The
    # forward passes and the reconstruction keep all threads. SmolLM2, 2 cores
    # (benchmarks/results/solver_threads_smollm2.json): 1 thread is 1.28x slower per block idle
    # but 2x faster while another process holds a core (2.94x -> 1.13x slowdown under load).
    solver_threads: Any = None
    # OMP_WAIT_POLICY of the OpenMP runtime (set by compress.py / train.py before torch loads;
    # slim_lightning.device.set_omp_wait_policy): auto (passive when other processes keep the
    # cores busy at start) | passive | active | null (the runtime's default)
    omp_wait: Any = "auto"
    # mixture of experts: an expert routed fewer calibration tokens than this in a batch also
    # sees every token of that batch for its statistics only (its output is discarded; counts
    # and the experts topped up are in report.json "experts"); 0 = routed tokens only
    expert_min_tokens: int = 64

    def __post_init__(self) -> None:
        check_int("engine.batch_size", self.batch_size, 1)
        check_int("engine.expert_min_tokens", self.expert_min_tokens, 0)
        for key in ("resume", "progress", "offload_inputs"):
            check_bool(f"engine.{key}", getattr(self, key))
        if not (isinstance(self.streaming, bool) or self.streaming == "auto"):
            raise ConfigError("engine.streaming", self.streaming, "true, false or auto")
        check_range("engine.streaming_share", self.streaming_share, 0.0, 1.0, lo_open=True)
        check_omp_wait(self.omp_wait)
        st = self.solver_threads
        if st is not None and st != "auto":
            check_int("engine.solver_threads", st, 1)

    def resolved_solver_threads(self, device: str) -> int | None:
        """The solvers' thread count on ``device`` (None: leave torch's setting)."""
        if self.solver_threads == "auto":
            return 1 if str(device).startswith("cpu") else None
        return self.solver_threads


@dataclass(frozen=True)
class ExportConfig:
    """What the run writes besides ``report.json`` (``export.*``)."""

    hf: bool = False
    packed: bool = True
    # storage dtype of what stays uncompressed (embeddings, norms, lm_head, biases, fp adapters):
    # auto = the original checkpoint's dtype (float16 for GGUF files, which hold no 16-bit dtype)
    dtype: str = "auto"
    # also write DIR/servable: a compressed-tensors int4 base + a PEFT LoRA adapter that serving
    # engines (vLLM) load (slim_lightning.deploy.servable; needs slim-lightning[serve])
    servable: bool = False

    def __post_init__(self) -> None:
        check_choice("export.dtype", self.dtype, ("auto", "float32", "float16", "bfloat16"))
        for key in ("hf", "packed", "servable"):
            check_bool(f"export.{key}", getattr(self, key))
        if self.servable and not self.packed:
            raise ConfigError(
                "export.servable",
                True,
                "false unless export.packed=true (it is written from "
                "the packed SLiMLinear layers, which export.packed=false merges away)",
            )
        if self.servable:
            import importlib.util

            missing = [
                n for n in ("compressed_tensors", "peft") if importlib.util.find_spec(n) is None
            ]
            if missing:
                raise ConfigError(
                    "export.servable",
                    True,
                    f"false unless {' and '.join(missing)} is installed "
                    "(pip install 'slim-lightning[serve]')",
                )


@dataclass(frozen=True)
class EmbeddingConfig:
    """Quantised input embedding and LM head (``embeddings.*``; ``embeddings.py``)."""

    # null = keep them in export.dtype (default); 8 or 4 = groupwise AbsMax codes
    bits: int | None = None
    group_size: int = 64

    def __post_init__(self) -> None:
        if self.bits is not None:
            check_choice("embeddings.bits", self.bits, (None, 4, 8))
        check_int("embeddings.group_size", self.group_size, 1)


@dataclass(frozen=True)
class ReconConfig:
    """Block-wise reconstruction after each block's one-shot compression (``reconstruct.*``;
    ``compress.reconstruct``). ``mode: none`` keeps the one-shot result."""

    mode: str = "none"  # none | block
    epochs: int = 2  # passes over the training batches (best held-out epoch kept)
    holdout: float = 0.125  # share of the calibration batches held out for early stopping
    batch_windows: int = 1  # calibration windows per optimiser step (0: a whole engine batch)
    loss: str = "rel_mse"  # ||t - y||^2 / ||t||^2 per batch
    target_mix: float = 0.0  # weight of the dense block on the compressed inputs as a target
    lr_weight: float = 0.03  # Adam, kept weights in grid steps
    lr_scale: float = 0.003  # Adam, log group scales
    lr_adapter: float = 0.03  # Adam, adapter codes in grid steps (fp adapters: absolute)
    lr_norm: float = 0.001  # Adam, norm gains
    train_weights: bool = True
    train_scales: bool = True
    train_adapters: bool = True
    train_norms: bool = True
    # adam | adam8bit: bitsandbytes' 8-bit Adam (block-wise quantised moments, 2 instead of 8
    # bytes per trained value); a memory plan that changes results (report.json records it)
    optimizer: str = "adam"
    # fixed | refine: re-derive the N:M / unstructured mask mask_refines times per block from a
    # gradient-aware score (compress.recon_mask), same count per group, packed as any mask
    mask: str = "fixed"
    mask_refines: int = 2
    mask_alpha: float = 1.0  # weight of the gradient term in the score

    def __post_init__(self) -> None:
        check_choice("reconstruct.mode", self.mode, ("none", "block"))
        check_choice("reconstruct.optimizer", self.optimizer, ("adam", "adam8bit"))
        check_choice("reconstruct.mask", self.mask, ("fixed", "refine"))
        check_int("reconstruct.mask_refines", self.mask_refines, 1, 100)
        check_range("reconstruct.mask_alpha", self.mask_alpha, 0.0, 1000.0)
        check_int("reconstruct.epochs", self.epochs, 0, 1000)
        check_int("reconstruct.batch_windows", self.batch_windows, 0)
        check_range("reconstruct.holdout", self.holdout, 0.0, 0.5, lo_open=True)
        check_choice("reconstruct.loss", self.loss, ("rel_mse",))
        check_range("reconstruct.target_mix", self.target_mix, 0.0, 1.0)
        for key in ("lr_weight", "lr_scale", "lr_adapter", "lr_norm"):
            check_range(f"reconstruct.{key}", getattr(self, key), 0.0, 10.0)
        for key in ("train_weights", "train_scales", "train_adapters", "train_norms"):
            check_bool(f"reconstruct.{key}", getattr(self, key))


@dataclass(frozen=True)
class CompressPlan:
    """Everything one compression run needs, validated."""

    model: Any  # slim_lightning.models.ModelConfig
    calib: Any  # slim_lightning.data.text.CalibConfig
    eval: Any  # slim_lightning.data.text.EvalConfig | None
    spec: CompressSpec
    engine: EngineConfig
    export: ExportConfig
    method_name: str = "custom"
    seed: int = 0
    device: str = "cpu"  # resolved by build_plan (``auto`` -> cuda when available, else cpu)
    eval_dense: bool = True
    # keep a dequantised dense copy of every compressed layer (CPU speed for the memory of the
    # dense model); off, only packed weights stay resident and are dequantised just in time
    dense_cache: bool = False
    embeddings: EmbeddingConfig = EmbeddingConfig()
    reconstruct: ReconConfig = ReconConfig()


def validate_spec(spec: CompressSpec) -> None:
    """Raises ConfigError for any impossible compression setting (each group, then across)."""
    q, s, p = spec.quant, spec.sparsity, spec.pruner
    _validate_quant(q)
    _validate_sparsity(s)
    _validate_pruner(p)
    _validate_lowrank(spec.lowrank)
    if PRUNERS[p.method].prune is not None and s.pattern == "nm" and p.blocksize % s.m:
        raise ConfigError(
            "pruner.blocksize", p.blocksize, f"a multiple of sparsity.m={s.m} (column blocks)"
        )
    own = [k for k, v in QUANTIZERS.items() if v.needs_hessian]
    if p.joint_quant and q.method != "absmax" and q.method not in own:
        raise ConfigError(
            "quant.method",
            q.method,
            f"absmax or {', '.join(own)} with pruner.joint_quant=true (OPTQ grid, or the "
            "quantiser's own GPTQ pass after the pruner)",
        )
    if q.method in own and p.order == "quant_then_mask":
        raise ConfigError("pruner.order", p.order, f"mask_then_quant with quant.method={q.method}")


_UNEXPECTED = re.compile(r"unexpected keyword argument '(\w+)'")


def instantiate_group(cfg: Any, key: str) -> Any:
    """``hydra.utils.instantiate`` of a group node, re-raising our ConfigError (and naming the
    key of an unknown field) instead of Hydra's wrapper."""
    from hydra.errors import InstantiationException
    from hydra.utils import get_class, instantiate

    node = cfg.get(key)
    if node is None:
        return None
    try:
        return instantiate(node, _convert_="all")
    except InstantiationException as e:
        cause = e.__cause__ or e.__context__
        while cause is not None and not isinstance(cause, ConfigError):
            if isinstance(cause, TypeError) and _UNEXPECTED.search(str(cause)):
                field = _UNEXPECTED.search(str(cause)).group(1)
                try:
                    names = sorted(f.name for f in dataclasses.fields(get_class(node._target_)))
                except Exception:  # noqa: BLE001 - not a dataclass target
                    names = []
                raise ConfigError(
                    f"{key}.{field}", node.get(field), "keys " + ", ".join(names)
                ) from None
            cause = cause.__cause__ or cause.__context__
        if cause is not None:
            raise cause from None
        raise


def _group(cfg: Any, key: str, cls: type, accept: type | None = None) -> Any:
    """The group ``key`` as ``cls``: instantiated from its ``_target_`` (which must build an
    ``accept`` instance, default ``cls``), or built from a plain node (configs written without
    ``_target_``), or ``cls()`` when absent."""
    from omegaconf import OmegaConf

    node = cfg.get(key)
    if node is None:
        return cls()
    if "_target_" in node:
        obj = instantiate_group(cfg, key)
        accept = accept or cls
        if not isinstance(obj, accept):
            raise ConfigError(f"{key}._target_", node.get("_target_"), f"a {accept.__name__}")
        return obj
    return make_dataclass(cls, key, OmegaConf.to_container(node, resolve=True))


def spec_from_cfg(cfg: Any) -> CompressSpec:
    """Builds and validates the CompressSpec from the ``quant/sparsity/pruner/lowrank`` groups."""
    spec = CompressSpec(
        quant=_group(cfg, "quant", QuantConfig, QuantSpec),
        sparsity=_group(cfg, "sparsity", SparsityConfig, SparsitySpec),
        pruner=_group(cfg, "pruner", PrunerConfig, PrunerSpec),
        lowrank=_group(cfg, "lowrank", LowRankConfig, LowRankSpec),
    )
    validate_spec(spec)
    return spec


def build_plan(cfg: Any) -> CompressPlan:
    """Validates a composed compress/train config and returns the typed plan (no heavy work).

    Built once, at the entry point, and passed down (``SLiMModule`` takes it).
    """
    spec = spec_from_cfg(cfg)
    engine = _group(cfg, "engine", EngineConfig)
    export = _group(cfg, "export", ExportConfig)
    embeddings = _group(cfg, "embeddings", EmbeddingConfig)
    reconstruct = _group(cfg, "reconstruct", ReconConfig)
    device = str(cfg.get("device", "auto"))
    if not (device in ("auto", "cpu", "cuda") or device.startswith("cuda:")):
        raise ConfigError("device", device, "auto, cpu, cuda, cuda:N")
    device = resolve_device(device)  # resolved once: the plan carries cpu | cuda[:N]
    check_refine(reconstruct, spec)
    check_permute(spec)
    seed = cfg.get("seed", 0)
    check_int("seed", seed, 0)
    dense_cache = cfg.get("dense_cache", False)
    check_bool("dense_cache", dense_cache)
    eval_dense = cfg.get("eval_dense", True)
    check_bool("eval_dense", eval_dense)
    if engine.streaming is True:
        # a dense copy of every compressed layer is what streaming avoids holding
        if spec.is_identity:
            raise ConfigError(
                "engine.streaming", True, "false for an identity (uncompressed) method"
            )
        dense_cache = False  # (eval_dense streams the dense model one block at a time)
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
        eval_dense=eval_dense,
        dense_cache=dense_cache,
        embeddings=embeddings,
        reconstruct=reconstruct,
    )
