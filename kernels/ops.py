"""The ``triton`` backend of ``SLiMLinear``: maps a layer's packed buffers onto the kernels.

2:4 weights run on the fused kernels of ``sparse24``; ``grouped`` weights (SpQR / SliM-LLM) are
decoded by ``grouped.grouped_decode`` and multiplied by torch, their adapters (fp or quantised)
and bias added by torch as the reference backend does.
"""

from __future__ import annotations

import torch

from slim_lightning.formats import pack_absmax

from .sparse24 import dense4_matmul, slim24_matmul


def _is_grouped(mod) -> bool:
    return mod.meta()["weight"]["format"] == "grouped"


def triton_unsupported_reason(mod) -> str | None:
    """Why ``mod`` (a ``SLiMLinear``) cannot run on the kernels, or None if it can.

    The kernels handle a 2:4 weight with <= 4-bit codes (per-tensor scale, or grouped scales with
    ``group_size % 4 == 0``; optional ``in_scale``), and 4-bit (or fp) adapters; and a
    ``grouped`` weight (decode kernel + matmul; any adapters, run by torch).
    """
    w = mod.meta()["weight"]
    if w["format"] == "grouped":
        from .grouped import grouped_unsupported_reason

        why = grouped_unsupported_reason(w)
        return None if why is None else f"grouped weight: {why}"
    if w["format"] != "nm" or (w["n"], w["m"]) != (2, 4):
        fmt = f"{w['n']}:{w['m']}" if w["format"] == "nm" else w["format"]
        return f"weight format {fmt} (the kernel handles 2:4)"
    if w["bits"] is None or w["bits"] > 4:
        return f"weight bits {w['bits']} (the kernel handles 2..4-bit codes)"
    scale_shape = tuple(w["tensors"]["scale"]["shape"])
    if scale_shape != (1, 1) and w["group_size"] % 4:
        return f"weight scale group size {w['group_size']} is not a multiple of 4"
    if mod.rank and mod.adapter_bits is not None and mod.adapter_bits > 4:
        return f"adapter bits {mod.adapter_bits} (the kernel handles <= 4)"
    return None


def _kernel_adapters(mod) -> tuple:
    """Packed ``(values, scale, group, in_scale)`` of ``L^T`` and of ``R^T`` for the CURRENT
    adapter parameters (bit-identical to the adapter buffers when they are in sync), cached until
    a parameter changes."""
    key = tuple((p.data_ptr(), p._version, p.device, p.dtype) for p in (mod.lora_l, mod.lora_r))
    cache = mod._kernel_cache
    if cache.get("key") != key:
        out = []
        with torch.no_grad():
            for side, param in (("l", mod.lora_l), ("r", mod.lora_r)):
                stored = mod.packed_adapter(side)
                ins = stored.float_field("in_scale")  # fixed: not trained
                pw = pack_absmax(param.t(), mod.adapter_bits, stored.group_size, ins)
                out.append((pw.tensors["values"], pw.float_field("scale"), pw.group_size, ins))
        mod._kernel_cache = cache = {"key": key, "adapters": tuple(out)}
    return cache["adapters"]


def _grouped_base(pw, x2: torch.Tensor) -> torch.Tensor:
    """``x2 W^T`` for a ``grouped`` weight: the decode kernel in x's dtype, then a torch matmul
    (the reference backend's ``linear(x, to_dense().to(x.dtype))``, with the same weight bits)."""
    from .grouped import grouped_decode

    return torch.nn.functional.linear(x2, grouped_decode(pw, x2.dtype))


def slim_base_triton(mod, x: torch.Tensor) -> torch.Tensor:
    """The packed base alone on the kernels (2:4, or grouped decode + matmul): ``x (Q(W)*M)^T``
    (no adapters, no bias); the training path adds those through autograd."""
    why = triton_unsupported_reason(mod)
    if why is not None:
        raise ValueError(f"SLiMLinear triton backend: unsupported layer: {why}")
    k, n = mod.in_features, mod.out_features
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k).contiguous()
    pw = mod.packed_weight()
    if _is_grouped(mod):
        return _grouped_base(pw, x2).reshape(*lead, n)
    y = slim24_matmul(
        x2,
        pw.tensors["values"],
        pw.tensors["meta"],
        pw.float_field("scale"),
        pw.group_size,
        in_scale=pw.float_field("in_scale"),
    )
    return y.reshape(*lead, n)


def slim_linear_triton(mod, x: torch.Tensor) -> torch.Tensor:
    """``SLiMLinear`` forward on the kernels (inference): ``x (..., d_in)`` -> ``(..., d_out)``.

    4-bit adapters: two launches (``t = x L``, then the fused 2:4 + ``t R`` + bias kernel). fp
    adapters: the fused kernel plus two torch matmuls for ``(x L) R``. ``grouped`` weights: decode
    kernel + torch matmul, adapters (``mod.adapters()``) and bias by torch.
    """
    why = triton_unsupported_reason(mod)
    if why is not None:
        raise ValueError(f"SLiMLinear triton backend: unsupported layer: {why}")
    k, n = mod.in_features, mod.out_features
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k).contiguous()  # (M, K)
    pw = mod.packed_weight()
    bias = mod.bias
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    if _is_grouped(mod):
        y = _grouped_base(pw, x2)
        lr = mod.adapters()  # fp, or fake-quantised (cached with cache_dense), as the reference
        if lr is not None:
            y = y + (x2 @ lr[0].to(x.dtype)) @ lr[1].to(x.dtype)
        if bias is not None:
            y = y + bias
        return y.reshape(*lead, n)
    common = dict(in_scale=pw.float_field("in_scale"), bias=bias)
    args = (pw.tensors["values"], pw.tensors["meta"], pw.float_field("scale"), pw.group_size)
    if mod.rank and mod.adapter_bits is not None:
        (lv, ls, lg, lins), (rv, rs, rg, rins) = _kernel_adapters(mod)
        t = dense4_matmul(x2, lv, ls, lg, k, lins)  # (M, r)
        y = slim24_matmul(
            x2, *args, t=t, r_values=rv, r_scale=rs, r_group_size=rg, r_in_scale=rins, **common
        )
    else:
        y = slim24_matmul(x2, *args, **common)
        if mod.rank:
            y = y + (x2 @ mod.lora_l.to(x.dtype)) @ mod.lora_r.to(x.dtype)
    return y.reshape(*lead, n)
