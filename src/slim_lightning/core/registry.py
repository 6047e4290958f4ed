"""Registries of compression methods: the one place that lists what ``pruner.method``,
``quant.method`` and ``lowrank.method`` may be.

Each method registers itself next to its math with a decorator, so adding one is one function
plus one YAML file (``conf/pruner/<name>.yaml``, ``conf/quant/...``, ``conf/lowrank/...``):

* a **pruner** either scores weights (``score(w, stat) -> (d_out, d_in)`` importance; the mask
  keeps the highest scores in the sparsity pattern) or prunes and updates the kept weights itself
  (``prune(w, stats, sparsity, pruner, joint_quant, mask, info) -> (base, mask, qt | None)``, the
  SparseGPT/OBS protocol: ``qt`` is the quantised result when it quantised jointly), and declares
  whether it needs the input Hessian ``X^T X``;
* a **quantiser** maps ``(w, QuantSpec, stat, mask) -> (QuantTensor | None, alpha)`` (``alpha``:
  its fitted scalar, SLiM-Quant's clipping value or SpQR's ``tau``; nan when none); one that runs
  its own GPTQ pass (``needs_hessian``) also receives the layer's ``LayerStats`` as ``stats=``
  and may return a ``GroupQuant`` (``core.grouped``);
* an **adapter method** maps the channel statistic to the SVD weighting of the low-rank
  adapters (``None``: plain SVD).

Pure Python: no torch, lightning, hydra or transformers import here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Pruner:
    """A pruning method (exactly one of ``score`` and ``prune`` is set)."""

    name: str
    score: Callable[..., Any] | None = None
    prune: Callable[..., Any] | None = None
    needs_hessian: bool = False
    needs_stat: bool = False
    joint_quant: bool = False  # can quantise in the same pass (OPTQ-style)


@dataclass(frozen=True)
class Quantizer:
    """A weight quantiser: ``fn(w, spec, stat, mask[, stats=]) -> (QuantTensor | None, alpha)``.

    ``needs_hessian``: it reads ``LayerStats.hessian`` (passed as ``stats=``); ``needs_samples``:
    it also reads ``LayerStats.samples`` (a subset of the layer's real calibration inputs).
    """

    name: str
    fn: Callable[..., Any]
    needs_hessian: bool = False
    needs_samples: bool = False


@dataclass(frozen=True)
class AdapterMethod:
    """A low-rank adapter method: ``weights(stat, kind) -> saliency vector | None`` (None = no
    weighting); ``enabled`` False means no adapters at all."""

    name: str
    weights: Callable[..., Any] | None = None
    enabled: bool = True


class Registry(dict):
    """``name -> entry`` with a decorator and an error that lists what is allowed."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def add(self, entry: Any) -> Any:
        if entry.name in self:
            raise ValueError(f"{self.kind} {entry.name!r} is registered twice")
        self[entry.name] = entry
        return entry

    def get_entry(self, name: str) -> Any:
        if name not in self:
            raise ValueError(f"{self.kind}: got {name!r}; allowed: {', '.join(self)}")
        return self[name]


PRUNERS = Registry("pruner.method")
QUANTIZERS = Registry("quant.method")
ADAPTERS = Registry("lowrank.method")


def register_pruner(name: str, **kw: Any) -> Callable:
    """Decorator: ``@register_pruner("wanda", needs_stat=True)`` on a score function, or with
    ``kind="prune"`` on a weight-updating pruner."""

    def deco(fn: Callable) -> Callable:
        kind = kw.pop("kind", "score")
        PRUNERS.add(Pruner(name=name, **{kind: fn}, **kw))
        return fn

    return deco


def register_quantizer(name: str, **kw: Any) -> Callable:
    """Decorator for ``fn(w, spec, stat, mask) -> (QuantTensor | None, alpha)``; ``kw``:
    ``needs_hessian`` / ``needs_samples`` (see ``Quantizer``)."""

    def deco(fn: Callable) -> Callable:
        QUANTIZERS.add(Quantizer(name=name, fn=fn, **kw))
        return fn

    return deco


def register_adapter_method(name: str, enabled: bool = True) -> Callable:
    """Decorator for ``weights(stat, kind) -> saliency | None``."""

    def deco(fn: Callable | None) -> Callable | None:
        ADAPTERS.add(AdapterMethod(name=name, weights=fn, enabled=enabled))
        return fn

    return deco
