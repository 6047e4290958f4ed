"""The SLiM adapters of a compressed model: what trains, and the model after training.

Next to :mod:`slim_lightning.nn.linear` (the ``SLiMLinear`` layer), in the spirit of litgpt's
``lora.py``: :func:`mark_trainable` freezes everything but the adapters, :func:`requantize_all`
snaps them back onto their grid when fitting ends, :func:`state_hashes` fingerprints base and
adapters (DDP consistency), :func:`merge_to_dense` folds them into plain ``nn.Linear`` weights.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import nn


def mark_trainable(
    model: nn.Module, *, norms: bool = False, embeddings: bool = False, lm_head: bool = False
) -> list[str]:
    """Freezes ``model`` except the SLiM adapters (and optionally norms / embeddings / lm_head).

    Returns:
        The names of the trainable parameters (``named_parameters`` of ``model``, tied weights
        once).
    """
    from .linear import SLiMLinear

    for p in model.parameters():
        p.requires_grad_(False)
    for mod in model.modules():
        if isinstance(mod, SLiMLinear) and mod.rank > 0:
            mod.lora_l.requires_grad_(True)
            mod.lora_r.requires_grad_(True)
        elif norms and "norm" in type(mod).__name__.lower():
            for p in mod.parameters(recurse=False):
                p.requires_grad_(True)
    for flag, key, mod in (
        (embeddings, "embeddings", model.get_input_embeddings()),
        (lm_head, "lm_head", model.get_output_embeddings()),
    ):
        if not flag or mod is None:
            continue
        if not isinstance(getattr(mod, "weight", None), nn.Parameter):
            raise ValueError(
                f"train.{key}=true: the {key} are quantised ({type(mod).__name__}, "
                "embeddings.bits) and cannot train; compress with embeddings.bits=null"
            )
        mod.weight.requires_grad_(True)
    return [n for n, p in model.named_parameters() if p.requires_grad]


def count_trainable(model: nn.Module) -> int:
    """Number of distinct trainable scalars (a tied weight counts once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def requantize_all(model: nn.Module) -> int:
    """Snaps every quantised adapter back to its 4-bit grid and every fp adapter to its storage
    dtype, so the packed checkpoint holds exactly the model that was evaluated; returns the
    number of layers."""
    from .linear import SLiMLinear

    n = 0
    for mod in model.modules():
        if isinstance(mod, SLiMLinear):
            mod.requantize_adapters()
            mod.round_fp_adapters()  # fp adapters: onto their storage dtype
            n += 1
    return n


def state_hashes(model: nn.Module) -> dict[str, str]:
    """sha256 of the compressed base (every SLiMLinear buffer) and of the adapter parameters."""
    from .linear import SLiMLinear

    base, adapters = hashlib.sha256(), hashlib.sha256()
    for name, mod in sorted(model.named_modules(), key=lambda kv: kv[0]):
        if not isinstance(mod, SLiMLinear):
            continue
        hash_base(base, name, mod)
        for pname, p in sorted(mod.named_parameters(recurse=False)):
            adapters.update(f"{name}.{pname}".encode())
            adapters.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return {"base": base.hexdigest(), "adapters": adapters.hexdigest()}


def hash_base(digest: Any, name: str, mod: nn.Module) -> None:
    """Feeds one ``SLiMLinear``'s packed base (its buffers but the adapters', by name) into
    ``digest``; ``state_hashes`` calls it for every layer in name order, and so does a writer
    that sees the layers a block at a time (``checkpoint.stream_save``)."""
    for bname, buf in sorted(mod.named_buffers(recurse=False)):
        if buf is None or bname.startswith("adapter_"):
            continue
        digest.update(f"{name}.{bname}".encode())
        # the bytes in place (a copy of a 32000 x 4096 packed head would be 131 MB)
        digest.update(buf.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def merge_to_dense(model: nn.Module) -> nn.Module:
    """Replaces every ``SLiMLinear`` by a plain ``nn.Linear`` holding its merged weight (fp32).

    The result is a plain Hugging Face model whose dense weights compute exactly what the
    compressed model computes (adapters merged), so ``save_pretrained`` and any HF tool work.
    """
    from .embedding import dequantize_embeddings
    from .linear import SLiMLinear

    dequantize_embeddings(model)  # quantised embedding / LM head -> plain dequantised modules
    for name, mod in list(model.named_modules()):
        if isinstance(mod, SLiMLinear):
            model.set_submodule(name, mod.to_linear())
    return model
