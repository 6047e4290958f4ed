"""Meta-device tensor surgery for streaming (``compress.streaming``): assigning read tensors,
freeing a module's storage back to meta shapes, dropping dense weights after a packed install,
and the upcast hooks that let 16-bit linears and embeddings compute in a wider dtype.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built inside get meta parameters but real buffers: what a config alone computes
    (rotary tables, Gemma's embedding scale) without the weights' memory (a parameter's CPU
    storage is created empty and dropped as it is registered, before anything writes it)."""
    register = nn.Module.register_parameter

    def on_meta(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(self, name, param)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


# -- materialising meta tensors -------------------------------------------------------------------
def _owner(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    mod_path, _, attr = name.rpartition(".")
    return (root.get_submodule(mod_path) if mod_path else root), attr


def _assign(root: nn.Module, name: str, t: torch.Tensor) -> None:
    mod, attr = _owner(root, name)
    if attr in mod._parameters:
        old = mod._parameters[attr]
        mod._parameters[attr] = nn.Parameter(t, requires_grad=old.requires_grad)
    else:
        mod._buffers[attr] = t


def _drop_storage(mod: nn.Module, buffers: bool = True) -> None:
    """Replaces ``mod``'s own tensors by meta tensors of the same shapes (frees their storage);
    ``buffers=False`` keeps its buffers (nothing would read a non-persistent one back)."""
    for store in (mod._parameters, mod._buffers) if buffers else (mod._parameters,):
        for k, t in list(store.items()):
            if t is not None and not t.is_meta:
                meta = torch.empty(t.shape, dtype=t.dtype, device="meta")
                store[k] = nn.Parameter(meta, requires_grad=False) if k in mod._parameters else meta


def drop_dense_after_install(install: Any, drop_results: bool = True) -> Any:
    """``install_fn`` that then frees what is dense of the linear it replaced: the replaced
    module's weight (when the install swapped the module, i.e. packed installs; merged installs
    keep their dense weight by design) and, with ``drop_results``, the result's dense weight
    view (``c.weight``, the dequantised weight ``canonicalize`` computed) when the quantised
    codes hold it (the resume state saves the codes; the engine keeps a block's results until
    the block is committed)."""

    def install_then_drop(block: nn.Module, name: str, linear: nn.Module, c: Any) -> None:
        install(block, name, linear, c)
        if drop_results and c.weight_q is not None and c.weight.numel():
            c.weight = c.weight.new_empty(0)
        if block.get_submodule(name) is not linear:
            _drop_storage(linear)

    return install_then_drop


_LOW = (torch.float16, torch.bfloat16)


def _upcast_weight(dtype: torch.dtype) -> tuple[Any, Any]:
    """Forward pre/post hooks that let a linear stored in 16 bits compute in ``dtype``: the
    weight is widened for the call (exactly: every 16-bit value is a ``dtype`` value) and the
    16-bit parameter put back after it, so only one layer's wide copy exists at a time."""

    def pre(mod: nn.Module, _args: tuple) -> None:
        low = mod._parameters["weight"]
        mod.__dict__["_slim_low_weight"] = low  # (plain attribute: not a registered parameter)
        mod._parameters["weight"] = nn.Parameter(low.detach().to(dtype), requires_grad=False)

    def post(mod: nn.Module, _args: tuple, _out: Any) -> None:
        mod._parameters["weight"] = mod.__dict__.pop("_slim_low_weight")

    return pre, post


def _upcast_output(dtype: torch.dtype) -> Any:
    def hook(_mod: nn.Module, _args: tuple, out: torch.Tensor) -> torch.Tensor:
        return out.to(dtype)

    return hook


def _tensor_names(root: nn.Module) -> tuple[list[str], list[str]]:
    """(parameters and persistent buffers, non-persistent buffers) of ``root``, by name."""
    saved, volatile = [n for n, _ in root.named_parameters()], []
    for n, _ in root.named_buffers():
        mod, attr = _owner(root, n)
        (volatile if attr in mod._non_persistent_buffers_set else saved).append(n)
    return saved, volatile
