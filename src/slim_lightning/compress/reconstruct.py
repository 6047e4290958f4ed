"""Block-wise reconstruction: after a block's linears are compressed one-shot, train what the
packed format can still change so the block's output matches the dense model's.

What trains (each a switch of ``reconstruct.*``): the kept weights as real values ``v`` in grid
units whose forward is ``round(v)`` clamped to the b-bit range (straight-through estimator: the
mask never changes, the values end exactly on the grid), the group scales (as ``s0 * exp(u)``),
both adapter factors through the same 4-bit STE (or as fp values when the adapters are not
quantised) and the block's norm gains. Adam with one learning rate per group, the engine's
calibration batches split into training and held-out batches (``holdout``), a few epochs, the
best held-out epoch kept (epoch 0 is the one-shot result, so the held-out error never rises).

The target is the dense block on the dense path's inputs (the drift of earlier blocks is
corrected), optionally mixed with the dense block on the compressed inputs (``target_mix``); the
loss is scale-free, ``||t - y||^2 / ||t||^2`` per batch. Everything is seeded and runs in one
process on the batches given (a distributed run gathers every batch first, so each rank trains
the same block the same way).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import torch
from torch import nn

from ..core.types import CompressedLinear, QuantTensor, group_sums, scale_groups_
from ..formats.bitpack import _lossless_dtype
from ..io import fault_point
from ..models.arch import block_output, to_device
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
    backward. The same products as the composed graph ``x @ _GridValue(...).T``."""

    @staticmethod
    def forward(ctx, x, v, scale, in_scale, mask, lo: int, hi: int, group: int):
        w = scale_groups_(_codes(v, mask, lo, hi), scale, group, in_scale)
        ctx.save_for_backward(x, v, scale, in_scale, mask)
        ctx.grid = (lo, hi, group)
        return x @ w.T

    @staticmethod
    def backward(ctx, gy: torch.Tensor):
        x, v, scale, in_scale, mask = ctx.saved_tensors
        lo, hi, group = ctx.grid
        need = ctx.needs_input_grad
        gx = grad_v = grad_s = None
        if need[0]:
            w = scale_groups_(_codes(v, mask, lo, hi), scale, group, in_scale)
            gx = gy @ w
            del w
        if need[1] or need[2]:
            gw = gy.reshape(-1, gy.shape[-1]).T.mm(x.reshape(-1, x.shape[-1]))
            grad_v, grad_s = _grid_grads(gw, v, scale, in_scale, mask, ctx.grid, need[1], need[2])
        return gx, grad_v, grad_s, None, None, None, None, None


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
            x, self.v, self.scale(), self.in_scale, self.mask, self.lo, self.hi, self.group
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
        if c.weight_q is not None:
            self.wq = _QuantParam(c.weight_q, mask, cfg.train_weights, cfg.train_scales)
        else:
            self.w = nn.Parameter(c.weight.float().clone(), requires_grad=cfg.train_weights)
            self.mask = mask
        self.lq = self.rq = self.l = self.r = None
        if c.lora_l_q is not None and c.lora_r_q is not None:
            self.lq = _QuantParam(c.lora_l_q, None, cfg.train_adapters, cfg.train_scales)
            self.rq = _QuantParam(c.lora_r_q, None, cfg.train_adapters, cfg.train_scales)
        elif c.lora_l is not None and c.lora_r is not None:
            self.l = nn.Parameter(c.lora_l.float().clone(), requires_grad=cfg.train_adapters)
            self.r = nn.Parameter(c.lora_r.float().clone(), requires_grad=cfg.train_adapters)

    def weight_value(self) -> torch.Tensor:
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
        else:
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
        else:
            out.weight = self.weight_value().detach().clone()
        if self.lq is not None:
            out.lora_l_q, out.lora_r_q = self.lq.snap(), self.rq.snap()
        elif self.l is not None:
            out.lora_l, out.lora_r = self.l.detach().clone(), self.r.detach().clone()
        return canonicalize(out, dense_views)


def norm_params(block: nn.Module) -> dict[str, nn.Parameter]:
    """The block's norm gains (1-d weights of modules whose class name says norm)."""
    out = {}
    for mname, mod in block.named_modules():
        if "norm" in type(mod).__name__.lower():
            for pname, p in mod.named_parameters(recurse=False):
                if p.ndim == 1:
                    out[f"{mname}.{pname}" if mname else pname] = p
    return out


def rel_err(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    t, y = t.float(), y.float()
    return ((t - y) ** 2).sum() / (t * t).sum().clamp_min(1e-30)


def reconstruct_block(
    block: nn.Module,
    lin: dict[str, nn.Linear],
    results: dict[str, CompressedLinear],
    inputs: list[torch.Tensor],
    kwargs: list[dict],
    targets: list[torch.Tensor],
    cfg: Any,
    *,
    seed: int,
    device: torch.device,
    norm_dtype: torch.dtype = torch.float32,
    targets_c: list[torch.Tensor] | None = None,
    label: str = "reconstruct",
    dense_views: bool = True,
) -> tuple[dict[str, CompressedLinear], dict[str, torch.Tensor], dict[str, float]]:
    """Trains block ``block`` (its linears still dense, their one-shot ``results`` given).

    Args:
        inputs / kwargs: every calibration batch's compressed-path input and block kwargs.
        targets: the dense block's output on the dense path, per batch.
        targets_c: the dense block's output on ``inputs`` (used when ``cfg.target_mix > 0``).
        norm_dtype: trained norm gains are rounded to it (the export dtype of uncompressed
            tensors), so the run evaluates what the checkpoint stores.
        dense_views: rebuild each quantised weight's dense fp32 view (else it is left on the
            meta device: 4 bytes per weight the packed install does not read).

    Returns:
        The snapped results, the trained norm gains (empty when frozen or unchanged) and a
        report: held-out error before / after, best epoch, seconds.
    """
    t0 = time.perf_counter()
    n = len(inputs)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=g).tolist()
    n_hold = max(1, round(n * cfg.holdout)) if n > 1 else 0
    hold, train = sorted(order[:n_hold]), sorted(order[n_hold:])
    if not hold:  # one batch: it is both (early stopping cannot help)
        hold = train
    for c in results.values():  # the codes hold them: snap() recomputes them (canonicalize)
        if c.weight_q is not None:
            c.weight = c.weight.new_empty(0)
    views = {name: ReconLinear(results[name], lin[name].bias, cfg).to(device) for name in lin}
    grid = {
        id(q.v): (q.lo, q.hi) for v in views.values() for q in (v.wq, v.lq, v.rq) if q is not None
    }
    norms = norm_params(block) if cfg.train_norms else {}
    frozen = {p: p.requires_grad for p in block.parameters()}
    for p in block.parameters():
        p.requires_grad_(False)
    norm0 = {k: p.detach().clone() for k, p in norms.items()}
    for p in norms.values():
        p.requires_grad_(True)
    groups: dict[str, list[nn.Parameter]] = {"weight": [], "scale": [], "adapter": []}
    for v in views.values():
        for k, ps in v.param_groups().items():
            groups[k] += ps
    groups["norm"] = list(norms.values())
    lrs = {
        "weight": cfg.lr_weight,
        "scale": cfg.lr_scale,
        "adapter": cfg.lr_adapter,
        "norm": cfg.lr_norm,
    }
    param_groups = [{"params": ps, "lr": lrs[k]} for k, ps in groups.items() if ps and lrs[k] > 0]
    originals = {name: lin[name] for name in lin}
    for name, v in views.items():
        block.set_submodule(name, v)
    mix = float(cfg.target_mix)

    # training steps: each training batch in slices of ``batch_windows`` windows
    per = cfg.batch_windows
    micro = [
        (b, lo, min(lo + per, inputs[b].shape[0]) if per else inputs[b].shape[0])
        for b in train
        for lo in (range(0, inputs[b].shape[0], per) if per else (0,))
    ]

    def loss_of(b: int, lo: int, hi: int) -> torch.Tensor:
        n_b = inputs[b].shape[0]
        y = _out(block, inputs[b][lo:hi], _rows(kwargs[b], n_b, lo, hi), device)
        loss = rel_err(targets[b][lo:hi].to(device), y)
        if mix > 0 and targets_c is not None:
            loss = (1 - mix) * loss + mix * rel_err(targets_c[b][lo:hi].to(device), y)
        return loss

    def held_out() -> float:
        with torch.no_grad():
            for v in views.values():
                v.eval()
            e = sum(
                float(rel_err(targets[b].to(device), _out(block, inputs[b], kwargs[b], device)))
                for b in hold
            ) / len(hold)
            for v in views.values():
                v.train()
        return e

    def snapshot() -> dict[str, torch.Tensor]:
        # grid values as their snapped int8 codes: after the restore only snap() reads them,
        # and it rounds and clamps the same way (1 byte per weight instead of 4)
        out = {}
        for i, p in enumerate(_all_params(views, norms)):
            r = grid.get(id(p))
            t = p.detach()
            out[str(i)] = torch.clamp(torch.round(t), *r).to(torch.int8) if r else t.clone()
        return out

    try:
        before = held_out()
        best, best_epoch, best_state = before, 0, snapshot()
        steps = 0
        if param_groups and cfg.epochs > 0 and train:
            opt = _adam(param_groups)
            # cosine decay over all steps: large early moves, settling on the grid at the end
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.epochs * len(micro))
            with torch.enable_grad():
                for epoch in range(1, cfg.epochs + 1):
                    perm = torch.randperm(len(micro), generator=g).tolist()
                    for k in perm:
                        opt.zero_grad(set_to_none=True)
                        loss = loss_of(*micro[k])
                        if not math.isfinite(float(loss.detach())):
                            break
                        loss.backward()
                        opt.step()
                        sched.step()
                        steps += 1
                    fault_point(label)  # (a kill here resumes from the last committed block)
                    e = held_out()
                    if e < best:
                        best_state = None  # (one snapshot at a time)
                        best, best_epoch, best_state = e, epoch, snapshot()
            del opt, sched  # Adam's moments go before the dense views are rebuilt
        _restore(_all_params(views, norms), best_state)
        best_state = None
        param_groups.clear()
        groups.clear()
        snapped = {}
        for name in list(views):  # each view's training state goes once it is snapped
            view = views.pop(name)
            block.set_submodule(name, originals[name])
            snapped[name] = view.eval().snap(dense_views)
            del view
        trained_norms = {}
        with torch.no_grad():
            for k, p in norms.items():
                p.data.copy_(p.data.to(norm_dtype).to(p.dtype))
                if not torch.equal(p.data, norm0[k]):
                    trained_norms[k] = p.detach().to("cpu").clone()
    finally:
        for name, m in originals.items():
            block.set_submodule(name, m)
        for p, req in frozen.items():
            p.requires_grad_(req)
    report = {
        "recon_err_before": before,
        "recon_err_after": best,
        "recon_best_epoch": float(best_epoch),
        "recon_steps": float(steps),
        "recon_s": time.perf_counter() - t0,
    }
    for c in snapped.values():
        c.metrics.update(report)
    return snapped, trained_norms, report


def _restore(params: list[nn.Parameter], state: dict[str, torch.Tensor]) -> None:
    """Puts a snapshot back (gradients dropped: nothing reads them any more)."""
    for p, saved in zip(params, state.values()):
        p.grad = None
        p.data.copy_(saved)


def _adam(param_groups: list[dict]) -> torch.optim.Optimizer:
    """Adam with its fused kernel (one pass per parameter instead of about ten elementwise
    operations: 10% of a block's reconstruction time on CPU), the default one where the
    device has none."""
    try:
        return torch.optim.Adam(param_groups, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.Adam(param_groups)


def _rows(obj: Any, n: int, lo: int, hi: int) -> Any:
    """Rows ``lo:hi`` of every tensor in a block's kwargs whose first dimension is the batch
    (``n``); others (broadcast rotary tables, None, flags) as they are."""
    if isinstance(obj, torch.Tensor):
        return obj[lo:hi] if obj.ndim and obj.shape[0] == n and n > 1 else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_rows(o, n, lo, hi) for o in obj)
    if isinstance(obj, dict):
        return {k: _rows(v, n, lo, hi) for k, v in obj.items()}
    return obj


def _out(block: nn.Module, x: torch.Tensor, kw: dict, device: torch.device) -> torch.Tensor:
    return block_output(block(x.to(device), **to_device(kw, device)))


def _all_params(views: dict[str, ReconLinear], norms: dict[str, nn.Parameter]) -> list:
    ps = [p for v in views.values() for p in v.parameters()]
    return ps + list(norms.values())
