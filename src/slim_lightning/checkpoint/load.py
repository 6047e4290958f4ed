"""Loading a packed checkpoint back without the original weights (layout: ``checkpoint.save``).

``load_compressed`` builds the model skeleton from ``config.json`` on the meta device (no dense
weights are ever allocated), swaps in empty ``SLiMLinear`` modules from their metadata
(``install_layers``) and assigns the stored tensors. It verifies the files' sha256 by default and
always checks metadata against config and tensors and that every scale is finite
(``restore_packed``). The transformers quantizer (``deploy.hf_quantizer``) shares these steps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..dtypes import FLOAT_DTYPES
from ..errors import CheckpointError
from ..io import load_tensors
from .layout import INDEX, META, weight_files
from .verify import check_complete, check_file_tensors, check_finite, open_checkpoint


def load_compressed(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    backend: str = "auto",
    verify: bool = True,
    dtype: str | torch.dtype | None = None,
) -> tuple[nn.Module, Any, dict[str, Any]]:
    """Rebuilds a compressed model from a packed checkpoint (no original weights needed).

    Args:
        path: a directory written by ``save_compressed`` (one ``model.safetensors``, or the
            shards and index a streaming run writes).
        device: where the tensors go.
        backend: ``SLiMLinear`` backend: ``auto`` (triton on CUDA where the kernels support the
            layer, else reference), ``reference`` or ``triton``.
        verify: check every file against its recorded sha256 first (seconds per GB).
        dtype: dtype of the uncompressed tensors and activations (default: the dtype the run
            computed in, so the run's perplexity is reproduced; the file may store 16 bits).

    Every load, verified or not, checks the layer metadata against ``config.json`` and against
    the stored tensors' shapes and dtypes, and that every floating-point tensor and every decoded
    scale is finite. Errors are ``CheckpointError`` naming the file and the tensor or layer.

    Returns:
        ``(model, tokenizer, meta)``: the model in eval mode, its tokenizer (None if none was
        saved) and the checkpoint's metadata.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from ..models.arch import get_arch
    from ..nn.backend import set_backend

    path = Path(path)
    meta = open_checkpoint(path, verify=verify)
    files = weight_files(path)  # model.safetensors, or the shards of a streaming run's export
    weights = files[0] if len(files) == 1 else path / INDEX  # (named in errors)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(
            f"{path / 'config.json'}: unreadable ({type(e).__name__}: {e})"
        ) from None
    if dtype is None:
        dtype = meta.get("compute_dtype", meta.get("dtype", "float32"))
    dtype = FLOAT_DTYPES[dtype] if isinstance(dtype, str) and dtype in FLOAT_DTYPES else dtype
    if dtype not in FLOAT_DTYPES.values():
        raise ValueError(f"load_compressed: dtype {dtype!r}; allowed: {', '.join(FLOAT_DTYPES)}")
    if hasattr(config, "quantization_config"):  # this path builds the layers itself
        del config.quantization_config
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
        get_arch(model)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{path / 'config.json'}: cannot build the model ({e})") from None
    install_layers(model, meta["layers"], f"{path / META}")
    if meta.get("embeddings"):
        from ..nn.embedding import install_embeddings

        install_embeddings(model, meta["embeddings"], f"{path / META}")
    file_keys = check_file_tensors(files, model)
    check_complete(model, file_keys, meta, weights)
    expected = {k: v.dtype for k, v in model.state_dict().items()}
    sd = {}
    for file in files:
        try:
            sd.update(load_tensors(file, device=str(device)))
        except Exception as e:  # noqa: BLE001 - truncated or garbled safetensors
            raise CheckpointError(f"{file}: unreadable ({type(e).__name__}: {e})") from None
    for k, v in sd.items():  # 16-bit storage -> the compute dtype (exact: an upcast)
        if k in expected and v.dtype != expected[k] and v.is_floating_point():
            sd[k] = v.to(expected[k])
    try:
        model.load_state_dict(sd, strict=False, assign=True)
    except RuntimeError as e:
        raise CheckpointError(f"{weights}: {e}") from None
    retie(model, meta.get("tied_to") or dict.fromkeys(meta.get("tied", [])), sd)
    check_finite(model, str(weights))  # (unstored adapter masters, still meta, are rebuilt next)
    restore_packed(model, f"{weights}: ")
    _materialise_buffers(model, get_arch(model), device)
    model.to(device)
    set_backend(model, backend)  # type: ignore[arg-type]
    model.eval()
    model.config.use_cache = True  # generate() with the KV cache, as users expect
    if getattr(model, "generation_config", None) is not None:  # (older checkpoints: off)
        model.generation_config.use_cache = True
    tokenizer = None
    if (path / "tokenizer_config.json").is_file():
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(
                f"{path}: tokenizer unreadable ({type(e).__name__}: {e})"
            ) from None
    return model, tokenizer, meta


def read_weights(path: str | Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor a packed checkpoint stores, as stored (one ``model.safetensors`` or every
    shard of a sharded one; ``layout.weight_files`` checks which), without building a model."""
    out: dict[str, torch.Tensor] = {}
    for file in weight_files(path):
        out.update(load_tensors(file, device=device))
    return out


def install_layers(model: nn.Module, layers: dict[str, dict], where: str) -> None:
    """Swaps each named ``nn.Linear`` of a (meta-device) model for an empty ``SLiMLinear`` built
    from its metadata, after checking the metadata against the model; raises ``CheckpointError``
    naming ``where`` and the layer. Shared by ``load_compressed`` and the transformers quantizer.
    """
    from ..formats import check_meta
    from ..models.arch import get_module
    from ..nn.linear import SLiMLinear

    if not isinstance(layers, dict) or not layers:
        raise CheckpointError(f"{where}: no compressed layers listed")
    for name, layer_meta in layers.items():
        at = f"{where}: layer {name}"
        old = get_module(model, name)
        if not isinstance(old, nn.Linear):
            raise CheckpointError(
                f"{at}: config.json's model has no linear layer there (got "
                f"{type(old).__name__}); the layer list and config.json do not belong together"
            )
        try:
            for key in ("weight", "adapter_l", "adapter_r"):
                if key in layer_meta:
                    check_meta(layer_meta[key])
            if tuple(layer_meta["weight"]["shape"]) != (old.out_features, old.in_features):
                raise ValueError(
                    f"weight shape {layer_meta['weight']['shape']} != the model's "
                    f"({old.out_features}, {old.in_features})"
                )
            new = SLiMLinear.from_meta(layer_meta, device="meta")
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{at}: {type(e).__name__}: {e}") from None
        model.set_submodule(name, new)


def restore_packed(model: nn.Module, where: str, *, rebuild_all: bool = False) -> None:
    """Rebuilds 4-bit adapters' fp32 parameters from their stored codes (bit-exact; those left on
    the meta device, or all with ``rebuild_all``) and range-checks every packed tensor of every
    ``SLiMLinear``; errors are ``CheckpointError`` prefixed with ``where``. Shared by
    ``load_compressed`` and the transformers quantizer."""
    from ..formats import check_values
    from ..nn.embedding import PackedEmbedding
    from ..nn.linear import SLiMLinear

    for name, mod in model.named_modules():
        if isinstance(mod, PackedEmbedding):  # quantised tables: their scales too
            try:
                check_values(mod.packed_weight())
            except ValueError as e:
                raise CheckpointError(f"{where}{name}.weight: {e}") from None
        if not isinstance(mod, SLiMLinear):
            continue
        if mod.rank and mod.adapter_bits is not None and (rebuild_all or mod.lora_l.is_meta):
            device = next(iter(mod.packed_weight().tensors.values())).device
            mod.rebuild_adapter_params()
            mod.to(device)
        for label, pw in (
            ("weight", mod.packed_weight()),
            ("adapter_l", mod.packed_adapter("l")),
            ("adapter_r", mod.packed_adapter("r")),
        ):
            if pw is not None:
                try:
                    check_values(pw)
                except ValueError as e:
                    raise CheckpointError(f"{where}{name}.{label}: {e}") from None


def retie(model: nn.Module, tied_to: dict[str, str | None], sd: dict[str, torch.Tensor]) -> None:
    """Points every tied key at its source's tensor (stored once). A source of None (checkpoints
    written before ``tied_to`` was recorded) is the input embedding's weight."""
    from ..models.arch import get_module

    for key, src in tied_to.items():
        owner, _, attr = key.rpartition(".")
        if src is None:
            emb = model.get_input_embeddings()
            if emb is None or not hasattr(emb, "weight"):
                raise CheckpointError(f"cannot re-tie {key}: the model has no input embedding")
            value = emb.weight
        elif src in sd:
            value = sd[src]
        else:
            raise CheckpointError(f"cannot re-tie {key}: its source {src} is not stored")
        mod = get_module(model, owner)
        if mod is None:
            raise CheckpointError(f"cannot re-tie {key}: no module {owner}")
        setattr(mod, attr, value)


def _materialise_buffers(model: nn.Module, arch: Any, device: str | torch.device) -> None:
    """Recomputes non-persistent buffers (rotary ``inv_freq`` tables: never stored) left on the
    meta device, by building each owning module again from its config."""
    for name, mod in list(model.named_modules()):
        if not any(b.is_meta for b in mod.buffers(recurse=False)):
            continue
        if any(p.is_meta for p in mod.parameters(recurse=False)):
            continue  # weights are reported below
        fresh = None
        for cfg in (getattr(mod, "config", None), getattr(model, "config", None)):
            if cfg is None:
                continue
            try:
                with torch.device(device):
                    fresh = type(mod)(config=cfg)
                break
            except TypeError:
                continue
        if fresh is None or any(b.is_meta for b in fresh.buffers()):
            raise ValueError(f"cannot rebuild the buffers of {name} ({type(mod).__name__})")
        model.set_submodule(name, fresh)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ValueError(f"tensors not restored from the checkpoint: {left[:5]}")
