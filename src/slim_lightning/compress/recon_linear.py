"""The trainable view of a compressed linear for block-wise reconstruction (:mod:`.reconstruct`).

Kept weights train as real values ``v`` in grid units whose forward is ``round(v)`` clamped to
the b-bit range (straight-through estimator), the group scales as ``s0 * exp(u)``, the adapter
factors through the same grid; a quantised product recomputes its weight in the backward.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from ..core.grouped import GroupQuant
from ..core.types import CompressedLinear, QuantTensor, group_sums, scale_groups_
from ..formats.bitpack import _lossless_dtype
from .resume import canonicalize


class _GridValue(torch.autograd.Function):
    """``w = clamp(round(v)) * mask * scale[:, j // group] / in_scale[j]`` with a straight-through
    gradient for ``v`` (``dw/dv`` taken as the identity on the rounding) and the exact one for
    the scales, in a few in-place passes (the composed autograd graph takes about three times as
    many full-size tensors). The codes are recomputed in the backward, not saved.

    With a mask, ``v`` holds only the kept values (``mask``'s True entries in row-major order, a
    1-d tensor): pruned values never change (their gradient is zero), so neither they nor their
    gradient and optimiser state are stored."""

    @staticmethod
    def forward(ctx, v, scale, in_scale, mask, lo: int, hi: int, group: int):
        q = _codes(v, mask, lo, hi)
        ctx.save_for_backward(v, scale, in_scale, mask)
        ctx.grid = (lo, hi, group)
        return scale_groups_(q, scale, group, in_scale)

    @staticmethod
    def backward(ctx, gw: torch.Tensor):
        v, scale, in_scale, mask = ctx.saved_tensors
        need = ctx.needs_input_grad
        g = gw.clone()  # (autograd's gradient: not ours to change in place)
        grad_v, grad_s = _grid_grads(g, v, scale, in_scale, mask, ctx.grid, need[0], need[1])
        return grad_v, grad_s, None, None, None, None, None


class _GridLinear(torch.autograd.Function):
    """``x @ w.T`` with ``w`` the grid matrix of ``_GridValue``, recomputed in the backward
    instead of saved: between a block's forward and backward no dense fp32 weight is held
    (4 bytes per block weight: 0.8 GB on a LLaMA-7B block), one linear's at a time in the
    backward. The same products as the composed graph ``x @ _GridValue(...).T``. A weight of
    more than ``ROW_STEP`` values is recomputed, multiplied and differentiated in blocks of
    output rows (the backward's fp32 weight, gradient and codes of one block at a time: ~12
    bytes per weight of the largest linear otherwise). ``acc`` (``reconstruct.mask=refine``):
    ``(|dL/dW| sum, input channels' sum of squares)`` accumulated in the backward, or None."""

    @staticmethod
    def forward(ctx, x, v, scale, in_scale, mask, lo: int, hi: int, group: int, acc=None):
        ctx.save_for_backward(x, v, scale, in_scale, mask)
        ctx.grid, ctx.acc = (lo, hi, group), acc
        blocks = _row_blocks(v, scale, mask)
        if len(blocks) == 1:
            return x @ scale_groups_(_codes(v, mask, lo, hi), scale, group, in_scale).T
        y = x.new_empty(*x.shape[:-1], blocks[-1][1])
        for r0, r1, _, v_b, s_b, m_b in blocks:
            y[..., r0:r1] = x @ scale_groups_(_codes(v_b, m_b, lo, hi), s_b, group, in_scale).T
        return y

    @staticmethod
    def backward(ctx, gy: torch.Tensor):
        x, v, scale, in_scale, mask = ctx.saved_tensors
        lo, hi, group = ctx.grid
        need = ctx.needs_input_grad
        blocks = _row_blocks(v, scale, mask)
        whole = len(blocks) == 1
        x2, gy2 = x.reshape(-1, x.shape[-1]), gy.reshape(-1, gy.shape[-1])
        gx = grad_v = grad_s = None
        if not whole:
            gx = x2.new_zeros(x2.shape) if need[0] else None
            grad_v = torch.empty_like(v) if need[1] else None
            grad_s = torch.zeros_like(scale) if need[2] else None
        if ctx.acc is not None and (need[1] or need[2]):
            ctx.acc[1].add_(x2.square().sum(0))
        for r0, r1, k0, v_b, s_b, m_b in blocks:
            g_b = gy2[:, r0:r1]
            if need[0]:
                w = scale_groups_(_codes(v_b, m_b, lo, hi), s_b, group, in_scale)
                gx = g_b @ w if whole else gx.addmm_(g_b, w)
                del w
            if need[1] or need[2]:
                gw = g_b.T.mm(x2)
                if ctx.acc is not None:  # (before _grid_grads masks gw in place)
                    ctx.acc[0][r0:r1].add_(gw.abs())
                gv, gs = _grid_grads(gw, v_b, s_b, in_scale, m_b, ctx.grid, need[1], need[2])
                del gw
                if whole:
                    grad_v, grad_s = gv, gs
                    continue
                if gv is not None:
                    grad_v[k0 : k0 + gv.shape[0]] = gv
                if gs is not None:
                    if scale.shape[0] == 1:  # (one scale row for every row)
                        grad_s += gs
                    else:
                        grad_s[r0:r1] = gs
        if gx is not None:
            gx = gx.reshape(x.shape)
        return gx, grad_v, grad_s, None, None, None, None, None, None


#: values of a grid weight recomputed at once by ``_GridLinear`` (larger weights go in blocks
#: of output rows)
ROW_STEP = 1 << 21


def _row_blocks(v: torch.Tensor, scale: torch.Tensor, mask: torch.Tensor | None) -> list:
    """``(r0, r1, k0, values, scales, mask)`` of each block of output rows of at most
    ``ROW_STEP`` values (one block, the whole weight, when it is that small); the block's values
    are ``v[k0:]``'s first: under a mask ``v`` holds the kept values in row-major order."""
    rows, cols = mask.shape if mask is not None else v.shape
    step = max(1, ROW_STEP // cols)
    if rows <= step:
        return [(0, rows, 0, v, scale, mask)]
    ends = mask.sum(1).cumsum(0).tolist() if mask is not None else None
    out = []
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        s_b = scale if scale.shape[0] == 1 else scale[r0:r1]
        if ends is None:
            out.append((r0, r1, r0, v[r0:r1], s_b, None))
        else:
            k0 = ends[r0 - 1] if r0 else 0
            out.append((r0, r1, k0, v[k0 : ends[r1 - 1]], s_b, mask[r0:r1]))
    return out


def _grid_grads(gw, v, scale, in_scale, mask, grid, need_v: bool, need_s: bool):
    """The straight-through gradient of the grid values and the exact one of the scales from
    the weight's gradient ``gw`` (consumed)."""
    lo, hi, group = grid
    g = gw.mul_(mask) if mask is not None else gw
    if in_scale is not None:
        g.div_(in_scale.reshape(1, -1))
    grad_s = grad_v = None
    if need_s:
        gq = _codes(v, mask, lo, hi).mul_(g)
        grad_s = group_sums(gq, scale.shape, group)
        del gq
    if need_v:
        grad_v = scale_groups_(g, scale, group)
        if mask is not None:
            grad_v = grad_v.masked_select(mask)
    return grad_v, grad_s


def _codes(v: torch.Tensor, mask: torch.Tensor | None, lo: int, hi: int) -> torch.Tensor:
    """The dense fp32 codes ``clamp(round(v))`` (zero where ``mask`` is False; ``v`` then holds
    the kept values only)."""
    if mask is None:
        return torch.round(v).clamp_(lo, hi)
    q = torch.zeros(mask.shape, dtype=torch.float32, device=v.device)
    return q.masked_scatter_(mask, torch.round(v).clamp_(lo, hi))


class _QuantParam(nn.Module):
    """A ``QuantTensor`` as trainable grid values and log-scales; ``value()`` is the dequantised
    matrix the packed layer would compute from the snapped codes. Under a mask ``v`` holds the
    kept values only (see ``_GridValue``)."""

    def __init__(self, qt: QuantTensor, mask: torch.Tensor | None, train_v: bool, train_s: bool):
        super().__init__()
        self.group, self.bits = qt.group_size, qt.bits
        self.lo, self.hi = -(2 ** (qt.bits - 1)), 2 ** (qt.bits - 1) - 1
        q = qt.q if mask is None else qt.q.masked_select(mask)
        self.v = nn.Parameter(q.float(), requires_grad=train_v)
        self.register_buffer("s0", qt.scale.float().clone())
        self.u = nn.Parameter(torch.zeros_like(self.s0), requires_grad=train_s)
        self.in_scale = None if qt.in_scale is None else qt.in_scale.float()
        self.mask = mask
        self.acc: tuple[torch.Tensor, torch.Tensor] | None = None  # see _GridLinear
        # scales stored in fp16 by the packed format stay fp16-representable (same sizes)
        # (the packer's own rule for storing scales in fp16)
        self.half_scales = _lossless_dtype(self.s0) == torch.float16

    def scale(self) -> torch.Tensor:
        s = self.s0 * torch.exp(self.u)
        return s.to(torch.float16).float() if self.half_scales and not self.training else s

    def value(self) -> torch.Tensor:
        return _GridValue.apply(
            self.v, self.scale(), self.in_scale, self.mask, self.lo, self.hi, self.group
        )

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ self.value().T`` without keeping the dense value for the backward."""
        return _GridLinear.apply(
            x,
            self.v,
            self.scale(),
            self.in_scale,
            self.mask,
            self.lo,
            self.hi,
            self.group,
            self.acc,
        )

    @torch.no_grad()
    def snap(self) -> QuantTensor:
        q = _codes(self.v.detach(), self.mask, self.lo, self.hi)
        s = self.s0 * torch.exp(self.u)
        if self.half_scales:
            s = s.to(torch.float16).float()
        return QuantTensor(q.to(torch.int8), s.contiguous(), self.group, self.bits, self.in_scale)


class ReconLinear(nn.Module):
    """The trainable view of one compressed linear: ``x W^T + (x L) R + b``."""

    def __init__(self, c: CompressedLinear, bias: torch.Tensor | None, cfg: Any):
        super().__init__()
        self.c, self.bias = c, None if bias is None else bias.detach()
        mask = c.mask  # (bool: a product with it promotes exactly as a float 0/1 mask would)
        self.wq = self.w = None
        # SpQR / SliM-LLM: codes, widths, statistics and outliers stay as compressed (the
        # adapters and norms around them train); the dense view is rebuilt from the codes
        fixed = c.weight_q.dequantize() if isinstance(c.weight_q, GroupQuant) else None
        self.register_buffer("fixed", fixed)
        if c.weight_q is not None and fixed is None:
            self.wq = _QuantParam(c.weight_q, mask, cfg.train_weights, cfg.train_scales)
        elif fixed is None:
            self.w = nn.Parameter(c.weight.float().clone(), requires_grad=cfg.train_weights)
            self.mask = mask
        self.lq = self.rq = self.l = self.r = None
        if c.lora_l_q is not None and c.lora_r_q is not None:
            self.lq = _QuantParam(c.lora_l_q, None, cfg.train_adapters, cfg.train_scales)
            self.rq = _QuantParam(c.lora_r_q, None, cfg.train_adapters, cfg.train_scales)
        elif c.lora_l is not None and c.lora_r is not None:
            self.l = nn.Parameter(c.lora_l.float().clone(), requires_grad=cfg.train_adapters)
            self.r = nn.Parameter(c.lora_r.float().clone(), requires_grad=cfg.train_adapters)

    def release_codes(self) -> None:
        """Drops the compressed result's int8 code matrix (1 byte per weight) when the trainable
        values hold it (``snap()`` rebuilds the codes from them); its shape stays (meta)."""
        if self.wq is not None:
            q = self.c.weight_q.q
            meta = torch.empty(q.shape, dtype=q.dtype, device="meta")
            self.c.weight_q = dataclasses.replace(self.c.weight_q, q=meta)

    def weight_value(self) -> torch.Tensor:
        if self.fixed is not None:
            return self.fixed
        if self.wq is not None:
            return self.wq.value()
        return self.w if self.mask is None else self.w * self.mask

    def adapters(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.lq is not None:
            return self.lq.value().T, self.rq.value().T  # (d_in, r), (r, d_out)
        if self.l is not None:
            return self.l, self.r
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt = x.dtype
        x = x.float()
        y = self.wq.linear(x) if self.wq is not None else x @ self.weight_value().T
        ad = self.adapters()
        if ad is not None:
            y = y + (x @ ad[0]) @ ad[1]
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(dt)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        g: dict[str, list[nn.Parameter]] = {"weight": [], "scale": [], "adapter": []}
        if self.wq is not None:
            g["weight"].append(self.wq.v)
            g["scale"].append(self.wq.u)
        elif self.w is not None:
            g["weight"].append(self.w)
        for p in (self.lq, self.rq):
            if p is not None:
                g["adapter"].append(p.v)
                g["scale"].append(p.u)
        for p in (self.l, self.r):
            if p is not None:
                g["adapter"].append(p)
        return {k: [p for p in v if p.requires_grad] for k, v in g.items()}

    @torch.no_grad()
    def snap(self, dense_views: bool = True) -> CompressedLinear:
        """The trained layer as a ``CompressedLinear`` of the same format and sizes (a quantised
        weight's dense view on the meta device unless ``dense_views``)."""
        out = dataclasses.replace(self.c, metrics=dict(self.c.metrics))
        if self.wq is not None:
            out.weight_q = self.wq.snap()
        elif self.fixed is None:
            out.weight = self.weight_value().detach().clone()
        if self.lq is not None:
            out.lora_l_q, out.lora_r_q = self.lq.snap(), self.rq.snap()
        elif self.l is not None:
            out.lora_l, out.lora_r = self.l.detach().clone(), self.r.detach().clone()
        return canonicalize(out, dense_views)
