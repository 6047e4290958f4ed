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

import math
import tempfile
import time
from typing import Any

import torch
from torch import nn

from ..core.types import CompressedLinear
from ..io import fault_point
from ..models.arch import block_output, to_device
from .recon_linear import ReconLinear
from .recon_mask import MaskRefiner


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
    mask_group: int = 0,
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
        mask_group: ``reconstruct.mask=refine``: M of the N:M pattern (0: per-row counts).

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
    for v in views.values():  # (their values hold the codes now)
        v.release_codes()
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

    masks = _masks(views) if cfg.mask == "refine" else {}
    mask0 = {k: m.clone() for k, m in masks.items()}

    store = tempfile.TemporaryFile()  # the best epoch's state waits on disk, not in memory

    def snapshot() -> None:
        # grid values as their snapped int8 codes: after the restore only snap() reads them,
        # and it rounds and clamps the same way (1 byte per weight instead of 4)
        out = {}
        for i, p in enumerate(_all_params(views, norms)):
            r = grid.get(id(p))
            t = p.detach()
            out[str(i)] = torch.clamp(torch.round(t), *r).to(torch.int8) if r else t.clone()
        out.update({f"mask.{k}": m.clone() for k, m in masks.items()})  # (refined masks)
        store.seek(0)
        store.truncate()
        torch.save(out, store)

    try:
        before = held_out()
        best, best_epoch = before, 0
        snapshot()
        refiner = None
        steps = 0
        if param_groups and cfg.epochs > 0 and train:
            # (a refined mask remaps the moments of whole parameters)
            opt = _adam(param_groups, cfg.optimizer, split=cfg.mask != "refine")
            hooks = _step_in_backward(opt, param_groups)
            # cosine decay over all steps: large early moves, settling on the grid at the end
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.epochs * len(micro))
            if masks:
                refiner = MaskRefiner(
                    views,
                    {n: m.weight.detach() for n, m in originals.items()},
                    group=mask_group,
                    alpha=cfg.mask_alpha,
                    refines=cfg.mask_refines,
                    total_steps=cfg.epochs * len(micro),
                )
            with torch.enable_grad():
                for epoch in range(1, cfg.epochs + 1):
                    perm = torch.randperm(len(micro), generator=g).tolist()
                    for k in perm:
                        opt.zero_grad(set_to_none=True)
                        loss = loss_of(*micro[k])
                        if not math.isfinite(float(loss.detach())):
                            break
                        loss.backward()  # (each parameter steps as its gradient completes)
                        sched.step()
                        steps += 1
                        if refiner is not None and refiner.due(steps):
                            refiner.refine(opt)
                    fault_point(label)  # (a kill here resumes from the last committed block)
                    e = held_out()
                    if e < best:
                        best, best_epoch = e, epoch
                        snapshot()
            for h in hooks:
                h.remove()
            del opt, sched, hooks  # Adam's moments go before the dense views are rebuilt
        if refiner is not None:
            refiner.close()
        store.seek(0)
        best_state = torch.load(store, map_location=device, weights_only=True)
        _restore(_all_params(views, norms), best_state, masks)
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
        store.close()
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
    if masks:  # share of the kept positions the kept result moved, and the refinements run
        moved = sum(int((m & ~mask0[k]).sum()) for k, m in masks.items())
        report["recon_mask_moved"] = moved / max(1, sum(int(m.sum()) for m in mask0.values()))
        report["recon_mask_refines"] = float(refiner.done if refiner is not None else 0)
    for c in snapped.values():
        c.metrics.update(report)
    return snapped, trained_norms, report


def _restore(
    params: list[nn.Parameter], state: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]
) -> None:
    """Puts a snapshot back (gradients dropped: nothing reads them any more), with the masks
    it was taken under (``reconstruct.mask=refine``)."""
    for i, p in enumerate(params):
        p.grad = None
        p.data.copy_(state[str(i)])
    for k, m in masks.items():
        m.copy_(state[f"mask.{k}"])


def _masks(views: dict[str, ReconLinear]) -> dict[str, torch.Tensor]:
    """The masks ``reconstruct.mask=refine`` may change (grid-valued kept weights)."""
    return {n: v.wq.mask for n, v in views.items() if v.wq is not None and v.wq.mask is not None}


def _step_in_backward(opt: torch.optim.Optimizer, param_groups: list[dict]) -> list[Any]:
    """Hooks that take each parameter's optimiser step as soon as the backward has accumulated
    its gradient, then drop the gradient: one linear's gradient exists at a time instead of the
    whole block's (4 bytes per trained value). ``opt.step()`` skips parameters without a
    gradient and Adam is elementwise per parameter, so each parameter takes exactly the step a
    ``step()`` after the backward would (each parameter is used once per forward, and no later
    node of the backward reads a trained parameter: the grid linears save their own inputs).
    A parameter ``_adam`` split into parts steps as its parts (views of its gradient)."""
    parts = getattr(opt, "slim_parts", {})

    def hook(p: torch.Tensor) -> None:
        for part, lo, hi in parts.get(p, ()):
            part.grad = p.grad.view(-1)[lo:hi]
        opt.step()
        for part, _, _ in parts.get(p, ()):
            part.grad = None
        p.grad = None

    return [p.register_post_accumulate_grad_hook(hook) for g in param_groups for p in g["params"]]


#: values per part of a parameter bitsandbytes' 8-bit Adam steps (a multiple of its 256-value
#: quantisation blocks; its CPU step works on fp32 copies of a tensor's state: ~20 bytes per
#: value of the tensor stepped)
PART = 1 << 20


def _adam(
    param_groups: list[dict], kind: str = "adam", split: bool = True
) -> torch.optim.Optimizer:
    """Adam with its fused kernel (one pass per parameter instead of about ten elementwise
    operations: 10% of a block's reconstruction time on CPU), the default one where the
    device has none; ``adam8bit``: bitsandbytes' 8-bit Adam (tensors under 4096 values keep
    32-bit moments, as bitsandbytes does by default), each parameter of more than ``PART``
    values (``split``) stepped as parts that view its data (``slim_parts``: the same blockwise
    state and steps, a part's fp32 work at a time)."""
    if kind == "adam8bit":
        import bitsandbytes as bnb

        parts: dict[torch.Tensor, list] = {}
        groups = []
        for g in param_groups:
            ps = []
            for p in g["params"]:
                n = p.numel()
                if not split or n <= PART:
                    ps.append(p)
                    continue
                # (a last part under 4096 values joins the one before: 8-bit state throughout)
                cuts = [lo for lo in range(0, n, PART) if lo == 0 or n - lo >= 4096] + [n]
                flat = p.data.view(-1)
                parts[p] = [(nn.Parameter(flat[lo:hi]), lo, hi) for lo, hi in zip(cuts, cuts[1:])]
                ps += [part for part, _, _ in parts[p]]
            groups.append({**g, "params": ps})
        opt = bnb.optim.Adam8bit(groups)
        opt.slim_parts = parts
        return opt
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
