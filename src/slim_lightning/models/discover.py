"""Finds what the layer-wise engine needs from the model itself, with no per-family code.

* The decoder blocks: the ``nn.ModuleList`` whose blocks are the classes transformers names in
  ``_no_split_modules`` (searched inside ``model.get_decoder()`` where the model has one, so a
  vision tower's layers are never taken for the decoder), else the longest list of blocks of
  one class holding linears.
* The compressible linears: every ``nn.Linear`` inside a block, in module order, minus the
  ``ignore`` patterns (fnmatch on the name inside the block; MoE routers by default). Fused
  mixture-of-experts weights (3-D parameters) are turned into per-expert linears first
  (``models.experts.unfuse_experts``); a block whose weights are neither is refused, naming them.
* Linears that share an input are observed by the engine while it runs a block (hooks seeing the
  same tensor), not guessed from names.

``OVERRIDES`` holds corrections for the cases discovery gets wrong (none known today: a test
shows each one's reason when one is added).
"""

from __future__ import annotations

import fnmatch
from typing import Any

from torch import nn

#: linears left dense in every block: MoE routers and gates that choose experts
DEFAULT_IGNORE: tuple[str, ...] = ("*router*", "*.gate", "gate", "*shared_expert_gate")

#: ``{model_type: {ArchSpec field: value}}`` where discovery is wrong (see the module docstring)
OVERRIDES: dict[str, dict[str, Any]] = {}


class UnsupportedArchitecture(ValueError):
    """The model's structure is not understood (the message names what)."""


def _decoder_root(model: nn.Module) -> tuple[str, nn.Module]:
    """``(dotted path, module)`` of the language decoder (the model itself when none)."""
    getter = getattr(model, "get_decoder", None)
    dec = None
    if callable(getter):
        try:
            dec = getter()
        except (AttributeError, NotImplementedError, TypeError):
            dec = None
    if isinstance(dec, nn.Module) and dec is not model:
        for path, mod in model.named_modules():
            if mod is dec:
                return path, dec
    return "", model


def find_blocks_path(model: nn.Module) -> str:
    """Dotted path of the decoder-block ``nn.ModuleList`` of ``model``."""
    root_path, root = _decoder_root(model)
    names = set(getattr(model, "_no_split_modules", None) or ())
    uniform = []
    for path, mod in root.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and len({type(b) for b in mod}) == 1:
            uniform.append((path, mod))
    hits = [(p, m) for p, m in uniform if type(m[0]).__name__ in names]
    if not hits:  # no metadata: the longest list of identical blocks that hold linears
        with_lin = [
            (p, m) for p, m in uniform if any(isinstance(x, nn.Linear) for x in m[0].modules())
        ]
        hits = sorted(with_lin, key=lambda pm: -len(pm[1]))[:1]
    if not hits:
        raise UnsupportedArchitecture(
            f"{type(model).__name__}: no decoder block list found (looked for an nn.ModuleList "
            f"of {sorted(names) or 'identical blocks holding nn.Linear layers'})"
        )
    path = hits[0][0]
    return f"{root_path}.{path}" if root_path else path


def block_linear_names(
    blocks: nn.ModuleList, ignore: tuple[str, ...] = (), where: str = "model"
) -> tuple[str, ...]:
    """Names (inside a block) of the compressible linears, the same in every block."""
    from transformers.pytorch_utils import Conv1D

    from ..nn.linear import SLiMLinear

    patterns = (*DEFAULT_IGNORE, *ignore)

    def names(block: nn.Module) -> tuple[str, ...]:
        out = []
        for n, m in block.named_modules():
            if isinstance(m, Conv1D):
                raise UnsupportedArchitecture(
                    f"{where}: {n} is a transformers Conv1D (weights stored transposed), "
                    "not an nn.Linear: this block structure is not supported"
                )
            if isinstance(m, (nn.Linear, SLiMLinear)) and not any(
                fnmatch.fnmatchcase(n, p) for p in patterns
            ):
                out.append(n)
        for n, p in block.named_parameters():
            if p.dim() > 2:
                raise UnsupportedArchitecture(
                    f"{where}: block parameter {n} has shape {tuple(p.shape)}: weights that are "
                    "neither nn.Linear nor fused experts (gate_up_proj / down_proj) are not "
                    "understood"
                )
        return tuple(out)

    first = names(blocks[0])
    if not first:
        hint = f" outside the ignored patterns {list(patterns)} (model.ignore)" if ignore else ""
        raise UnsupportedArchitecture(f"{where}: the decoder blocks hold no nn.Linear layers{hint}")
    for i, block in enumerate(blocks):
        if i == 0:
            continue
        other = names(block)
        if set(other) != set(first):
            raise UnsupportedArchitecture(
                f"{where}: decoder blocks differ (block {i} has "
                f"{sorted(set(other) ^ set(first))[:6]} where block 0 does not, or the reverse): "
                "blocks with different linears are not supported"
            )
    return first
