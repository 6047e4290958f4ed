"""``engine.streaming=auto`` (the default): stream when the model would not fit, say why.

Before any weights load, the run estimates its host memory both ways from the model's config
(parameter count on the meta device, no weights read):

* whole model (``engine.streaming=false``): the weights at ``model.dtype`` plus the packed copy
  that is built beside them, plus a baseline for Python, torch and transformers;
* streaming: the packed model (about 0.3x of the 16-bit bytes), the largest decoder block at
  16 bits twice (the block and its results), the 16-bit vocabulary tables, the baseline.

It streams when the whole-model estimate exceeds ``engine.streaming_share`` of the memory
available to the process (``MemAvailable``, and the cgroup limit where one is set), logs one
line with the numbers and the choice, and refuses (``ConfigError`` naming both estimates and the
available memory) when even the streaming estimate does not fit. Models that cannot stream (a
random tiny model, a GGUF file without ``model.cache_gguf``, an identity method) run whole.
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


def available_memory() -> int | None:
    """Bytes this process may still allocate: ``MemAvailable``, capped by a cgroup v2/v1 limit
    (None where neither can be read)."""
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        (
            "/sys/fs/cgroup/memory/memory.limit_in_bytes",
            "/sys/fs/cgroup/memory/memory.usage_in_bytes",
        ),
    ):
        try:
            limit = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 2**60:
            left = max(0, int(limit) - usage)
            avail = left if avail is None else min(avail, left)
        break
    return avail


def estimate(config: Any, dtype_bytes: int) -> dict[str, int]:
    """Host bytes of a whole-model run and of a streaming run (see the module docstring)."""
    import torch
    from transformers import AutoModelForCausalLM

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
    return {
        "params": int(total),
        "whole": int(total * dtype_bytes + packed + BASELINE),
        "streaming": int(packed + 2 * block * 2 + vocab * 2 + BASELINE),
    }


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
    if mode != "auto":
        return plan, {"mode": mode, "streaming": bool(mode)}
    record: dict[str, Any] = {"mode": "auto", "streaming": False}
    why_not = _can_stream(plan) if compress else "nothing is compressed"
    avail = available_memory()
    est = None
    from transformers import PretrainedConfig

    if isinstance(config, PretrainedConfig):
        est = estimate(config, FLOAT_DTYPES[plan.model.dtype].itemsize)
        record.update(estimate_gib={k: round(v / GIB, 2) for k, v in est.items() if k != "params"})
    if avail is not None:
        record["available_gib"] = round(avail / GIB, 2)
    share = plan.engine.streaming_share
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
            f"~{est['streaming'] / GIB:.2f} GiB streaming, but only {avail / GIB:.2f} GiB are "
            "available (free memory, or run on a larger machine / several ranks)",
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
