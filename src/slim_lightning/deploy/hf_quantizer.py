"""Native transformers loading: ``AutoModelForCausalLM.from_pretrained(RUN/packed)``.

``save_compressed`` writes ``quantization_config = {"quant_method": "slim", "layers": {name:
SLiMLinear.meta()}, ...}`` into ``config.json``. Importing ``slim_lightning`` registers, for that
``quant_method``, a ``QuantizationConfigMixin`` (``SLiMConfig``) and an ``HfQuantizer``
(``SLiMHfQuantizer``) with transformers (lazily: the registration runs when transformers'
quantizer registry is first imported, so ``import slim_lightning`` itself stays light). Then

* the skeleton is built on the meta device and each listed ``nn.Linear`` is swapped for an empty
  ``SLiMLinear`` (``checkpoint.install_layers``, the same code ``load_compressed`` uses);
* transformers fills the packed buffers from ``model.safetensors`` (or the shards of a streaming
  run's export) as they are (integer codes are never cast; no dense weight is allocated);
  ``dtype=`` casts what stays floating point;
  ``device_map=`` places modules as usual;
* after loading, 4-bit adapters' fp32 parameters are rebuilt from their codes (bit-exact, as in
  ``load_compressed``), every packed tensor is range-checked, and the kernel backend is chosen
  (``auto``: Triton on CUDA where supported);
* ``save_pretrained`` writes the packed state once more (the 4-bit adapters' fp32 masters are
  dropped again) with the same ``quantization_config``, so the output loads the same way;
* ``is_trainable``: the adapters are ordinary parameters; peft can add LoRA on top of the
  ``SLiMLinear`` layers through ``peft_lora_config`` (peft only knows ``nn.Linear`` by itself).

Every load runs the same checks as ``load_compressed`` (``checkpoint.verify``): recorded sha256
digests (``SLIM_LIGHTNING_VERIFY=0`` skips them, like ``verify=False``), ``quantization_config``
against ``slim.json``, no model tensor left unloaded and no stored tensor unused, tied sources
present, every floating tensor finite.

Supported transformers: ``SUPPORTED`` (the 5.x quantizer API; CI tests the oldest, 5.0, and the
newest the installer resolves). Outside it, or when registering fails, ``from_pretrained`` of a
``quant_method: slim`` directory raises naming the reason instead of transformers' "unknown
quantization type, skip" (which would return randomly initialised linears).
"""

from __future__ import annotations

from typing import Any

SUPPORTED = (5, 0), (6, 0)  # [min, max) transformers major.minor with this quantizer API
QUANT_METHOD = "slim"
_refusal: list[str] = []  # why ``slim`` checkpoints cannot load through transformers here


def supported_range() -> str:
    (a, b), (c, d) = SUPPORTED
    return f">={a}.{b},<{c}.{d}"


#: the oldest transformers whose loader leaves our per-expert tensors alone (5.0.0 merges
#: ``mlp.experts.*.gate_proj.weight*`` into its fused tensor: tested, refused)
MOE_FROM = (5, 25)


def _major_minor(version: str) -> tuple[int, ...]:
    parts = []
    for p in version.split(".")[:2]:
        digits = "".join(ch for ch in p if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def _version_ok(version: str) -> bool:
    return SUPPORTED[0] <= _major_minor(version) < SUPPORTED[1]


def register() -> bool:
    """Registers the ``slim`` quantization config and quantizer with transformers (idempotent).

    Returns False (and registers nothing) when the installed transformers is outside
    ``SUPPORTED``; ``load_compressed`` works with any version.
    """
    import transformers
    from transformers.quantizers import auto

    if QUANT_METHOD in auto.AUTO_QUANTIZER_MAPPING:
        return True
    if not _version_ok(transformers.__version__):
        refuse(
            f"transformers {transformers.__version__} is outside the range this slim-lightning "
            f"supports ({supported_range()})"
        )
        return False
    from transformers.quantizers.base import HfQuantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin

    class SLiMConfig(QuantizationConfigMixin):
        """``quantization_config`` of a slim-lightning packed checkpoint (``quant_method: slim``)."""

        def __init__(
            self,
            layers: dict[str, dict] | None = None,
            embeddings: dict[str, dict] | None = None,
            tied_to: dict[str, str] | None = None,
            dtype: str = "float32",
            compute_dtype: str = "float32",
            format: str = "slim-lightning",  # noqa: A002 - the config.json key
            version: int = 1,
            **kwargs: Any,
        ) -> None:
            self.quant_method = QUANT_METHOD
            self.format = format
            self.version = version
            self.layers = dict(layers or {})
            self.embeddings = dict(embeddings or {})
            self.tied_to = dict(tied_to or {})
            self.dtype = dtype
            self.compute_dtype = compute_dtype

    class SLiMHfQuantizer(HfQuantizer):
        """Loads (never creates) slim-lightning packed checkpoints; see the module docstring."""

        requires_calibration = True  # compression runs in compress.py, not in from_pretrained

        def validate_environment(self, *args: Any, **kwargs: Any) -> None:
            cfg = self.quantization_config
            if getattr(cfg, "format", None) != "slim-lightning" or int(cfg.version) != 1:
                raise ValueError(
                    f"quantization_config: format {cfg.format!r} version {cfg.version!r}; this "
                    "slim-lightning reads format 'slim-lightning' version 1"
                )

        def update_dtype(self, dtype: Any) -> Any:
            import torch

            if dtype is None:  # the dtype the run computed in: reproduces its perplexity
                return getattr(torch, self.quantization_config.compute_dtype)
            return dtype

        def _process_model_before_weight_loading(self, model: Any, **kwargs: Any) -> None:
            import re
            from pathlib import Path

            from ..checkpoint.layout import INDEX, WEIGHTS, weight_files
            from ..checkpoint.load import install_layers
            from ..checkpoint.verify import check_file_tensors, open_checkpoint, verify_default
            from ..errors import CheckpointError
            from ..models.experts import unfuse_experts
            from ..nn.embedding import install_embeddings

            files = [Path(f) for f in kwargs.get("checkpoint_files") or []]
            if not files or len({f.parent for f in files}) != 1:
                raise CheckpointError(
                    f"quant_method 'slim': expected {WEIGHTS} or the shards {INDEX} lists (what "
                    f"compress.py writes), got {[str(f) for f in files] or 'none'}"
                )
            path = files[0].parent
            # (also checks config.json's quantization_config, which transformers read, against
            # slim.json: the layers installed below are the verified ones)
            meta = self._slim_meta = open_checkpoint(path, verify=verify_default())
            ours = weight_files(path)
            if sorted(f.name for f in files) != [f.name for f in ours]:
                raise CheckpointError(
                    f"quant_method 'slim': transformers would load {sorted(f.name for f in files)}"
                    f" from {path}, the checkpoint's weights are {[f.name for f in ours]}"
                )
            self._slim_weights = ours[0] if len(ours) == 1 else path / INDEX
            where = f"{path / 'config.json'} quantization_config"
            try:  # fused experts as the per-expert linears the checkpoint stores
                unfused = unfuse_experts(model)
            except ValueError as e:
                raise CheckpointError(f"{where}: {e}") from None
            import transformers

            if unfused and _major_minor(transformers.__version__) < MOE_FROM:
                raise CheckpointError(
                    f"{where}: a packed mixture-of-experts checkpoint loads through "
                    f"from_pretrained from transformers {'.'.join(map(str, MOE_FROM))} on "
                    f"(this is {transformers.__version__}, whose loader merges per-expert "
                    "tensors by name); use slim_lightning.load_compressed(path)"
                )
            install_layers(model, meta["layers"], where)
            install_embeddings(model, meta.get("embeddings") or {}, where)
            self._slim_file_keys = check_file_tensors(ours, model)
            # not stored: 4-bit adapters' fp32 parameters (rebuilt from their codes) and tied
            # tensors (re-tied to their source after loading)
            ignore = list(getattr(model, "_keys_to_ignore_on_load_missing", None) or [])
            tied = [f"^{re.escape(k)}$" for k in meta.get("tied_to") or {}]
            model._keys_to_ignore_on_load_missing = [*ignore, r"\.lora_[lr]$", *tied]

        def _process_model_after_weight_loading(self, model: Any, **kwargs: Any) -> Any:
            from ..checkpoint.load import retie
            from ..checkpoint.verify import check_complete, check_finite

            meta = getattr(self, "_slim_meta", None)
            if meta is None:  # the quantizer was used without its pre-loading step
                raise RuntimeError("quant_method 'slim': the checkpoint was not verified")
            check_complete(model, self._slim_file_keys, meta, self._slim_weights)
            retie(model, meta.get("tied_to") or {}, model.state_dict(keep_vars=True))
            finish_loading(model)  # rebuilds the unstored adapter parameters first
            check_finite(model, str(self._slim_weights))
            model.config.use_cache = True
            if getattr(model, "generation_config", None) is not None:
                model.generation_config.use_cache = True
            _record_meta_on_save(model, meta)
            return model

        def get_state_dict_and_metadata(self, model: Any) -> tuple[dict | None, dict]:
            return packed_state_dict(model, self.quantization_config.tied_to), {}

        def is_serializable(self) -> bool:
            return True

        @property
        def is_trainable(self) -> bool:
            return True

    auto.register_quantization_config(QUANT_METHOD)(SLiMConfig)
    auto.register_quantizer(QUANT_METHOD)(SLiMHfQuantizer)
    return True


def _record_meta_on_save(model: Any, meta: dict) -> None:
    """``model.save_pretrained(d)`` also writes ``slim.json`` (with fresh digests), so what it
    saves loads through the same verified path as what ``compress.py`` wrote."""
    import functools

    from ..checkpoint.save import record_meta

    original = model.save_pretrained

    @functools.wraps(original)
    def save_pretrained(save_directory: Any, *args: Any, **kwargs: Any) -> Any:
        out = original(save_directory, *args, **kwargs)
        record_meta(save_directory, model, meta)
        return out

    model.save_pretrained = save_pretrained


def finish_loading(model: Any, backend: str = "auto") -> None:
    """After the packed tensors are in place: rebuild 4-bit adapters' fp32 parameters from their
    codes and range-check every packed tensor (``checkpoint.restore_packed``; transformers has
    initialised the unstored parameters, so all are rebuilt), check biases, pick the backend."""
    import torch

    from ..checkpoint.load import restore_packed
    from ..errors import CheckpointError
    from ..nn.backend import set_backend
    from ..nn.linear import SLiMLinear

    restore_packed(model, "", rebuild_all=True)
    for name, mod in model.named_modules():
        if isinstance(mod, SLiMLinear) and mod.bias is not None:
            if not bool(torch.isfinite(mod.bias).all()):
                raise CheckpointError(f"{name}.bias has NaN/Inf values")
    set_backend(model, backend)  # type: ignore[arg-type]


def packed_state_dict(model: Any, tied_to: dict[str, str] | None = None) -> dict[str, Any]:
    """The model's state dict without the 4-bit adapters' fp32 masters (stored as codes) and
    without tied keys (stored once, under their source)."""
    from ..nn.linear import SLiMLinear

    drop = set()
    for name, mod in model.named_modules():
        if isinstance(mod, SLiMLinear) and mod.rank and mod.adapter_bits is not None:
            if not mod.adapters_on_grid():
                mod.requantize_adapters()
            drop |= {f"{name}.lora_l", f"{name}.lora_r"}
    drop |= set(tied_to or ())
    return {k: v for k, v in model.state_dict().items() if k not in drop}


def peft_lora_config(**kwargs: Any) -> Any:
    """A ``peft.LoraConfig`` (same arguments) that can target ``SLiMLinear`` layers.

    peft dispatches LoRA only onto the layer types it knows; this registers ``SLiMLinear`` as a
    custom module whose LoRA wrapper is peft's own ``lora.Linear`` around the packed layer (the
    base stays packed and frozen; merging into it is not supported). Use the returned config with
    ``get_peft_model``; to reload a saved peft adapter pass it as ``config=`` to
    ``PeftModel.from_pretrained``.
    """
    from peft import LoraConfig

    from ..nn.linear import SLiMLinear

    cfg = LoraConfig(**kwargs)
    cfg._register_custom_module({SLiMLinear: _peft_layer_class()})
    return cfg


def _peft_layer_class() -> type:
    from peft.tuners.lora.layer import Linear

    class SLiMLoraLinear(Linear):
        """peft's ``lora.Linear`` around a ``SLiMLinear`` (no merge: the base is packed)."""

        def _get_in_out_features(self, module: Any) -> tuple[int, int]:
            return module.in_features, module.out_features

        def merge(self, *args: Any, **kwargs: Any) -> None:
            raise NotImplementedError(
                "merging a peft LoRA into a packed SLiMLinear is not supported; "
                "use slim_lightning.nn.adapters.merge_to_dense for a dense export"
            )

    return SLiMLoraLinear


_HOOK_TARGET = "transformers.quantizers.auto"


class _RegisterOnImport:
    """``sys.meta_path`` finder: runs ``register()`` right after transformers' quantizer registry
    is imported (transformers imports it lazily, on the first ``from_pretrained``)."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        import importlib.machinery
        import sys

        if fullname != _HOOK_TARGET:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                break
        else:
            return None
        loader = spec.loader
        exec_module = loader.exec_module

        def exec_and_register(module: Any) -> None:
            exec_module(module)
            _register_or_refuse()

        loader.exec_module = exec_and_register  # type: ignore[method-assign]
        assert isinstance(spec, importlib.machinery.ModuleSpec)
        return spec


def refuse(reason: str) -> None:
    """Makes ``from_pretrained`` of a ``quant_method: slim`` directory raise ``reason`` (instead
    of transformers' "unknown quantization type, skip", which returns random linears)."""
    import sys

    _refusal[:] = [reason]
    auto = sys.modules.get(_HOOK_TARGET)
    holder = getattr(auto, "AutoHfQuantizer", None)
    original = getattr(holder, "supports_quant_method", None)
    if original is None or getattr(original, "_slim_guard", False):
        return

    def supports_quant_method(quantization_config_dict: Any) -> Any:
        qc = quantization_config_dict
        method = (
            qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
        )
        if str(method) == QUANT_METHOD and QUANT_METHOD not in auto.AUTO_QUANTIZER_MAPPING:
            raise RuntimeError(
                f"this checkpoint was written by slim-lightning (quant_method 'slim'), but "
                f"transformers cannot load it here: {_refusal[0]}. Install a supported "
                f"transformers ({supported_range()}) or load it with "
                "slim_lightning.load_compressed(path)"
            )
        return original(quantization_config_dict)

    supports_quant_method._slim_guard = True  # type: ignore[attr-defined]
    holder.supports_quant_method = staticmethod(supports_quant_method)


def _register_or_refuse() -> None:
    try:
        register()
    except Exception as e:  # noqa: BLE001 - never break importing transformers: refuse instead
        refuse(f"registering the slim quantizer failed ({type(e).__name__}: {e})")


def install_hook() -> None:
    """Registers now when transformers' registry is loaded, else on its first import."""
    import sys

    if _HOOK_TARGET in sys.modules:
        _register_or_refuse()
        return
    if not any(isinstance(f, _RegisterOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterOnImport())
