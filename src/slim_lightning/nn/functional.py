"""Autograd functions and helpers ``SLiMLinear`` is built on (``slim_lightning.nn.linear``).

* ``FakeQuantSTE``: AbsMax fake quantisation with a straight-through gradient (quantised adapters),
* ``PackedBaseMatmul``: the packed base product, dequantised just in time in forward and backward,
* ``PackedHeadNLL``: the training loss through a packed LM head, vocabulary block by block,
* ``version_key``: the contents identity that keys ``SLiMLinear``'s dense / adapter caches,
* ``strip_tensors`` / ``tensor_meta``: pieces of ``SLiMLinear.meta()``,
* ``pack_compressed``: ``SLiMLinear.from_compressed``'s checks and packing.

Imports only ``slim_lightning.core`` and ``slim_lightning.formats``: ``nn.linear`` builds on it
(``functional`` <- ``linear`` <- ``backend``, ``adapters``, ``embedding``), never the reverse.
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.quant import fake_quant_absmax
from ..core.types import CompressedLinear
from ..formats import PackedWeight


class FakeQuantSTE(torch.autograd.Function):
    """AbsMax fake quantisation along columns with a straight-through (identity) gradient."""

    @staticmethod
    def forward(ctx, w, bits: int, group_size: int, in_scale=None) -> torch.Tensor:
        return fake_quant_absmax(w, bits, group_size, in_scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None, None, None


# weights with more values than this are dequantised in blocks of output rows
DEQUANT_STEP = 1 << 24  # 16 Mi values: 64 MiB in fp32

# PackedHeadNLL keeps the forward's fp32 logits for the backward up to this size
KEEP_LOGITS_BYTES = 256 << 20


def _row_steps(rows: int, cols: int) -> list[tuple[int, int]]:
    """``(start, end)`` blocks of output rows holding about ``DEQUANT_STEP`` values each."""
    step = max(1, DEQUANT_STEP // max(1, cols))
    return [(s, min(s + step, rows)) for s in range(0, rows, step)]


def _large_blocks(pw: PackedWeight) -> list[tuple[int, int]] | None:
    """Row blocks of a weight above ``DEQUANT_STEP`` values whose format is row-sliceable
    (``dense``, ``nm``); None for the others (dequantised whole)."""
    rows, cols = pw.shape
    if rows * cols <= DEQUANT_STEP or pw.format not in ("dense", "nm"):
        return None
    return _row_steps(rows, cols)


class PackedBaseMatmul(torch.autograd.Function):
    """``y = x (Q(W)*M)^T`` for a frozen packed weight: nothing dense is saved for the backward.

    forward: dequantise (or run ``base_fn``, e.g. the Triton kernel) then multiply; backward:
    dequantise again and return ``grad_x = grad_y (Q(W)*M)``. A weight above ``DEQUANT_STEP``
    values (an LM head) is dequantised a block of output rows at a time both ways, so the dense
    work copy stays about ``DEQUANT_STEP`` values. No gradient for the weight (it is a set of
    integer buffers).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, mod: nn.Module, base_fn=None) -> torch.Tensor:
        ctx.mod = mod
        if base_fn is not None:
            return base_fn(mod, x)
        pw = mod.packed_weight()
        blocks = _large_blocks(pw)
        if blocks is None:
            return nn.functional.linear(x, pw.to_dense().to(x.dtype))
        return torch.cat(
            [nn.functional.linear(x, pw.row_block(s, e).to_dense().to(x.dtype)) for s, e in blocks],
            dim=-1,
        )

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None, None
        pw = ctx.mod.packed_weight()
        blocks = _large_blocks(pw)
        if blocks is None:
            return grad @ pw.to_dense().to(grad.dtype), None, None
        # grad_x = sum over blocks of output rows of grad[..., rows] W[rows]
        out = None
        for s, e in blocks:
            part = grad[..., s:e] @ pw.row_block(s, e).to_dense().to(grad.dtype)
            out = part if out is None else out.add_(part)
        return out, None, None


class PackedHeadNLL(torch.autograd.Function):
    """Summed next-token cross-entropy of a frozen packed LM head (``SLiMLinear``, rank 0):
    ``sum_i logsumexp(h_i W^T + b) - (h_i W^T + b)[target_i]``, without full-vocabulary logits.

    The vocabulary is walked in blocks of output rows (``DEQUANT_STEP`` values each), each block
    dequantised once per pass, the tokens in chunks of ``chunk`` rows inside it; forward keeps a
    running log-sum-exp per token, backward adds ``(softmax - onehot) W`` to the input gradient
    block by block. The fp32 logits of the forward wait for the backward when they take at
    most ``KEEP_LOGITS_BYTES`` (one window of a small vocabulary); above that the backward
    recomputes them and at most ``chunk x block`` logits exist at a time. So a step
    dequantises the head twice (forward, backward) where per-chunk activation checkpointing
    through the module does it three times per token chunk. Logits
    are formed in ``h``'s dtype (or the autocast dtype) and reduced in fp32, like
    ``F.cross_entropy(head(h).float(), target)``; targets equal to -100 are ignored.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, target: torch.Tensor, mod: nn.Module, chunk: int = 256):
        dev = h.device.type
        cdt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype
        rows = mod.out_features
        if target.numel() and int(target.max()) >= rows:
            raise ValueError(f"target token id {int(target.max())} >= vocabulary size {rows}")
        n = h.shape[0]
        lse = torch.full((n,), float("-inf"), dtype=torch.float32, device=h.device)
        picked = torch.zeros(n, dtype=torch.float32, device=h.device)
        # small enough (one window of a small vocabulary): the fp32 logits wait for the
        # backward instead of being recomputed there (one head product less per step)
        kept = [] if ctx.needs_input_grad[0] and n * rows * 4 <= KEEP_LOGITS_BYTES else None
        with torch.autocast(dev, enabled=False):
            for s, e in _row_steps(rows, mod.in_features):
                w = _head_rows(mod, s, e, cdt)
                for c in range(0, n, chunk):
                    z = _head_logits(mod, h[c : c + chunk], w, s, e, cdt)
                    if kept is not None:
                        kept.append(z)
                    lse[c : c + chunk] = torch.logaddexp(lse[c : c + chunk], z.logsumexp(1))
                    t = target[c : c + chunk]
                    hit = (t >= s) & (t < e)
                    at = z.gather(1, (t - s).clamp(0, e - s - 1)[:, None]).squeeze(1)
                    picked[c : c + chunk] = torch.where(hit, at, picked[c : c + chunk])
        keep = target != -100
        ctx.save_for_backward(h, target, lse)
        ctx.mod, ctx.cdt, ctx.chunk, ctx.kept = mod, cdt, chunk, kept
        return ((lse - picked) * keep).sum()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        h, target, lse = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        mod, cdt, chunk, kept = ctx.mod, ctx.cdt, ctx.chunk, ctx.kept
        ctx.kept = None
        n = h.shape[0]
        gh = torch.zeros(h.shape, dtype=torch.float32, device=h.device)
        scale = (target != -100).to(torch.float32) * grad.to(torch.float32)  # (n,)
        with torch.autocast(h.device.type, enabled=False):
            for s, e in _row_steps(mod.out_features, mod.in_features):
                w = _head_rows(mod, s, e, cdt)
                for c in range(0, n, chunk):
                    if kept is not None:
                        p = kept.pop(0).sub_(lse[c : c + chunk, None]).exp_()
                    else:
                        z = _head_logits(mod, h[c : c + chunk], w, s, e, cdt)
                        p = torch.exp(z - lse[c : c + chunk, None])
                    t = target[c : c + chunk]
                    hit = torch.nonzero((t >= s) & (t < e)).squeeze(1)
                    p[hit, t[hit] - s] -= 1.0
                    p.mul_(scale[c : c + chunk, None])
                    gh[c : c + chunk] += (p.to(cdt) @ w).to(torch.float32)
        return gh.to(h.dtype), None, None, None


def _head_rows(mod: nn.Module, s: int, e: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows ``s:e`` of the head's dequantised weight in ``dtype`` (from the dense cache if on)."""
    if getattr(mod, "cache_dense", False):
        return mod._cached_dense(dtype)[s:e]
    return mod.packed_weight().row_block(s, e).to_dense().to(dtype)


def _head_logits(mod, h: torch.Tensor, w: torch.Tensor, s: int, e: int, dtype) -> torch.Tensor:
    z = h.to(dtype) @ w.T
    if mod.bias is not None:
        z = z + mod.bias[s:e].to(dtype)
    return z.to(torch.float32)


def version_key(*tensors: torch.Tensor | None) -> tuple:
    """Identity of tensors' contents: storage pointer, in-place version counter, device, dtype.

    Inference tensors (created under ``torch.inference_mode``) have no version counter; they
    cannot be modified in place outside inference mode, so their pointer identifies them.
    """
    return tuple(
        None
        if t is None
        else (t.data_ptr(), -1 if t.is_inference() else t._version, t.device, t.dtype)
        for t in tensors
    )


def strip_tensors(meta: dict) -> dict:
    return {k: v for k, v in meta.items() if k != "tensors"}


def tensor_meta(tensors: dict[str, torch.Tensor]) -> dict:
    return {
        k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
        for k, v in tensors.items()
    }


def pack_compressed(
    c: CompressedLinear,
    bias: torch.Tensor | None,
    n: int,
    m: int,
    adapter_dtype: str,
    version: int,
) -> tuple[dict, PackedWeight, dict[str, PackedWeight]]:
    """``SLiMLinear.from_compressed``'s packing step: checks ``c`` and ``bias`` and packs them.

    Returns:
        ``(meta, packed weight, packed adapters {"l", "r"} (empty unless quantised))``.
    """
    if c.weight_q is not None:
        pw = PackedWeight.from_quant(c.weight_q, c.mask, n=n, m=m)
    else:
        pw = PackedWeight.from_float(c.weight, c.mask, n=n, m=m)
    d_out, d_in = pw.shape
    if tuple(c.weight.shape) != (d_out, d_in):
        raise ValueError(f"weight_q shape {pw.shape} != weight shape {tuple(c.weight.shape)}")
    rank = c.rank if (c.lora_l is not None and c.lora_r is not None) else 0
    quant_ad = rank > 0 and c.lora_l_q is not None and c.lora_r_q is not None
    if rank and (c.lora_l_q is None) != (c.lora_r_q is None):
        raise ValueError("lora_l_q and lora_r_q must both be set or both be None")
    meta = {
        "version": version,
        "in_features": d_in,
        "out_features": d_out,
        "rank": rank,
        "adapter_bits": c.lora_l_q.bits if quant_ad else None,
        "adapter_dtype": "float32" if quant_ad or not rank else adapter_dtype,
        "has_bias": bias is not None,
        "weight": pw.meta(),
    }
    if bias is not None:
        if tuple(bias.shape) != (d_out,):
            raise ValueError(f"bias shape {tuple(bias.shape)} != ({d_out},)")
        meta["bias_dtype"] = str(bias.dtype).removeprefix("torch.")
    packed_ad = {}
    if quant_ad:
        if c.lora_l_q.bits != c.lora_r_q.bits:
            raise ValueError("lora_l_q and lora_r_q must have the same bit width")
        packed_ad = {
            "l": PackedWeight.from_quant(c.lora_l_q, fmt="dense"),
            "r": PackedWeight.from_quant(c.lora_r_q, fmt="dense"),
        }
        if packed_ad["l"].shape != (rank, d_in) or packed_ad["r"].shape != (d_out, rank):
            raise ValueError(
                f"quantised adapters have shapes {packed_ad['l'].shape}, "
                f"{packed_ad['r'].shape}; expected ({rank}, {d_in}), ({d_out}, {rank})"
            )
        meta["adapter_l"] = packed_ad["l"].meta()
        meta["adapter_r"] = packed_ad["r"].meta()
    return meta, pw, packed_ad
