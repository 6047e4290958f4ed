"""Free channel permutations before N:M pruning (``lowrank.permute=true``).

An N:M pattern keeps N of every M consecutive input channels of a row, so which channels share a
group matters (RIA, Zhang et al. 2024). Some input orders are free to change: a linear whose input
is produced channel by channel by other linears of the block through elementwise operations can
take its inputs in any order when the producers' output rows move the same way. Two such pairs:

* the MLP: ``down_proj`` reads ``act(gate_proj x) * up_proj x`` (``fc2`` reads ``act(fc1 x)``,
  ``dense_4h_to_h`` reads ``act(dense_h_to_4h x)``, ``c_proj`` reads ``act(c_fc x)``): permute
  the producers' rows and the consumer's columns (a fused ``gate_up_proj`` moves both halves);
* attention: ``o_proj`` reads the heads' ``softmax(q k^T) v`` concatenated: within a head the
  value channels can be permuted (rows of ``v_proj``; no rotary embedding on values), the same way
  for every query head that reads that key-value head.

The permutation places the channels round-robin in order of their Wanda importance
``sum_i |W_ij| rms(x_j)`` (each group gets one channel of every importance quantile) and is kept
only when it raises the importance the N:M pattern retains. It is applied to the dense block
after its statistics are collected and before any linear is compressed (the consumer's
statistics are permuted with it): the compressed model computes the same function with
different weights, nothing to gather at run time. Every permutation is checked on a calibration
batch (block output unchanged up to float summation order) and undone when it is not
function-preserving, so a structure these rules misread is left as it was.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

# consumer -> producers (siblings in the same parent module)
MLP_PAIRS = {
    "down_proj": ("gate_proj", "up_proj"),
    "fc2": ("fc1",),
    "dense_4h_to_h": ("dense_h_to_4h",),
    "c_proj": ("c_fc",),
}
FUSED = {"down_proj": "gate_up_proj"}  # Phi-3: [gate; up] rows in one linear
TOL = 1e-4  # relative change of the block output a permutation may cause (summation order)


def check_permute(spec: Any) -> None:
    """``lowrank.permute=true`` only changes N:M groups: refused for other patterns (``auto``
    turns itself off there)."""
    if spec.lowrank.permute is True and spec.sparsity.pattern != "nm":
        from ..errors import ConfigError

        raise ConfigError(
            "lowrank.permute",
            True,
            f"false with sparsity pattern {spec.sparsity.pattern!r} "
            "(a permutation only regroups N:M groups)",
        )


def round_robin(imp: torch.Tensor, m: int) -> torch.Tensor:
    """The permutation ``p`` (new channel k reads old channel ``p[k]``) that deals the channels,
    most important first, to the ``len / m`` groups in turn."""
    d = imp.numel()
    g = d // m
    order = imp.argsort(descending=True, stable=True)
    k = torch.arange(d)
    p = torch.empty(d, dtype=torch.long)
    p[(k % g) * m + k // g] = order
    return p


def retained(w: torch.Tensor, rms: torch.Tensor, n: int, m: int) -> float:
    """Wanda importance the N:M pattern keeps (top N of every M, per row)."""
    s = w.abs() * rms[None, :]
    return float(s.reshape(s.shape[0], -1, m).topk(n, dim=-1).values.sum())


def plan_permutations(
    lin: dict[str, nn.Linear], hooks: dict[str, Any], block: nn.Module, n: int, m: int
) -> list[tuple[str, list[tuple[str, int]], torch.Tensor]]:
    """``(consumer, [(producer, row offset)], permutation)`` for each free pair that gains."""
    out = []
    for name, lin_c in lin.items():
        parent, _, leaf = name.rpartition(".")
        pre = f"{parent}." if parent else ""
        h = hooks.get(name)
        if h is None or lin_c.in_features % m or h.leader is not None:
            continue
        rms = (h.sq / max(h.n, 1)).sqrt()
        w = lin_c.weight.detach().float()
        producers = _producers(lin, pre, leaf, lin_c.in_features)
        p = None
        if producers:
            p = round_robin((w.abs() * rms[None, :]).sum(0), m)
        elif leaf == "o_proj" and f"{pre}v_proj" in lin and hooks.get(f"{pre}v_proj") is not None:
            p = _head_perm(block, pre, lin, w, rms, m)
            producers = [(f"{pre}v_proj", 0)]
        if p is None:
            continue
        cols = p[0] if p.ndim == 2 else p
        if retained(w[:, cols], rms[cols], n, m) > retained(w, rms, n, m):
            out.append((name, producers, p))
    return out


def _producers(lin: dict, pre: str, leaf: str, d: int) -> list[tuple[str, int]]:
    names = [f"{pre}{x}" for x in MLP_PAIRS.get(leaf, ())]
    if names and all(x in lin and lin[x].out_features == d for x in names):
        return [(x, 0) for x in names]
    fused = f"{pre}{FUSED.get(leaf, '')}"
    if leaf in FUSED and fused in lin and lin[fused].out_features == 2 * d:
        return [(fused, 0), (fused, d)]
    return []


def _head_perm(block, pre, lin, w, rms, m) -> torch.Tensor | None:
    """One round-robin permutation per key-value head of the value channels, shared by the
    query heads that read it (``repeat_kv``: query head h reads key-value head h // groups)."""
    attn = block.get_submodule(pre[:-1]) if pre else block
    hd = getattr(attn, "head_dim", None)
    v = lin[f"{pre}v_proj"]
    if not isinstance(hd, int) or hd % m or v.out_features % hd or w.shape[1] % hd:
        return None
    nkv, nq = v.out_features // hd, w.shape[1] // hd
    if nq % nkv:
        return None
    groups = nq // nkv
    imp = (w.abs() * rms[None, :]).sum(0).reshape(nkv, groups, hd).sum(1)
    per_kv = [round_robin(imp[k], m) for k in range(nkv)]
    q_perm = torch.cat([h * hd + per_kv[h // groups] for h in range(nq)])
    v_perm = torch.cat([k * hd + per_kv[k] for k in range(nkv)])
    return torch.stack([q_perm, torch.cat([v_perm, v_perm.new_full((nq * hd - nkv * hd,), -1)])])


def permute_block(
    engine: Any, block: nn.Module, lin: dict, hooks: dict, inputs: list, kwargs: list
) -> set[str]:
    """``lowrank.permute``: plans and applies the free permutations of block ``block`` (its
    statistics collected, nothing compressed yet); returns the consumers permuted."""
    spec = engine.spec
    if spec.lowrank.permute is False or spec.sparsity.pattern != "nm" or not inputs:
        return set()
    plans = plan_permutations(lin, hooks, block, spec.sparsity.n, spec.sparsity.m)
    return set(
        apply_permutations(
            plans, lin, hooks, lambda: engine.run_block(block, inputs[:1], kwargs[:1])[0].float()
        )
    )


def apply_permutations(
    plans: list,
    lin: dict[str, nn.Linear],
    hooks: dict[str, Any],
    check: Callable[[], torch.Tensor],
) -> list[str]:
    """Permutes the dense weights and the consumers' statistics in place; undoes any that
    changes ``check()`` (the block's output on a calibration batch). Returns the consumers
    permuted."""
    done: list[str] = []
    if not plans:
        return done
    before = check()
    for name, producers, p in plans:
        _permute(lin, hooks, name, producers, p, inverse=False)
        after = check()
        rel = float((after - before).norm() / before.norm().clamp_min(1e-30))
        if rel > TOL or not bool(torch.isfinite(after).all()):
            _permute(lin, hooks, name, producers, p, inverse=True)
            log.warning("lowrank.permute: %s left as it was (output changed by %.2g)", name, rel)
            continue
        done.append(name)
    return done


def _inv(p: torch.Tensor) -> torch.Tensor:
    return torch.argsort(p)


@torch.no_grad()
def _permute(lin, hooks, name, producers, p, *, inverse: bool) -> None:
    """Applies (or, ``inverse``, undoes) permutation ``p`` to the consumer's columns and
    statistics and to the producers' rows."""
    cols = p[0] if p.ndim == 2 else p  # consumer's input order
    rows = p[1][p[1] >= 0] if p.ndim == 2 else p  # the producers' output order
    if inverse:
        cols, rows = _inv(cols), _inv(rows)
    cons, h = lin[name], hooks[name]
    cons.weight.data = cons.weight.data[:, cols].contiguous()
    h.sq, h.ab = h.sq[cols], h.ab[cols]
    if h.h is not None:
        rows_done = h.h.index_select(0, cols)
        if any(o is not h and o.h is h.h for o in hooks.values()):  # (shared: a new tensor)
            h.h = rows_done.index_select(1, cols)
        else:  # written back into its own storage: one (d, d) copy at a time, not two
            torch.index_select(rows_done, 1, cols, out=h.h)
        del rows_done
    h.rows = [r[:, cols] for r in h.rows]
    for prod, off in producers:
        mod = lin[prod]
        idx = torch.arange(mod.out_features)
        idx[off : off + rows.numel()] = off + rows
        for t in (mod.weight, mod.bias):
            if t is not None:
                t.data = t.data[idx].contiguous()
