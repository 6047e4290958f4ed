"""Model-wide runtime switches for ``SLiMLinear`` layers: the forward backend and the dense cache.

``set_backend(model, "reference" | "triton" | "auto")`` and ``set_dense_cache(model, on)`` walk a
module tree and set every ``SLiMLinear``'s ``backend`` / ``cache_dense``; ``held_bytes`` counts
what a model holds, caches included.
"""

from __future__ import annotations

import torch
from torch import nn

from .linear import SLiMLinear


def set_dense_cache(model: nn.Module, on: bool) -> int:
    """Turns the reference backend's dense-weight cache on or off for every ``SLiMLinear``.

    On trades memory (a dense copy of every layer, per dtype) for CPU speed; off (the default)
    frees the copies. Returns the number of layers.
    """
    n = 0
    for mod in model.modules():
        if isinstance(mod, SLiMLinear):
            mod.cache_dense = bool(on)
            if not on:
                mod._dense_cache = {}
            n += 1
    return n


def set_backend(model: nn.Module, name: str, *, strict: bool = True) -> int:
    """Sets ``backend`` on every ``SLiMLinear`` in ``model``.

    Args:
        model: any module tree.
        name: ``reference``, ``triton`` or ``auto`` (triton on CUDA for every layer the kernels
            support, reference elsewhere; never raises for unsupported layers).
        strict: with ``triton``, raise if a layer's format has no kernel; with False such layers
            stay on ``reference``.

    Returns:
        Number of layers switched to ``name`` (to triton, for ``auto``).
    """
    if name == "auto":
        on_cuda = any(
            b.is_cuda for m in model.modules() if isinstance(m, SLiMLinear) for b in m.buffers()
        )
        if not on_cuda:
            set_backend(model, "reference")
            return 0
        return set_backend(model, "triton", strict=False)
    if name not in ("reference", "triton"):
        raise ValueError(f"backend: got {name!r}; allowed: reference, triton, auto")
    layers = [(k, v) for k, v in model.named_modules() if isinstance(v, SLiMLinear)]
    unsupported: dict[str, str] = {}
    if name == "triton":
        from ..kernels.ops import triton_unsupported_reason

        for mod_name, mod in layers:
            why = triton_unsupported_reason(mod)
            if why is not None:
                unsupported[mod_name] = why
        if unsupported and strict:
            raise ValueError(
                "triton backend unsupported for: "
                + "; ".join(f"{k or '<root>'}: {v}" for k, v in unsupported.items())
            )
    for mod_name, mod in layers:
        mod.backend = "reference" if mod_name in unsupported else name
    return len(layers) - len(unsupported)


def held_bytes(model: torch.nn.Module) -> int:
    """Bytes of parameters, buffers and SLiMLinear caches (each storage once)."""
    from .linear import SLiMLinear

    seen, total = set(), 0
    tensors = [*model.parameters(), *model.buffers()]
    for m in model.modules():
        if isinstance(m, SLiMLinear):
            for cache in (m._dense_cache, m._adapter_cache, m._kernel_cache):
                for v in cache.values():
                    vs = v if isinstance(v, (tuple, list)) else (v,)
                    tensors += [t for t in vs if torch.is_tensor(t)]
    for t in tensors:
        key = t.untyped_storage().data_ptr()
        if key not in seen and t.device.type != "meta":
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total
