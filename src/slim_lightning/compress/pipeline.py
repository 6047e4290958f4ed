"""The compression driver shared by ``compress.py`` and ``train.py``.

``load_or_compress`` is the one path from a validated plan to the run's compressed model (load
a packed checkpoint, or load the base and compress it); ``compress_model`` walks the model with
the calibration engine and installs the results; ``install_slim_linear`` swaps each compressed
``nn.Linear`` for a packed ``SLiMLinear``. The LightningModule's ``setup()`` only adds the
rank-zero / barrier logic around ``load_or_compress``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.types import CompressedLinear
from ..dtypes import FLOAT_DTYPES
from ..models.arch import capture_block_inputs
from .engine import CalibrationEngine, CalibrationResult, merge_install
from .plan import CompressPlan
from .steps import make_step


def install_slim_linear(
    block: nn.Module,
    name: str,
    linear: nn.Linear,
    c: CompressedLinear,
    adapter_dtype: str = "float32",
) -> None:
    """Replaces ``block.<name>`` by a packed ``SLiMLinear`` built from ``c`` (reference backend).

    fp adapters are rounded to ``adapter_dtype`` (their storage dtype) before anything uses them.
    """
    from ..nn.linear import SLiMLinear

    bias = None if linear.bias is None else linear.bias.detach().float()
    new = SLiMLinear.from_compressed(c, bias, adapter_dtype=adapter_dtype)
    if new.rank and new.adapter_bits is None:  # the next blocks see the stored adapters
        c.lora_l, c.lora_r = new.lora_l.detach().clone(), new.lora_r.detach().clone()
    c.metrics["bits_per_weight"] = packed_bits_per_weight(new)
    new.to(linear.weight.device)
    block.set_submodule(name, new)


def packed_bits_per_weight(layer: nn.Module) -> float:
    """Bits per dense weight of a packed ``SLiMLinear``: 8 x its stored bytes / (d_out x d_in).

    Every stored byte counts (codes, N:M positions or bitmap, row offsets, scales, adapters and
    their scales, padding): the one accounting of size that reports use.
    """
    return 8.0 * layer.packed_nbytes() / (layer.in_features * layer.out_features)


def merge_install_counted(
    block: nn.Module, name: str, linear: nn.Linear, c: CompressedLinear
) -> None:
    """``merge_install`` that still reports the packed size the layer would have."""
    from ..nn.linear import SLiMLinear

    if c.weight_q is not None or c.mask is not None or c.lora_l is not None:
        c.metrics["bits_per_weight"] = packed_bits_per_weight(SLiMLinear.from_compressed(c))
    merge_install(block, name, linear, c)


def plan_fingerprint(
    plan: CompressPlan,
    calib_ids: torch.Tensor,
    model_digest: str,
    packed: bool = True,
    export_dtype: str = "float32",
) -> str:
    """Hash of everything that determines the compressed weights (keys the resume state).

    Covers the compression spec, the model config and its weights' digest, the calibration
    token ids, the seed, ``engine.batch_size`` (it sets the order of the fp32 statistic sums),
    the device type, whether layers are installed packed (the next block's inputs differ in
    rounding) and the torch / transformers / slim-lightning versions (transformers' model code
    computes every block's activations).
    """
    import transformers

    from ..version import __version__

    h = hashlib.sha256()
    record = {
        "spec": asdict(plan.spec),
        "model": _plain(plan.model),
        "weights": model_digest,
        "seed": plan.seed,
        "batch_size": plan.engine.batch_size,
        "device": torch.device(plan.device).type,
        "packed": packed,
        "export_dtype": export_dtype,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "slim_lightning": __version__,
    }
    recon = getattr(plan, "reconstruct", None)
    if recon is not None and recon.mode != "none":
        record["reconstruct"] = asdict(recon)
    h.update(json.dumps(record, sort_keys=True, default=str).encode())
    ids = calib_ids.detach().cpu().contiguous()
    h.update(f"{ids.dtype}|{tuple(ids.shape)}".encode())
    h.update(ids.numpy().tobytes())
    return h.hexdigest()[:16]


def _plain(obj: Any) -> Any:
    try:
        return asdict(obj)
    except TypeError:
        return str(obj)


def compress_model(
    model: nn.Module,
    plan: CompressPlan,
    calib_ids: torch.Tensor,
    run_dir: str | Path | None,
    *,
    packed: bool = True,
    keep_layers: bool = False,
    model_digest: str | None = None,
    export_dtype: str = "float32",
    stream: Any = None,
    dist: Any = None,
) -> CalibrationResult:
    """Compresses ``model`` in place with the plan's spec, one decoder block at a time.

    Args:
        model: a Hugging Face causal LM on CPU.
        calib_ids: int64 ``(nsamples, seqlen)`` calibration windows.
        run_dir: where resume state goes (``run_dir/calib_state``); None disables resume.
        packed: install ``SLiMLinear`` modules (True) or merge into dense weights (False).
        model_digest: digest of the uncompressed weights (``models.weights_digest``); computed
            from ``model``'s tensors when None.
        export_dtype: storage dtype of fp adapters (and of the uncompressed tensors, which the
            caller has already rounded with ``models.round_uncompressed``).
        stream: the ``streaming.StreamingSource`` of a meta-device model: the engine's hook reads
            each block just before it is compressed; the vocabulary tables are freed while the
            blocks are compressed and read back after them.
        dist: the run's ``distributed.DistContext`` (several processes) or None: the engine's
            block step (``steps.make_step``) and each rank's offload directory follow it.
    """
    from ..core.compress import compress_linear_rows
    from ..device import with_threads
    from ..io import tensors_sha256
    from ..models.arch import get_arch, get_blocks

    arch = get_arch(model, ignore=tuple(getattr(plan.model, "ignore", ()) or ()))
    blocks = get_blocks(model, arch)
    if plan.spec.is_identity:
        return CalibrationResult()
    device = plan.device
    inputs, kwargs = capture_block_inputs(model, blocks, calib_ids, plan.engine.batch_size)
    if stream is not None:
        stream.park()
    state_dir = None
    if run_dir is not None and plan.engine.resume:
        state_dir = Path(run_dir) / "calib_state"
    install = (
        functools.partial(install_slim_linear, adapter_dtype=export_dtype)
        if packed
        else merge_install_counted
    )
    if stream is not None:  # streaming: hold no dense copies (of results: unless kept)
        from .meta_tensors import drop_dense_after_install

        install = drop_dense_after_install(install, drop_results=not keep_layers)
        stream.low_precision_linears = packed  # (merged installs write model.dtype weights)
        if run_dir is not None:  # finished blocks wait there (one directory per rank)
            stream.offload_dir = Path(run_dir) / "offloaded"
            if dist is not None:
                stream.offload_dir = stream.offload_dir / f"rank{dist.rank}"
    engine = CalibrationEngine(
        blocks,
        tuple(arch.linear_names),
        plan.spec,
        # (row blocks for large weights of row-separable specs; engine.solver_threads)
        with_threads(compress_linear_rows, plan.engine.resolved_solver_threads(device)),
        install_fn=install,
        device=device,
        state_dir=state_dir,
        fingerprint=plan_fingerprint(
            plan,
            calib_ids,
            model_digest or tensors_sha256(model.state_dict()),
            packed,
            export_dtype,
        ),
        seed=plan.seed,
        progress=plan.engine.progress,
        offload_inputs=plan.engine.offload_inputs,
        block_prefix=arch.blocks_path,
        keep_layers=keep_layers,
        block_hook=None if stream is None else stream.block_hook,
        offload_blocks=stream is not None and stream.offload_dir is not None,
        dense_views=stream is None or not packed or keep_layers,
        block_step=make_step(dist),
        reconstruct=plan.reconstruct,
        norm_dtype=FLOAT_DTYPES[export_dtype],
    )
    with expert_census(model, plan.engine.expert_min_tokens) as census:
        result = engine.run(inputs, kwargs)
    if dist is not None and census:  # every rank counted its own batches
        shares = dist.all_gather_object(census)
        census = {
            n: {
                "tokens": [sum(col) for col in zip(*(sh[n]["tokens"] for sh in shares))],
                "topped_up": sorted(set().union(*(sh[n]["topped_up"] for sh in shares))),
            }
            for n in census
        }
    result.experts = census or None
    del inputs, kwargs
    emb = getattr(plan, "embeddings", None)
    quantized = emb is not None and emb.bits is not None
    # packed tables are replaced one at a time (an untied head is read once the input
    # embedding is packed): streaming never holds both 16-bit tables
    one_by_one = stream is not None and packed and quantized
    if stream is not None:
        stream.restore(input_only=one_by_one)  # the vocabulary tables (16-bit where exact)
        if not packed:
            stream.upcast_vocab()
    if quantized:
        from ..nn.embedding import quantize_embeddings

        result.embeddings = quantize_embeddings(
            model,
            emb.bits,
            emb.group_size,
            packed=packed,
            dtype=None if stream is None else stream.dtype,
            fetch_head=stream.restore if one_by_one else None,
        )
    if stream is not None:
        stream.upcast_vocab()  # tables left unquantised: model.dtype, as a normal load holds
        if not stream.keep_offloaded:
            engine.reinstall_offloaded()  # the packed blocks, back from their offload files
    return result


@contextlib.contextmanager
def expert_census(model: nn.Module, min_tokens: int) -> Iterator[dict[str, Any]]:
    """While the engine runs: the experts' statistics passes count the tokens routed to each
    expert and top up the rarely routed ones (``engine.expert_min_tokens``). Yields the report
    (``{module path: {"tokens": [...], "topped_up": [...]}}``), filled on exit."""
    from ..models.experts import LinearExperts

    mods = {n: m for n, m in model.named_modules() if isinstance(m, LinearExperts)}
    for m in mods.values():
        m.reset_counts()
        m.count_tokens, m.only_observed, m.stats_min_tokens = True, True, min_tokens
    out: dict[str, Any] = {}
    try:
        yield out
    finally:
        for name, m in mods.items():
            m.count_tokens, m.only_observed, m.stats_min_tokens = False, False, 0
            tokens = [0] * m.num_experts if m.tokens_routed is None else m.tokens_routed.tolist()
            out[name] = {"tokens": tokens, "topped_up": sorted(m.topped_up)}


# -- the one compression path both entry points share ---------------------------------------------
@dataclass
class Loaded:
    """A run's model: the base (before ``load_or_compress``) or the compressed model (after).

    Attributes:
        model, tokenizer: the Hugging Face model (compressed layers are ``SLiMLinear``) on CPU.
        export_dtype: storage dtype of the uncompressed tensors (``export.dtype`` resolved).
        model_digest: digest of the uncompressed weights (None when loaded packed).
        calib_result: the calibration engine's result (compressed here) or None.
        meta: ``slim.json`` of a loaded packed checkpoint, or None.
        timings: seconds per stage.
        embeddings: ``embeddings.quantize_embeddings``'s report when they were quantised.
        stream: the ``streaming.StreamingSource`` reading the blocks (``engine.streaming``).
    """

    model: nn.Module
    tokenizer: Any
    export_dtype: str = "float32"
    model_digest: str | None = None
    calib_result: CalibrationResult | None = None
    meta: dict | None = None
    timings: dict = field(default_factory=dict)
    compressed: bool = False
    embeddings: dict | None = None
    stream: Any = None

    @property
    def fingerprint(self) -> str | None:
        """The compression fingerprint (weights, data, options) of this model's base."""
        if self.calib_result is not None and self.calib_result.fingerprint:
            return self.calib_result.fingerprint
        return None if self.meta is None else self.meta.get("calibration")

    @property
    def source_sha256(self) -> str | None:
        """``models.weights_digest`` of the dense parent (loaded here, or recorded in slim.json)."""
        return self.model_digest or (self.meta or {}).get("source_sha256")


def load_base(plan: CompressPlan, prepared: Any = None) -> Loaded:
    """Loads the uncompressed model (tokenizer from preflight when given), digests its weights
    and rounds what is exported uncompressed to its storage dtype, so the dense evaluation, the
    compression and the compressed evaluation all see the stored values."""
    from ..models.load import load_model, round_uncompressed, source_dtype, weights_digest

    t0 = time.perf_counter()
    tok = None if prepared is None else prepared.tokenizer
    config = None if prepared is None else prepared.config  # read once, in preflight
    if getattr(plan.engine, "streaming", False) is True:
        return _load_streaming_base(plan, tok, config)
    model, tok = load_model(plan.model, tokenizer=tok, config=config)
    out = Loaded(model, tok, timings={"load_s": time.perf_counter() - t0})
    t0 = time.perf_counter()
    out.model_digest = weights_digest(plan.model, model)
    out.timings["digest_s"] = time.perf_counter() - t0
    dtype = plan.export.dtype
    if dtype == "auto":
        dtype = source_dtype(plan.model, None if prepared is None else prepared.config)
    out.export_dtype = dtype
    round_uncompressed(model, dtype, plan.model.ignore)
    return out


def _load_streaming_base(plan: CompressPlan, tok: Any, config: Any) -> Loaded:
    """``load_base`` for ``engine.streaming``: the meta skeleton with only its non-block tensors
    read (rounded to the export dtype as ``round_uncompressed`` does); blocks are read by the
    engine's hook (``Loaded.stream``). The digest hashes the checkpoint files."""
    from ..models.load import load_config, load_tokenizer, source_dtype, weights_digest
    from .streaming import load_streaming

    t0 = time.perf_counter()
    config = load_config(plan.model) if config is None else config
    tok = load_tokenizer(plan.model) if tok is None else tok
    dtype = plan.export.dtype
    if dtype == "auto":
        dtype = source_dtype(plan.model, config)
    model, stream = load_streaming(plan.model, config, dtype, tok)
    out = Loaded(model, tok, export_dtype=dtype, stream=stream)
    out.timings["load_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    out.model_digest = weights_digest(plan.model, None)
    out.timings["digest_s"] = time.perf_counter() - t0
    return out


def load_packed(path: str | Path, *, verify: bool = True, tokenizer: Any = None) -> Loaded:
    """A packed checkpoint as the run's compressed model (``checkpoint.load_compressed``)."""
    from ..checkpoint import load_compressed

    t0 = time.perf_counter()
    model, tok, meta = load_compressed(path, device="cpu", verify=verify, backend="reference")
    model.eval()
    if hasattr(model, "config"):
        model.config.use_cache = False
    out = Loaded(model, tok if tok is not None else tokenizer, meta=meta, compressed=True)
    out.export_dtype = meta.get("dtype", "float32")
    out.timings["load_packed_s"] = time.perf_counter() - t0
    return out


def check_ckpt_fingerprint(
    plan: CompressPlan, base: Loaded, ids: torch.Tensor, ckpt: dict | None, ckpt_path: Any
) -> None:
    """Refuses, before compressing, a ``ckpt_path`` trained on another compression setup."""
    from ..errors import ConfigError

    if not ckpt or not ckpt.get("fingerprint") or base.model_digest is None:
        return
    fp = plan_fingerprint(plan, ids, base.model_digest, plan.export.packed, base.export_dtype)
    if fp != ckpt["fingerprint"]:
        raise ConfigError(
            "ckpt_path",
            ckpt_path,
            f"a checkpoint of a run with this model, data and method (its compression "
            f"fingerprint {ckpt['fingerprint']} != {fp} of this run)",
        )


def load_or_compress(
    plan: CompressPlan,
    run_dir: str | Path | None,
    *,
    prepared: Any = None,
    compressed_path: str | Path | None = None,
    base: Loaded | None = None,
    ckpt_path: Any = None,
    dist: Any = None,
) -> Loaded:
    """The run's compressed model: loaded from ``compressed_path``, or compressed from the base.

    Args:
        plan: the validated plan.
        run_dir: resume state goes to ``run_dir/calib_state``.
        prepared: ``preflight.Prepared`` (tokenizer, calibration windows, checked checkpoints).
        compressed_path: a packed checkpoint to load instead of compressing.
        base: an already loaded base (``load_base``), e.g. after a dense evaluation.
        ckpt_path: the Lightning checkpoint to resume (its base must match; checked here
            before compressing).
        dist: the ``distributed.DistContext`` of a several-process ``compress.py`` run, or None.
    """
    from ..data.text import calibration_windows

    if compressed_path is not None:
        verified = prepared is not None and prepared.compressed_meta is not None
        tok = None if prepared is None else prepared.tokenizer
        return load_packed(compressed_path, verify=not verified, tokenizer=tok)
    base = load_base(plan, prepared) if base is None else base
    t0 = time.perf_counter()
    ids = None if prepared is None else prepared.calib_ids
    if ids is None:
        ids = calibration_windows(base.tokenizer, plan.calib)
    base.timings["calib_data_s"] = time.perf_counter() - t0
    check_ckpt_fingerprint(
        plan, base, ids, None if prepared is None else prepared.ckpt_base, ckpt_path
    )
    t0 = time.perf_counter()
    base.calib_result = compress_model(
        base.model,
        plan,
        ids,
        run_dir,
        packed=plan.export.packed,
        model_digest=base.model_digest,
        export_dtype=base.export_dtype,
        stream=base.stream,
        dist=dist,
    )
    base.embeddings = base.calib_result.embeddings
    base.timings["compress_s"] = time.perf_counter() - t0
    base.compressed = True
    return base
