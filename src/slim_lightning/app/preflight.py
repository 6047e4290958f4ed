"""Everything cheap that can fail, checked before anything heavy.

``preflight`` runs right after the config is validated and before any weights load, dense
evaluation or compression. In order: the model's config (``config.json`` / GGUF header, the hub
probed in seconds), the architecture, every compressed layer's width against the N:M pattern,
window lengths against the model's positions, a compressed checkpoint's digests, a Lightning
checkpoint's readability and base, then the tokenizer and every text: calibration windows,
evaluation windows, training blocks. Each failure is a ``ConfigError`` (or ``CheckpointError``)
naming the key and the file.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError


@dataclass
class Prepared:
    """What preflight computed (reused by the run: nothing is tokenised twice)."""

    tokenizer: Any
    config: Any = None  # the model's HF config (None when a compressed checkpoint is loaded)
    calib_ids: torch.Tensor | None = None  # int64 (nsamples, seqlen)
    eval_windows: torch.Tensor | None = None  # int64 (n, seqlen)
    train_blocks: tuple[torch.Tensor, torch.Tensor] | None = None  # (train, val) blocks
    compressed_meta: dict[str, Any] | None = None
    ckpt_base: dict[str, Any] | None = None  # the Lightning checkpoint's "slim_base" record
    plan: Any = None  # the plan with engine.streaming decided (app.autostream)
    streaming: dict[str, Any] | None = None  # that decision, for the report


def check_dims(spec: Any, shapes: dict[str, tuple[int, int]], model_name: str) -> None:
    """Raises ConfigError when the sparsity pattern cannot tile some compressed layer."""
    if spec.sparsity.pattern == "nm":
        m = spec.sparsity.m
        widths = sorted({d_in for _, d_in in shapes.values()})
        bad = [d for d in widths if d % m]
        if bad:
            raise ConfigError(
                "sparsity.m",
                m,
                f"a divisor of every compressed layer's input width; {model_name} has input "
                f"widths {widths} and {bad} are not multiples of {m}",
            )


def check_seqlens(plan: Any, config: Any, data: Any = None) -> None:
    """Window lengths must fit the model's position range."""
    limit = getattr(config, "max_position_embeddings", None)
    if not isinstance(limit, int) or limit <= 0:
        return
    for key, cfg in (("calib", plan.calib), ("eval", plan.eval), ("data", data)):
        if cfg is not None and cfg.seqlen > limit:
            raise ConfigError(
                f"{key}.seqlen",
                cfg.seqlen,
                f"at most {limit} (the model's max_position_embeddings)",
            )


def read_ckpt_base(ckpt_path: str) -> dict[str, Any]:
    """The ``slim_base`` record of a Lightning checkpoint written by ``train.py``.

    Raises:
        ConfigError: ``ckpt_path`` when the file is not a readable torch checkpoint of this
            project.
    """
    p = Path(ckpt_path).expanduser()
    if not p.is_file():
        raise ConfigError("ckpt_path", ckpt_path, "an existing Lightning .ckpt file or null")
    if not zipfile.is_zipfile(p):
        raise ConfigError("ckpt_path", ckpt_path, "a torch checkpoint (this file is not one)")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - truncated, garbled or foreign pickles
        raise ConfigError(
            "ckpt_path", ckpt_path, f"a readable Lightning checkpoint ({type(e).__name__}: {e})"
        ) from None
    base = ckpt.get("slim_base") if isinstance(ckpt, dict) else None
    if not isinstance(base, dict) or "base_sha256" not in base:
        raise ConfigError(
            "ckpt_path",
            ckpt_path,
            "a checkpoint written by this project's train.py (it has no slim_base record)",
        )
    return base


def preflight(
    plan: Any,
    *,
    compress: bool,
    data: Any = None,
    compressed_path: str | None = None,
    ckpt_path: str | None = None,
) -> Prepared:
    """Runs every cheap check of one run; returns the tokenizer and the tokenised texts.

    Args:
        plan: the validated ``CompressPlan``.
        compress: this run compresses (calibration windows are needed).
        data: the ``data`` group (fine-tuning text) or None.
        compressed_path: a packed checkpoint to load instead of compressing.
        ckpt_path: a Lightning checkpoint to resume from.
    """
    from ..checkpoint.layout import verify_files
    from ..data.text import calibration_windows, eval_tokens, eval_windows
    from ..models.arch import get_arch, linear_shapes, meta_model
    from ..models.load import load_config, load_tokenizer

    prepared = Prepared(tokenizer=None)
    if compressed_path is not None:
        from transformers import AutoConfig, AutoTokenizer

        prepared.compressed_meta = verify_files(compressed_path)
        if plan.engine.streaming == "auto":  # nothing is compressed: nothing streams
            plan = _whole_model(plan)
        config = AutoConfig.from_pretrained(compressed_path, trust_remote_code=False)
        if (Path(compressed_path) / "tokenizer_config.json").is_file():
            prepared.tokenizer = AutoTokenizer.from_pretrained(
                compressed_path, trust_remote_code=False
            )
    else:
        config = load_config(plan.model)
        from transformers import PretrainedConfig

        if isinstance(config, PretrainedConfig):
            shell = meta_model(config, bool(plan.model.trust_remote_code))  # one build, no weights
            arch = get_arch(shell, plan.model.arch, plan.model.ignore)
            check_dims(plan.spec, linear_shapes(shell, arch), plan.model.name)
        from .autostream import resolve_streaming

        plan, prepared.streaming = resolve_streaming(plan, config, compress=compress)
        if compress and plan.engine.streaming is True:
            from ..models.shards import check_streamable

            check_streamable(plan.model)  # safetensors shards to read blocks from
    prepared.plan = plan
    prepared.config = config
    check_seqlens(plan, config, data)
    if ckpt_path is not None and ckpt_path != "last":
        prepared.ckpt_base = read_ckpt_base(ckpt_path)
        if prepared.compressed_meta is not None:
            want = prepared.compressed_meta.get("base_sha256")
            if want and prepared.ckpt_base["base_sha256"] != want:
                raise ConfigError(
                    "ckpt_path",
                    ckpt_path,
                    f"a checkpoint trained on this compressed base; it was trained on another "
                    f"one (base sha256 {prepared.ckpt_base['base_sha256'][:12]} != "
                    f"{want[:12]} of compressed.path={compressed_path})",
                )
    if prepared.tokenizer is None:
        prepared.tokenizer = load_tokenizer(plan.model)
    tok = prepared.tokenizer
    if compress and plan.calib is not None:
        prepared.calib_ids = calibration_windows(tok, plan.calib)
    if plan.eval is not None:
        prepared.eval_windows = eval_windows(
            eval_tokens(tok, plan.eval), plan.eval.seqlen, plan.eval.max_windows, plan.eval.where
        )
    if data is not None:
        from ..data.datamodule import check_budget, make_blocks, training_tokens

        prepared.train_blocks = make_blocks(training_tokens(tok, data), data)
        world = os.environ.get("WORLD_SIZE", "1")
        world_size = int(world) if world.isdigit() and int(world) > 0 else 1
        check_budget(data, prepared.train_blocks[0].shape[0], world_size)
    return prepared


def _whole_model(plan: Any) -> Any:
    import dataclasses

    return dataclasses.replace(plan, engine=dataclasses.replace(plan.engine, streaming=False))
