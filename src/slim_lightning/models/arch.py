"""The architecture registry: where each model family keeps its decoder blocks and linears.

``ArchSpec``, ``ARCHS``, ``get_arch``, ``get_blocks`` and ``block_linears`` are the only code that
knows a model family's layout: no per-model code elsewhere. ``linear_shapes`` reads the block
linears' shapes off a config alone (meta device, no weights).

Adding a model architecture = one ``ArchSpec`` entry in ``ARCHS`` here + one
``conf/model/<name>.yaml``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class ArchSpec:
    """Where one model family keeps what the layer-wise engine needs (dotted module paths).

    Attributes:
        model_type: ``model.config.model_type`` this spec serves.
        blocks_path: the ``nn.ModuleList`` of decoder blocks, e.g. ``model.layers``.
        linear_names: the compressible linears inside one block, in forward order.
        embed_paths: modules run before the first block (token/position embeddings, projections).
        norm_path: final norm after the last block (None if the family has none).
        lm_head_path: the output projection (never compressed).
        rotary_path: the shared rotary-embedding module whose output blocks take as
            ``position_embeddings`` (None for learned positions).
        input_groups: linears fed the very same input tensor (one X^T X between them: the
            engine detects the sharing itself; the memory estimate counts one per group).
    """

    model_type: str
    blocks_path: str
    linear_names: tuple[str, ...]
    embed_paths: tuple[str, ...]
    norm_path: str | None
    lm_head_path: str = "lm_head"
    rotary_path: str | None = None
    input_groups: tuple[tuple[str, ...], ...] = ()


_LLAMA_LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
_OPT_LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.out_proj",
    "fc1",
    "fc2",
)


def _llama_like(model_type: str) -> ArchSpec:
    return ArchSpec(
        model_type=model_type,
        blocks_path="model.layers",
        linear_names=_LLAMA_LINEARS,
        embed_paths=("model.embed_tokens",),
        norm_path="model.norm",
        rotary_path="model.rotary_emb",
        input_groups=(_LLAMA_LINEARS[:3], _LLAMA_LINEARS[4:6]),
    )


ARCHS: dict[str, ArchSpec] = {
    **{t: _llama_like(t) for t in ("llama", "mistral", "qwen2", "qwen3")},
    "opt": ArchSpec(
        model_type="opt",
        blocks_path="model.decoder.layers",
        linear_names=_OPT_LINEARS,
        # project_in exists only when word_embed_proj_dim != hidden_size (opt-350m)
        embed_paths=(
            "model.decoder.embed_tokens",
            "model.decoder.embed_positions",
            "model.decoder.project_in",
        ),
        norm_path="model.decoder.final_layer_norm",
        input_groups=(_OPT_LINEARS[:3],),
    ),
}


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


def get_arch(model: nn.Module, arch: str = "auto") -> ArchSpec:
    """The registry entry for ``model`` (by ``model.config.model_type`` unless ``arch`` is set)."""
    key = arch if arch != "auto" else getattr(getattr(model, "config", None), "model_type", None)
    if key not in ARCHS:
        raise ValueError(
            f"unsupported architecture {key!r}; supported model types: {', '.join(sorted(ARCHS))} "
            "(add an ArchSpec to slim_lightning.models.arch.ARCHS)"
        )
    return ARCHS[key]


def get_blocks(model: nn.Module, arch: ArchSpec) -> nn.ModuleList:
    """The decoder blocks of ``model``, in order."""
    blocks = get_module(model, arch.blocks_path)
    if not isinstance(blocks, nn.ModuleList):
        raise ValueError(f"{type(model).__name__} has no ModuleList at {arch.blocks_path!r}")
    return blocks


def block_linears(block: nn.Module, arch: ArchSpec) -> dict[str, nn.Linear]:
    """``{name: nn.Linear}`` for the compressible linears of one block, in ``arch`` order."""
    out = {}
    for name in arch.linear_names:
        mod = get_module(block, name)
        if not isinstance(mod, nn.Linear):
            raise ValueError(f"block has no nn.Linear at {name!r} (got {type(mod).__name__})")
        out[name] = mod
    return out


def linear_shapes(config: Any, arch: ArchSpec) -> dict[str, tuple[int, int]]:
    """``{dotted name of every block linear: (d_out, d_in)}`` from a config, on the meta device.

    Names are full paths (``<blocks_path>.<i>.<linear>``); no weights are allocated.
    """
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    out = {}
    for i, block in enumerate(get_blocks(model, arch)):
        for name, lin in block_linears(block, arch).items():
            out[f"{arch.blocks_path}.{i}.{name}"] = (lin.out_features, lin.in_features)
    return out


class _StopForward(Exception):
    """Raised by the first block's pre-hook once its inputs are captured."""


def to_device(obj: Any, device: torch.device | str) -> Any:
    """Moves every tensor inside nested tuples/lists/dicts to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(to_device(o, device) for o in obj)
    if isinstance(obj, list):
        return [to_device(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, first_block: nn.Module, ids: torch.Tensor, batch_size: int
) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """Runs the model (on its own device) up to its first decoder block, for each batch.

    Args:
        ids: int64 ``(n_samples, seqlen)`` calibration token ids.

    Returns:
        Per batch: the hidden states entering block 0, ``(b, seqlen, hidden)``, and the keyword
        arguments the model passed to the block (masks, rotary embeddings, positions).
    """
    inputs: list[torch.Tensor] = []
    kwargs_list: list[dict[str, Any]] = []

    def hook(_mod: nn.Module, args: tuple, kwargs: dict) -> None:
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        inputs.append(hidden.detach())
        kwargs_list.append(
            {k: v for k, v in kwargs.items() if k not in ("past_key_value", "past_key_values")}
        )
        raise _StopForward

    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        # the device of the first tensor that holds data: a streaming model's blocks wait on
        # the meta device, and a quantised embedding holds buffers, not parameters
        dev = next(
            (t.device for t in (*model.parameters(), *model.buffers()) if not t.is_meta),
            torch.device("cpu"),
        )
        for start in range(0, ids.shape[0], batch_size):
            try:
                model(input_ids=ids[start : start + batch_size].to(dev), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return inputs, kwargs_list


def block_output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out
