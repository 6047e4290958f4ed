"""What the layer-wise engine needs from a model: its decoder blocks and their linears.

``get_arch`` finds them from the model itself (``models.discover``: transformers' metadata and
the repeated block list, no per-family code), after turning fused mixture-of-experts weights
into per-expert linears (``models.experts``). ``linear_shapes`` reads the block linears' shapes
off a config alone (meta device, no weights). ``capture_block_inputs`` records what the model's
own forward hands each block (its own masks, position embeddings and keyword arguments).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .discover import OVERRIDES, UnsupportedArchitecture, block_linear_names, find_blocks_path


@dataclass(frozen=True)
class ArchSpec:
    """Where one model keeps what the layer-wise engine needs (dotted module paths).

    Attributes:
        model_type: ``model.config.model_type`` (informational).
        blocks_path: the ``nn.ModuleList`` of decoder blocks, e.g. ``model.layers``.
        linear_names: the compressible linears inside one block, in module order.
        input_groups: linears known to be fed the very same input tensor (one X^T X between
            them); empty when unknown: the engine observes the sharing itself while it runs a
            block, and memory estimates then count one X^T X per linear (an upper bound).
    """

    model_type: str
    blocks_path: str
    linear_names: tuple[str, ...]
    input_groups: tuple[tuple[str, ...], ...] = ()


def get_module(model: nn.Module, path: str | None) -> nn.Module | None:
    """Returns the submodule at dotted ``path`` or None when it is absent (or set to None)."""
    if path is None:
        return None
    mod: Any = model
    for part in path.split("."):
        mod = getattr(mod, part, None)
        if mod is None:
            return None
    return mod


def get_arch(model: nn.Module, arch: str = "auto", ignore: tuple[str, ...] = ()) -> ArchSpec:
    """Where ``model`` keeps its decoder blocks and compressible linears (found, not looked up).

    Fused mixture-of-experts weights are first replaced by per-expert ``nn.Linear`` modules in
    place (``experts.unfuse_experts``: the same function, bit for bit). ``arch`` names an entry
    of ``discover.OVERRIDES`` (``auto``: the model's own ``model_type`` when it has one);
    ``ignore`` adds fnmatch patterns of linears (names inside a block) left uncompressed.

    Raises:
        UnsupportedArchitecture: (a ``ValueError``) naming what was not understood.
    """
    from .experts import unfuse_experts

    model_type = str(getattr(getattr(model, "config", None), "model_type", None))
    key = model_type if arch == "auto" else arch
    if arch != "auto" and arch not in OVERRIDES:
        raise UnsupportedArchitecture(
            f"model.arch={arch!r}: allowed: auto{''.join(', ' + k for k in sorted(OVERRIDES))}"
        )
    try:
        unfuse_experts(model)
    except ValueError as e:
        raise UnsupportedArchitecture(str(e)) from None
    fields = dict(OVERRIDES.get(key, {}))
    path = fields.pop("blocks_path", None) or find_blocks_path(model)
    blocks = get_module(model, path)
    if not isinstance(blocks, nn.ModuleList):
        raise UnsupportedArchitecture(f"{type(model).__name__} has no ModuleList at {path!r}")
    names = fields.pop("linear_names", None) or block_linear_names(
        blocks, tuple(ignore), where=f"{type(model).__name__} ({model_type})"
    )
    return ArchSpec(model_type=model_type, blocks_path=path, linear_names=tuple(names), **fields)


def get_blocks(model: nn.Module, arch: ArchSpec) -> nn.ModuleList:
    """The decoder blocks of ``model``, in order."""
    blocks = get_module(model, arch.blocks_path)
    if not isinstance(blocks, nn.ModuleList):
        raise ValueError(f"{type(model).__name__} has no ModuleList at {arch.blocks_path!r}")
    return blocks


def block_linears(block: nn.Module, arch: ArchSpec) -> dict[str, nn.Module]:
    """``{name: linear}`` for the compressible linears of one block, in ``arch`` order
    (``nn.Linear``, or ``SLiMLinear`` once compressed)."""
    from ..nn.linear import SLiMLinear

    out = {}
    for name in arch.linear_names:
        mod = get_module(block, name)
        if not isinstance(mod, (nn.Linear, SLiMLinear)):
            raise ValueError(f"block has no nn.Linear at {name!r} (got {type(mod).__name__})")
        out[name] = mod
    return out


def meta_model(config: Any, trust_remote_code: bool = False) -> nn.Module:
    """The causal LM of ``config`` on the meta device (structure only, no weights)."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def arch_of_config(
    config: Any, arch: str = "auto", ignore: tuple[str, ...] = (), trust_remote_code: bool = False
) -> ArchSpec:
    """``get_arch`` of the model ``config`` describes, before any weight is read."""
    return get_arch(meta_model(config, trust_remote_code), arch, ignore)


def linear_shapes(model: nn.Module, arch: ArchSpec) -> dict[str, tuple[int, int]]:
    """``{dotted name of every block linear: (d_out, d_in)}`` of ``model`` (a meta build from
    ``meta_model`` serves: no weights are read) as ``get_arch`` found it.

    Names are full paths (``<blocks_path>.<i>.<linear>``).
    """
    out = {}
    for i, block in enumerate(get_blocks(model, arch)):
        for name, lin in block_linears(block, arch).items():
            out[f"{arch.blocks_path}.{i}.{name}"] = (lin.out_features, lin.in_features)
    return out


class _StopForward(Exception):
    """Raised once the last block's arguments are recorded (nothing after it needs to run)."""


_CACHE_KEYS = ("past_key_value", "past_key_values", "cache", "layer_past")


class PerBlock(list):
    """One batch's keyword arguments for every block (``kw[i]`` is block ``i``'s), as the
    model's own forward hands them out: Gemma 3's sliding-window and global layers get
    different masks and rotary tables. Blocks that get the very same arguments share one dict.
    """


def block_kwargs(kwargs: list[Any], i: int) -> list[dict[str, Any]]:
    """Block ``i``'s keyword arguments for each batch (``PerBlock`` or one shared dict)."""
    return [kw[i] if isinstance(kw, PerBlock) else kw for kw in kwargs]


def to_device(obj: Any, device: torch.device | str, memo: dict[int, Any] | None = None) -> Any:
    """Moves every tensor inside nested tuples/lists/dicts to ``device``; with ``memo``, an
    object met twice (the arguments every block shares) is moved once."""
    if memo is not None and id(obj) in memo:
        return memo[id(obj)]
    if isinstance(obj, torch.Tensor):
        out: Any = obj.to(device)
    elif isinstance(obj, PerBlock):
        out = PerBlock(to_device(o, device, memo) for o in obj)
    elif isinstance(obj, tuple):
        out = tuple(to_device(o, device, memo) for o in obj)
    elif isinstance(obj, list):
        out = [to_device(o, device, memo) for o in obj]
    elif isinstance(obj, dict):
        out = {k: to_device(v, device, memo) for k, v in obj.items()}
    else:
        return obj
    if memo is not None:
        memo[id(obj)] = out
    return out


class _Recorder(nn.Module):
    """Stands in for block ``i`` during capture: records its arguments and hands the hidden
    states on unchanged (the arguments never depend on them); attributes the model's loop reads
    off a block (e.g. ``attention_type``) come from the real block."""

    def __init__(self, block: nn.Module, i: int, last: bool, sink: list) -> None:
        super().__init__()
        object.__setattr__(self, "_block", block)  # not a child: no parameters, no state
        self._i, self._last, self._sink = i, last, sink

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_block"), name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        if len(args) > 1:
            raise ValueError(
                f"{type(self._block).__name__} is called with {len(args) - 1} positional "
                "argument(s) besides the hidden states: this block interface is not supported"
            )
        kw = {k: v for k, v in kwargs.items() if k not in _CACHE_KEYS}
        self._sink.append((hidden.detach(), kw))
        if self._last:
            raise _StopForward
        return hidden


def _same_args(a: dict[str, Any], b: dict[str, Any]) -> bool:
    if a.keys() != b.keys():
        return False
    for k, v in a.items():
        w = b[k]
        if isinstance(v, torch.Tensor) or isinstance(w, torch.Tensor):
            if v is not w:
                return False
        elif isinstance(v, (tuple, list)) and isinstance(w, (tuple, list)):
            if len(v) != len(w) or any(x is not y for x, y in zip(v, w)):
                return False
        elif v is not w and v != w:
            return False
    return True


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, blocks: nn.Module, ids: torch.Tensor, batch_size: int
) -> tuple[list[torch.Tensor], list[Any]]:
    """Runs the model's own forward up to its decoder blocks, for each batch, and records what
    it hands each block; no block runs (each is replaced by a recorder meanwhile).

    Args:
        blocks: the decoder ``nn.ModuleList`` (or, for a model with one call site, the first
            block alone: its arguments then serve every block).
        ids: int64 ``(n_samples, seqlen)`` calibration token ids.

    Returns:
        Per batch: the hidden states entering block 0, ``(b, seqlen, hidden)``, and the keyword
        arguments of the blocks: a ``PerBlock`` list (one dict per block; consecutive blocks
        given identical arguments share one dict) or, for a single block, its dict.
    """
    single = not isinstance(blocks, nn.ModuleList)
    seq: nn.ModuleList = nn.ModuleList([blocks]) if single else blocks
    inputs: list[torch.Tensor] = []
    kwargs_list: list[Any] = []
    sink: list[tuple[torch.Tensor, dict[str, Any]]] = []
    n = len(seq)
    originals = list(seq)
    handle = None
    if single:  # the block's own pre-hook: the block may sit in no ModuleList we can swap
        rec = _Recorder(blocks, 0, True, sink)
        handle = blocks.register_forward_pre_hook(lambda _m, a, k: rec(*a, **k), with_kwargs=True)
    else:
        for i, b in enumerate(originals):
            seq[i] = _Recorder(b, i, i == n - 1, sink)
    try:
        # the device of the first tensor that holds data: a streaming model's blocks wait on
        # the meta device, and a quantised embedding holds buffers, not parameters
        dev = next(
            (t.device for t in (*model.parameters(), *model.buffers()) if not t.is_meta),
            torch.device("cpu"),
        )
        for start in range(0, ids.shape[0], batch_size):
            sink.clear()
            try:
                model(input_ids=ids[start : start + batch_size].to(dev), use_cache=False)
            except _StopForward:
                pass
            if len(sink) != n:
                raise ValueError(
                    f"the model's forward called {len(sink)} of its {n} decoder blocks "
                    "(blocks called conditionally are not supported)"
                )
            inputs.append(sink[0][0])
            if single:
                kwargs_list.append(sink[0][1])
                continue
            per = PerBlock()
            for _, kw in sink:
                per.append(per[-1] if per and _same_args(per[-1], kw) else kw)
            kwargs_list.append(per)
    finally:
        if handle is not None:
            handle.remove()
        else:
            for i, b in enumerate(originals):
                seq[i] = b
    return inputs, kwargs_list


def block_output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out
