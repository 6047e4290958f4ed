"""Servable export (``export.servable=true``): a copy that serving engines (vLLM etc.) load.

Serving engines no longer accept sparse checkpoint formats, so ``write_servable`` writes:

* ``OUT/base``: a compressed-tensors ``pack-quantized`` W4A16 model. Every compressed linear is a
  symmetric int4 (codes in ``[-8, 7]``) group-quantised weight stored as
  ``<layer>.weight_packed`` (int32, 8 codes per word, packed by compressed-tensors' own
  ``pack_to_int32``), ``<layer>.weight_scale`` (fp16, ``(d_out, d_in / G)``) and
  ``<layer>.weight_shape`` (int64 ``[d_out, d_in]``), exactly what compressed-tensors'
  ``PackedQuantizationCompressor`` produces. The 2:4 zeros are ordinary int4 zeros (the
  2:4 structure is not declared: there is no ``sparsity_config`` key, which vLLM rejects).
  Embeddings, norms, biases and ``lm_head`` are fp16; config.json carries the
  ``quantization_config`` compressed-tensors / llm-compressor write for W4A16 (``targets:
  [Linear]``, ``ignore: [lm_head, ...]``), built with compressed-tensors' own
  ``QuantizationConfig``. The tokenizer files are copied. A packed input embedding / LM head
  (``embeddings.bits=8|4``) is written as its dequantised fp16 table (re-tied when the head
  shared the embedding's codes).
* ``OUT/adapter``: the SLiM adapters as a PEFT LoRA adapter (fp16): ``y = x W^T + (x L) R``
  gives ``lora_A.weight = L^T (r, d_in)`` and ``lora_B.weight = R^T (d_out, r)``. All layers
  share one rank ``r`` = the largest layer rank; smaller ranks are zero-padded (zero rows of
  ``lora_A`` / zero columns of ``lora_B`` add exactly nothing) and ``lora_alpha = r`` so the
  scaling ``alpha / r`` is 1. Zero-padding rather than peft's ``rank_pattern`` /
  ``alpha_pattern``: vLLM derives one scaling ``lora_alpha / r`` per adapter from
  ``adapter_config.json`` (we know of no vLLM release that honours ``alpha_pattern``; untested
  here), so per-layer ranks with patterns could be mis-scaled there, while zero-padding with
  scaling 1 loads identically in peft and in vLLM, for a few padded rows/columns. 4-bit
  adapters are written dequantised (``SLiMLinear.adapters()``, the values the forward uses),
  rounded to fp16. vLLM serves LoRA ranks up to ``max_lora_rank``
  <= 512 (allowed values 1, 8, 16, 32, 64, 128, 256, 320, 512): ``servable.json`` records the
  smallest that fits.
* ``OUT/servable.json``: the report: group size, which layers were written exactly and which
  were re-quantised (with their relative error), adapter rank, and the vLLM command.

Exactness: a layer is written exactly (codes and scales as stored, lossless) when its stored
weight is a symmetric grid of at most 4 bits whose scales are constant over each export group of
``G`` columns (one scale per tensor, per row, or groups that ``G`` divides; a group size that is a
multiple of the model's also works when the scales happen to agree) and it has no SLiM-Quant^O
``in_scale``. Scales are stored in fp16: a scale that is not fp16-representable makes the layer
non-exact (``scale_fp16_rounded``). The default method (``slim_q``: group-128 AbsMax grid, fp16
scales) is exact for any ``G`` that divides 128. Other layers are re-quantised from
``dense_weight()`` with group AbsMax int4 (lossy, reported).

The engine's fp16 arithmetic (``q * scale`` rounded to fp16, fp16 matmuls) is of course not the
fp32 reference forward: "exact" means the stored codes and scales are the model's.

Serve (untested here)::

    vllm serve OUT/base --enable-lora --lora-modules slim=OUT/adapter --max-lora-rank N

and request ``"model": "slim"`` (the base name serves the model without adapters).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..io import atomic_dir, atomic_write_json

# group sizes tried, largest first; vLLM's Marlin W4A16 kernels take 32, 64 and 128
GROUP_CANDIDATES = (128, 64, 32, 16, 8, 4, 2)
MARLIN_GROUPS = (32, 64, 128)
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's allowed --max-lora-rank
BITS = 4
QMIN, QMAX = -(2 ** (BITS - 1)), 2 ** (BITS - 1) - 1  # compressed-tensors int4: [-8, 7]


def serve_missing() -> list[str]:
    """Import names of the packages ``export.servable`` needs that are not installed."""
    import importlib.util

    return [n for n in ("compressed_tensors", "peft") if importlib.util.find_spec(n) is None]


def _compressed_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The ``SLiMLinear`` layers written as int4 (a packed LM head, ``embeddings.bits``, is not
    one of them: it is written as an fp16 table)."""
    from ..nn.linear import SLiMLinear

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {n: m for n, m in model.named_modules() if isinstance(m, SLiMLinear) and m is not head}


@torch.no_grad()
def _vocab_tables(model: nn.Module, dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], bool]:
    """fp16 tables for a packed input embedding / LM head (``embeddings.bits=8|4``): the codes
    times their scales, as plain ``<name>.weight`` (and the head's bias); and whether the head
    is tied to the embedding (it shares its buffers)."""
    from ..nn.embedding import PackedEmbedding
    from ..nn.linear import SLiMLinear

    out: dict[str, torch.Tensor] = {}
    names = {id(m): n for n, m in model.named_modules()}
    embs = [m for m in model.modules() if isinstance(m, PackedEmbedding)]
    for emb in embs:
        out[f"{names[id(emb)]}.weight"] = emb.packed_weight().to_dense().to(dtype)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = False
    if isinstance(head, SLiMLinear):
        tied = any(getattr(head, "weight_values", None) is e.weight_values for e in embs)
        if not tied:
            out[f"{names[id(head)]}.weight"] = head.dense_weight().to(dtype)
        if head.bias is not None:
            out[f"{names[id(head)]}.bias"] = head.bias.detach().to(dtype)
    return out, tied


def _per_column_scale(pw: Any) -> torch.Tensor | None:
    """fp32 ``(rows, cols)``: every weight entry's stored scale, or None when not a plain
    symmetric <= 4-bit grid (unquantised, wider codes, or an ``in_scale``)."""
    if pw.format == "grouped" or pw.bits is None or pw.bits > BITS or "in_scale" in pw.tensors:
        return None  # (grouped: asymmetric codes with zero points, mixed widths, outliers)
    rows, cols = pw.shape
    s = pw.float_field("scale").to(torch.float32)
    if s.shape == (1, 1):
        return s.expand(rows, cols)
    return s.repeat_interleave(pw.group_size, dim=1)[:, :cols]


def _group_exact(pw: Any, group: int | None) -> bool:
    """True when the stored scales are constant over each export group (``None``: per row)."""
    per_col = _per_column_scale(pw)
    if per_col is None:
        return False
    rows, cols = pw.shape
    g = cols if group is None else group
    blocks = per_col.reshape(rows, cols // g, g)
    return bool((blocks == blocks[..., :1]).all())


def choose_group_size(layers: dict[str, nn.Module]) -> int | None:
    """The export group size ``G``: the largest of ``GROUP_CANDIDATES`` that divides every
    layer's ``d_in`` and keeps every exactly-representable layer exact; if none keeps them all
    exact, the largest that divides every ``d_in``; ``None`` (one scale per row, strategy
    ``channel``) when no candidate divides them all."""
    dims = [m.in_features for m in layers.values()]
    fits = [g for g in GROUP_CANDIDATES if all(d % g == 0 for d in dims)]
    if not fits:
        return None
    pws = [m.packed_weight() for m in layers.values()]
    exactable = [pw for pw in pws if _per_column_scale(pw) is not None]
    for g in fits:
        if all(_group_exact(pw, g) for pw in exactable):
            return g
    return fits[0]


def _layer_codes(
    m: nn.Module, group: int | None
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """int8 codes ``(rows, cols)`` in ``[-8, 7]``, fp16 scales ``(rows, n_groups)`` and a record
    of how they were obtained (``exact`` or re-quantised with its relative error)."""
    from ..core.quant import absmax_quant

    pw = m.packed_weight()
    rows, cols = pw.shape
    g = cols if group is None else group
    rec: dict[str, Any] = {"shape": [rows, cols], "stored_bits": pw.bits, "format": pw.format}
    if _group_exact(pw, group):
        codes, _ = pw.codes_and_mask()
        codes = codes.to(torch.int8)
        scale32 = _per_column_scale(pw)[:, ::g].contiguous()
        scale = scale32.to(torch.float16)
        rounded = not torch.equal(scale.to(torch.float32), scale32)
        deq = (codes.to(torch.float32) * scale.to(torch.float32).repeat_interleave(g, 1)).view(
            rows, cols
        )
        ref = pw.to_dense()
        same = torch.equal(deq, ref)
        rec.update(exact=same, scale_fp16_rounded=rounded)
        if not same:
            rec["rel_error"] = float((deq - ref).norm() / ref.norm().clamp_min(1e-30))
        return codes, scale, rec
    w = pw.to_dense()
    qt = absmax_quant(w, BITS, g)  # fp16-representable scales, codes in [-8, 7]
    deq = qt.dequantize(torch.float32)
    why = "scale groups do not fit the export group size"
    for cond, text in (
        (pw.bits is not None and pw.bits > BITS, f"{pw.bits}-bit codes"),
        ("in_scale" in pw.tensors, "in_scale"),
        (pw.bits is None, "unquantised"),
        (pw.format == "grouped", "asymmetric grouped codes (SpQR / SliM-LLM)"),
    ):
        why = text if cond else why
    rec.update(
        exact=False,
        requantized=why,
        rel_error=float((deq - w).norm() / w.norm().clamp_min(1e-30)),
    )
    return qt.q.to(torch.int8), qt.scale.to(torch.float16), rec


def _quantization_config(group: int | None, ignore: list[str]) -> dict[str, Any]:
    """config.json's ``quantization_config`` as compressed-tensors' ``ModelCompressor`` writes
    it for W4A16 ``pack-quantized``, without the ``sparsity_config`` key (vLLM rejects it)."""
    import compressed_tensors
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        QuantizationStatus,
    )

    weights = QuantizationArgs(
        num_bits=BITS,
        type="int",
        symmetric=True,
        strategy="group" if group is not None else "channel",
        group_size=group,
        dynamic=False,
    )
    qc = QuantizationConfig(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
        format="pack-quantized",
        ignore=ignore,
        quantization_status=QuantizationStatus.COMPRESSED,
    )
    return {
        "quant_method": "compressed-tensors",
        "version": compressed_tensors.__version__,
        "transform_config": {},
        **qc.model_dump(exclude=["quant_method"]),
    }


def _write_base(
    model: nn.Module,
    tokenizer: Any,
    out: Path,
    layers: dict[str, nn.Module],
    group: int | None,
    dtype: torch.dtype,
) -> dict[str, dict]:
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from safetensors.torch import save_file

    from ..nn.embedding import PackedEmbedding
    from ..nn.linear import SLiMLinear

    tensors: dict[str, torch.Tensor] = {}
    records: dict[str, dict] = {}
    prefixes = tuple(f"{n}." for n in layers)
    vocab, vocab_tied = _vocab_tables(model, dtype)
    packed_vocab = tuple(
        f"{n}."
        for n, m in model.named_modules()
        if isinstance(m, (PackedEmbedding, SLiMLinear)) and n not in layers
    )
    for k, v in model.state_dict().items():
        if k.startswith(prefixes) and not k.endswith(".bias"):
            continue  # packed SLiM buffers / adapter parameters: written below
        if k.startswith(packed_vocab):
            continue  # packed embedding / LM head: fp16 tables from _vocab_tables
        tensors[k] = v.detach().to(dtype) if v.is_floating_point() else v.detach()
    tensors.update(vocab)
    tied = vocab_tied or bool(getattr(model.config, "tie_word_embeddings", False))
    if tied:
        head = model.get_output_embeddings()
        head_name = next(n for n, m in model.named_modules() if m is head)
        tensors.pop(f"{head_name}.weight", None)
    for name, m in layers.items():
        codes, scale, rec = _layer_codes(m, group)
        tensors[f"{name}.weight_packed"] = pack_to_int32(codes, BITS)
        tensors[f"{name}.weight_scale"] = scale.contiguous()
        tensors[f"{name}.weight_shape"] = torch.tensor(list(codes.shape))
        records[name] = rec
    tensors = {k: v.contiguous().cpu() for k, v in tensors.items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})

    ignore = ["lm_head"] + [
        n
        for n, mod in model.named_modules()
        if isinstance(mod, nn.Linear) and n not in layers and n.split(".")[-1] != "lm_head"
    ]
    config = copy.deepcopy(model.config)
    config.save_pretrained(out)
    data = json.loads((out / "config.json").read_text())
    data["dtype"] = str(dtype).removeprefix("torch.")
    data["tie_word_embeddings"] = tied  # a packed tied head is untied in the model's config
    data.pop("torch_dtype", None)
    data.pop("use_cache", None)  # serving wants the KV cache (the library default)
    data["quantization_config"] = _quantization_config(group, ignore)
    (out / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    records["__vocab__"] = {"dequantized": sorted(vocab), "tied": tied}
    return records


def _target_modules(model: nn.Module, names: list[str]) -> list[str]:
    """PEFT ``target_modules``: the leaf names (``q_proj`` ...) when they select exactly the
    adapted layers (peft and vLLM both match suffixes), else the full module names."""
    leaves = sorted({n.split(".")[-1] for n in names})
    linear = {n for n, m in model.named_modules() if n and hasattr(m, "in_features")}
    matched = {n for n in linear if n.split(".")[-1] in leaves}
    return leaves if matched == set(names) else sorted(names)


@torch.no_grad()
def _write_adapter(
    model: nn.Module, out: Path, layers: dict[str, nn.Module], base_dir: Path, dtype: torch.dtype
) -> dict[str, Any]:
    from peft import LoraConfig
    from safetensors.torch import save_file

    ranked = {n: m for n, m in layers.items() if m.rank > 0}
    r = max((m.rank for m in ranked.values()), default=0)
    if r == 0:
        return {"rank": 0, "layers": 0}
    tensors: dict[str, torch.Tensor] = {}
    fp16_exact = True
    for name, m in ranked.items():
        left, right = m.adapters()  # L (d_in, r_i), R (r_i, d_out) as the forward uses them
        a = torch.zeros(r, m.in_features, dtype=dtype)
        b = torch.zeros(m.out_features, r, dtype=dtype)
        a[: m.rank] = left.detach().T.to(dtype)
        b[:, : m.rank] = right.detach().T.to(dtype)
        fp16_exact &= torch.equal(a[: m.rank].float(), left.detach().T.float().cpu())
        fp16_exact &= torch.equal(b[:, : m.rank].float(), right.detach().T.float().cpu())
        tensors[f"base_model.model.{name}.lora_A.weight"] = a.contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = b.contiguous()
    cfg = LoraConfig(
        r=r,
        lora_alpha=r,  # scaling alpha / r = 1: y = x W^T + (x L) R
        lora_dropout=0.0,
        bias="none",
        target_modules=_target_modules(model, list(ranked)),
        task_type="CAUSAL_LM",
        base_model_name_or_path=str(base_dir),
    )
    cfg.save_pretrained(str(out))
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    ranks = sorted({m.rank for m in ranked.values()})
    max_lora = next((v for v in VLLM_LORA_RANKS if v >= r), None)
    return {
        "rank": r,
        "layer_ranks": ranks,
        "rank_padding": "zero-padded to the largest rank" if len(ranks) > 1 else "none",
        "lora_alpha": r,
        "layers": len(ranked),
        "target_modules": cfg.target_modules
        if isinstance(cfg.target_modules, str)
        else sorted(cfg.target_modules),
        "dtype": str(dtype).removeprefix("torch."),
        "values_fp16_exact": bool(fp16_exact),
        "vllm_max_lora_rank": max_lora,  # None: r > 512, vLLM cannot serve it
    }


def write_servable(
    model: nn.Module,
    tokenizer: Any,
    out_dir: str | Path,
    *,
    group_size: int | None = None,
) -> dict[str, Any]:
    """Writes ``out_dir/{base,adapter,servable.json}`` (module docstring); returns the summary
    that ``servable.json`` holds.

    Args:
        model: a compressed model (its compressed linears are ``SLiMLinear``; not modified).
        tokenizer: saved next to the base (None: no tokenizer files).
        out_dir: the directory, replaced atomically (``io.atomic_dir``).
        group_size: force the export group size (must divide every ``d_in``); default
            :func:`choose_group_size`.

    Raises:
        ImportError: compressed-tensors or peft is missing (install ``slim-lightning[serve]``).
        ValueError: the model has no compressed layers, or ``group_size`` does not fit.
    """
    missing = serve_missing()
    if missing:
        raise ImportError(
            f"write_servable needs {', '.join(missing)}: pip install 'slim-lightning[serve]'"
        )
    out_dir = Path(out_dir)
    layers = _compressed_layers(model)
    if not layers:
        raise ValueError("write_servable: the model has no compressed (SLiMLinear) layers")
    if group_size is not None and any(m.in_features % group_size for m in layers.values()):
        raise ValueError(f"write_servable: group_size={group_size} does not divide every d_in")
    group = group_size if group_size is not None else choose_group_size(layers)
    dtype = torch.float16
    with atomic_dir(out_dir) as tmp:
        (tmp / "base").mkdir()
        (tmp / "adapter").mkdir()
        records = _write_base(model, tokenizer, tmp / "base", layers, group, dtype)
        vocab = records.pop("__vocab__")
        adapter = _write_adapter(model, tmp / "adapter", layers, out_dir / "base", dtype)
        exact = [n for n, r in records.items() if r["exact"]]
        requant = {n: r for n, r in records.items() if r.get("requantized")}
        rounded = [n for n, r in records.items() if r.get("scale_fp16_rounded")]
        summary: dict[str, Any] = {
            "base_dir": str(out_dir / "base"),
            "adapter_dir": str(out_dir / "adapter") if adapter["rank"] else None,
            "format": "compressed-tensors pack-quantized W4A16 (symmetric int4 [-8, 7])",
            "group_size": group,
            "strategy": "group" if group is not None else "channel",
            "vllm_marlin_group_ok": group in MARLIN_GROUPS or group is None,
            "layers": len(records),
            "exact": len(exact) == len(records),
            "exact_layers": len(exact),
            "requantized_layers": {
                n: {"why": r["requantized"], "rel_error": r["rel_error"]}
                for n, r in requant.items()
            },
            "max_requant_rel_error": max((r["rel_error"] for r in requant.values()), default=0.0),
            "scale_fp16_rounded_layers": rounded,
            "non_exact_layers": {
                n: r.get("rel_error") for n, r in records.items() if not r["exact"]
            },
            "dtype": "float16",
            # packed embedding / LM head (embeddings.bits): written as fp16 tables (q * scale)
            "vocab_tables_dequantized": vocab["dequantized"],
            "tie_word_embeddings": vocab["tied"],
            "adapter": adapter,
            "vllm_command": _vllm_command(out_dir, adapter),
        }
        atomic_write_json(tmp / "servable.json", summary)
    return summary


def _vllm_command(out_dir: Path, adapter: dict[str, Any]) -> str:
    cmd = f"vllm serve {out_dir / 'base'}"
    if adapter["rank"]:
        n = adapter["vllm_max_lora_rank"]
        rank = n if n is not None else f"{adapter['rank']} (exceeds vLLM's 512 limit)"
        cmd += f" --enable-lora --lora-modules slim={out_dir / 'adapter'} --max-lora-rank {rank}"
    return cmd


def describe(summary: dict[str, Any]) -> str:
    """One line for logs: group size, exactness, adapter rank."""
    ex = "exact" if summary["exact"] else f"{len(summary['non_exact_layers'])} layers not exact"
    return (
        f"servable: int4 g{summary['group_size']} ({ex}), "
        f"LoRA r={summary['adapter']['rank']} -> {Path(summary['base_dir']).parent}"
    )


__all__ = ["choose_group_size", "describe", "serve_missing", "write_servable"]
