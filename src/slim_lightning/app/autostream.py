"""``engine.streaming=auto`` (the default): stream when the model would not fit, say why.

Before any weights load, the run estimates its host memory both ways from the model's config
(parameter count and linear shapes on the meta device, no weights read) and the method:

* the work of one decoder block (``block_work``): the one-shot compression holds the block's
  input statistics (one ``d_in^2`` fp32 X^T X per group of linears fed the same input, when the
  pruner needs it; SparseGPT factorises it in place) and the largest linear's fp32 work copies
  and low-rank fit (``LIN_WORK_PER_WEIGHT``); the block reconstruction holds, per block weight,
  the mask, the activations and, per kept weight, the trainable value, Adam's two moments
  and the best epoch's snapshot (one linear's gradient at a time);
* whole model (``engine.streaming=false``): the weights at ``model.dtype``, the packed copy built
  beside them, the block's work, a baseline for Python, torch, transformers and activations;
* streaming: the largest of its stages: loading (the 16-bit vocabulary tables), compressing
  (one 16-bit block and its work; the tables are parked) and exporting, which opens one packed
  block at a time (``app.stream_export``): one packed block with its adapters, held as fp32
  parameters until written (``adapter_bytes``), beside the packed vocabulary tables; with
  ``export.hf`` one merged fp32 block beside the dequantised tables.

It streams when the whole-model estimate exceeds ``engine.streaming_share`` of the memory
available to the process (``MemAvailable``, and the cgroup limit where one is set), logs one
line with the numbers and the choice, and refuses (``ConfigError`` naming both estimates, the
block's work and the available memory) when even the streaming estimate does not fit. Models
that cannot stream (a random tiny model, a GGUF file without ``model.cache_gguf``, an identity
method) run whole. The estimates err on the high side (measured: see ``benchmarks/results/
streaming_synthetic.json``).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from ..errors import ConfigError

log = logging.getLogger(__name__)
GIB = 2**30
BASELINE = 0.75 * GIB  # Python, torch, transformers, Lightning, tokenizer, activations
PACKED_PER_WEIGHT = 0.6  # bytes per weight of a packed layer (3.8-5.4 bits; 0.3x of fp16)


def available_memory(
    proc: Path = Path("/proc"), cgroup_root: Path = Path("/sys/fs/cgroup")
) -> int | None:
    """Bytes this run may use in all: what the process holds now (its anonymous RSS: the
    estimates count the process itself) plus what it may still allocate, ``MemAvailable``
    capped by every memory cgroup above the process (v2 ``memory.max``, v1
    ``memory.limit_in_bytes``, less the group's usage without its reclaimable page cache; the
    process's own cgroup is read from ``/proc/self/cgroup``, as a SLURM job step's or a
    container's). None when nothing can be read."""
    avail = None
    try:
        for line in (proc / "meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    for left in _cgroup_headroom(proc, cgroup_root):
        avail = left if avail is None else min(avail, left)
    if avail is None:
        return None
    rss = 0  # (anonymous: the libraries' file pages are shared and charged elsewhere)
    try:
        for line in (proc / "self" / "status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                rss = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return avail + rss


# (limit file, usage file, memory.stat key of reclaimable page cache), cgroup v2 then v1
_CGROUP_FILES = {
    "v2": ("memory.max", "memory.current", "inactive_file"),
    "v1": ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"),
}


def _cgroup_headroom(proc: Path, root: Path) -> list[int]:
    """``limit - (usage - inactive page cache)`` of each limited memory cgroup containing this
    process, from its own group up to the hierarchy's root."""
    try:
        lines = (proc / "self" / "cgroup").read_text().splitlines()
    except OSError:
        lines = []
    paths = {}
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if controllers == "" and "v2" not in paths:
            paths["v2"] = root / path.lstrip("/")
        elif "memory" in controllers.split(","):
            paths["v1"] = root / "memory" / path.lstrip("/")
    if not paths:  # no /proc/self/cgroup: the hierarchy roots as mounted
        paths = {"v2": root, "v1": root / "memory"}
    out = []
    for kind, start in paths.items():
        limit_f, usage_f, cache_key = _CGROUP_FILES[kind]
        top = root if kind == "v2" else root / "memory"
        d = start
        while True:
            left = _headroom(d, limit_f, usage_f, cache_key)
            if left is not None:
                out.append(left)
            if d == top or top not in d.parents:
                break
            d = d.parent
    return out


def _headroom(d: Path, limit_f: str, usage_f: str, cache_key: str) -> int | None:
    try:
        limit = (d / limit_f).read_text().strip()
        usage = int((d / usage_f).read_text().strip())
    except (OSError, ValueError):
        return None
    if not limit.isdigit() or int(limit) >= 2**60:
        return None
    cache = 0
    try:
        for line in (d / "memory.stat").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == cache_key:
                cache = int(value)
    except (OSError, ValueError):
        pass
    return max(0, int(limit) - max(0, usage - cache))


# bytes per weight of the largest linear while it is compressed whole beyond its Hessian and
# 16-bit weight (fp32 copies of the weight, the residual, SparseGPT's working copy, codes and
# mask, the low-rank fit's Gram eigendecomposition): 11-12 measured on LLaMA-7B's 4096 x 11008
# and TinyLlama's 2048 x 5632 down_proj (slim_q; benchmarks/results/streaming_tinyllama22.json)
LIN_WORK_PER_WEIGHT = 16
ROW_WORK = 8 * 4  # row-separable specs: bytes per value of a few fp32 row blocks (<= 4 Mi values)


def block_work(shapes: dict[str, tuple[int, int]], groups: tuple, spec: Any, recon: Any) -> int:
    """Host bytes one block's compression needs beyond the block's own 16-bit weights.

    Args:
        shapes: ``{linear name in the block: (d_out, d_in)}``.
        groups: ``ArchSpec.input_groups`` (linears sharing one X^T X).
        spec: the ``CompressSpec``; recon: the ``ReconConfig``.
    """
    from ..compress.recon_linear import ROW_STEP as RECON_ROW_STEP
    from ..core.compress import ROW_STEP, row_separable

    if not shapes:
        return 0
    sizes = [o * i for o, i in shapes.values()]
    p, largest = sum(sizes), max(sizes)
    hess = 0
    if spec.needs_hessian:
        alone = dict(shapes)
        for grp in groups:
            if all(n in alone for n in grp):
                hess += 4 * shapes[grp[0]][1] ** 2
                for n in grp:
                    del alone[n]
        hess += sum(4 * i * i for _, i in alone.values())
        if spec.lowrank.fit == "whitened":  # kept for the fit, factorised in a copy
            hess += 8 * max(i for _, i in shapes.values()) ** 2
    reconstructs = recon is not None and recon.mode == "block"
    if row_separable(spec):
        work = ROW_WORK * min(largest, ROW_STEP)
    else:
        work = LIN_WORK_PER_WEIGHT * largest
    results = 2 * p if reconstructs else int(PACKED_PER_WEIGHT * p)  # codes + mask / packed
    one_shot = hess + work + results
    if not reconstructs:
        return int(one_shot)
    sp = spec.sparsity
    kept = {"nm": sp.n / sp.m, "unstructured": 1.0 - sp.ratio}.get(sp.pattern, 1.0)
    # per weight: the mask and activations (5, measured); per kept weight the value, Adam's two
    # moments (8 bytes; 2 with 8-bit Adam) and the best epoch's int8 snapshot; one linear's
    # gradient at a time (each parameter steps inside the backward) and the backward's fp32
    # work on one block of rows of the largest weight (``recon_linear.ROW_STEP``; its code
    # matrices and the block's 16-bit weights are dropped while it trains). One 22-block
    # TinyLlama-shape block (44 M weights) at 2:4: 0.60 GiB above the process measured
    # (benchmarks/results/streaming_tinyllama22.json); the one-shot part is estimated higher
    train = 7 if getattr(recon, "optimizer", "adam") == "adam8bit" else 13
    per_weight = 1 + 5 + (train * kept if recon.train_weights else 0)
    grad = 4 * kept * largest if recon.train_weights else 0
    return int(max(one_shot, per_weight * p + grad + 12 * min(largest, RECON_ROW_STEP)))


def adapter_bytes(shapes: dict[str, tuple[int, int]], spec: Any) -> int:
    """Host bytes of one block's adapters in the compressed model: fp32 ``L`` and ``R`` (the
    packed model in memory keeps them as parameters beside their codes, which
    ``PACKED_PER_WEIGHT`` counts); 0 for an adapter method that adds none."""
    from ..core.lowrank import adapter_rank
    from ..core.registry import ADAPTERS

    if not ADAPTERS.get_entry(spec.lowrank.method).enabled:
        return 0
    return sum(4 * adapter_rank(i, o, spec.lowrank) * (i + o) for o, i in shapes.values())


def estimate(config: Any, dtype_bytes: int, plan: Any = None) -> dict[str, int]:
    """Host bytes of a whole-model run and of a streaming run (see the module docstring);
    ``plan`` (a ``CompressPlan``) adds the method's per-block work."""
    import torch
    from transformers import AutoModelForCausalLM

    from ..models.arch import block_linears, get_arch, get_blocks

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    total = sum(p.numel() for p in model.parameters())
    vocab = sum(
        m.weight.numel()
        for m in (model.get_input_embeddings(), model.get_output_embeddings())
        if m is not None and getattr(m, "weight", None) is not None
    )
    layers = getattr(getattr(model, "config", None), "num_hidden_layers", None) or 1
    block = max(0, total - vocab) // max(1, int(layers))
    packed = int((total - vocab) * PACKED_PER_WEIGHT)
    work = 0
    if plan is not None:
        try:
            arch = get_arch(model, plan.model.arch, plan.model.ignore)
            lins = block_linears(get_blocks(model, arch)[0], arch)
        except (ValueError, KeyError, AttributeError, IndexError):  # unknown layout: no work
            lins, arch = {}, None
        shapes = {n: (m.out_features, m.in_features) for n, m in lins.items()}
        groups = arch.input_groups if arch is not None else ()
        work = block_work(shapes, groups, plan.spec, getattr(plan, "reconstruct", None))
        packed += int(layers) * adapter_bytes(shapes, plan.spec)
    export = packed // max(1, int(layers)) + vocab  # one packed block (the exports stream)
    if plan is not None and plan.export.hf:  # one merged fp32 block, dequantised tables
        export = max(export, 4 * block + dtype_bytes * vocab)
    stream_stages = (vocab * 2, 2 * block + work, export)
    return {
        "params": int(total),
        "block_work": int(work),
        "whole": int(total * dtype_bytes + packed + work + BASELINE),
        "streaming": int(max(stream_stages) + BASELINE),
    }


def _leaner(plan: Any) -> str:
    """A hint naming the per-block work's main knob."""
    if getattr(plan, "reconstruct", None) is not None and plan.reconstruct.mode == "block":
        return ": reconstruct=none (method=slim_q_fast) keeps only the one-shot work"
    return ""


def _memory_plan(
    plan: Any, config: Any, est: dict[str, int], budget: float, record: dict[str, Any]
) -> tuple[Any, dict[str, int]]:
    """The block reconstruction's leaner memory plan when streaming with the plan as given
    would exceed ``budget`` (whole model too large too): 8-bit Adam moments
    (``reconstruct.optimizer=adam8bit``, 7 instead of 13 bytes per kept weight; it changes
    results slightly: recorded as ``memory_plan`` in the report)."""
    from ..dtypes import FLOAT_DTYPES

    recon = getattr(plan, "reconstruct", None)
    if (
        est["whole"] <= budget
        or est["streaming"] <= budget
        or recon is None
        or recon.mode != "block"
        or recon.optimizer != "adam"
        or not recon.train_weights
    ):
        return plan, est
    lean = dataclasses.replace(plan, reconstruct=dataclasses.replace(recon, optimizer="adam8bit"))
    est8 = estimate(config, FLOAT_DTYPES[plan.model.dtype].itemsize, lean)
    record["memory_plan"] = {
        "reconstruct.optimizer": "adam8bit",
        "changes_results": True,
        "reason": f"streaming with Adam's fp32 moments needs ~{est['streaming'] / GIB:.2f} GiB "
        f"> {budget / GIB:.2f} GiB; with 8-bit moments ~{est8['streaming'] / GIB:.2f} GiB",
    }
    record["estimate_gib"] = {k: round(v / GIB, 2) for k, v in est8.items() if k != "params"}
    log.info(
        "engine.streaming=auto: memory plan reconstruct.optimizer=adam8bit (%s)",
        record["memory_plan"]["reason"],
    )
    return lean, est8


def _fused_experts(config: Any) -> str | None:
    """Why a mixture-of-experts model cannot stream (None for other models)."""
    from transformers import PretrainedConfig

    from ..models.arch import meta_model

    if not isinstance(config, PretrainedConfig):
        return None
    try:
        fused = any(p.dim() == 3 for p in meta_model(config).parameters())
    except Exception:  # noqa: BLE001 - no causal LM for this config: load_config says why
        return None
    if not fused:
        return None
    return (
        "its experts are stored fused (3-D tensors) and the streaming reader reads each "
        "block's tensors by their unfused names: not supported yet"
    )


def _can_stream(plan: Any) -> str | None:
    """None when the model can stream, else why not."""
    src = plan.model.source
    if plan.spec.is_identity:
        return "an identity method compresses nothing"
    if src.kind == "tiny":
        return "a random tiny model has no checkpoint to read blocks from"
    if src.kind == "gguf" and not plan.model.cache_gguf:
        return "a GGUF file streams only through its cached conversion (model.cache_gguf=true)"
    return None


def resolve_streaming(plan: Any, config: Any, *, compress: bool) -> tuple[Any, dict[str, Any]]:
    """The plan with ``engine.streaming`` decided (unchanged unless it is ``auto``) and a record
    of the decision for the report."""
    from ..dtypes import FLOAT_DTYPES

    mode = plan.engine.streaming
    experts = _fused_experts(config) if mode is not False and compress else None
    if mode is True and experts is not None:
        raise ConfigError("engine.streaming", True, f"false for this model: {experts}")
    servable = None
    if compress and mode is not False and getattr(plan.export, "servable", False):
        servable = (
            "export.servable=true writes from the whole packed model (one export group size "
            "chosen over every layer); streaming exports one block at a time"
        )
    if mode is True and servable is not None:
        raise ConfigError(
            "export.servable",
            True,
            f"false with engine.streaming=true ({servable}); write the servable copy from the "
            "packed checkpoint afterwards (deploy.servable.write_servable of load_compressed) "
            "or run with engine.streaming=false",
        )
    if mode != "auto":
        return plan, {"mode": mode, "streaming": bool(mode)}
    record: dict[str, Any] = {"mode": "auto", "streaming": False}
    why_not = _can_stream(plan) if compress else "nothing is compressed"
    why_not = why_not or experts or servable
    avail = available_memory()
    est = None
    from transformers import PretrainedConfig

    if isinstance(config, PretrainedConfig):
        est = estimate(config, FLOAT_DTYPES[plan.model.dtype].itemsize, plan)
        record.update(estimate_gib={k: round(v / GIB, 2) for k, v in est.items() if k != "params"})
    if avail is not None:
        record["available_gib"] = round(avail / GIB, 2)
    share = plan.engine.streaming_share
    if est is not None and avail is not None and why_not is None:
        plan, est = _memory_plan(plan, config, est, share * avail, record)
    if est is None or avail is None:
        record["reason"] = "memory or model size unknown: the whole model is loaded"
    elif est["whole"] <= share * avail:
        record["reason"] = (
            f"the whole model fits: ~{est['whole'] / GIB:.2f} GiB <= {share} x "
            f"{avail / GIB:.2f} GiB available"
        )
    elif why_not is not None:
        if est["whole"] > avail:
            raise ConfigError(
                "engine.streaming",
                "auto",
                f"a model that fits: it needs ~{est['whole'] / GIB:.2f} GiB whole, "
                f"{avail / GIB:.2f} GiB are available, and it cannot stream ({why_not})",
            )
        record["reason"] = f"tight (~{est['whole'] / GIB:.2f} GiB) but cannot stream: {why_not}"
    elif est["streaming"] > avail:
        raise ConfigError(
            "engine.streaming",
            "auto",
            f"a model that fits: it needs ~{est['whole'] / GIB:.2f} GiB whole and "
            f"~{est['streaming'] / GIB:.2f} GiB streaming (of which ~"
            f"{est['block_work'] / GIB:.2f} GiB is one block's compression work"
            f"{_leaner(plan)}), but only {avail / GIB:.2f} GiB are available (free memory or "
            "run on a larger machine)",
        )
    else:
        record["streaming"] = True
        record["reason"] = (
            f"the whole model would need ~{est['whole'] / GIB:.2f} GiB > {share} x "
            f"{avail / GIB:.2f} GiB available; streaming needs ~{est['streaming'] / GIB:.2f} GiB"
        )
    log.info(
        "engine.streaming=auto: %s (%s)",
        "streaming" if record["streaming"] else "whole model",
        record["reason"],
    )
    engine = dataclasses.replace(plan.engine, streaming=record["streaming"])
    changes: dict[str, Any] = {"engine": engine}
    if record["streaming"]:
        changes["dense_cache"] = False
    return dataclasses.replace(plan, **changes), record
