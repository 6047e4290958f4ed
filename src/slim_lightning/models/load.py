"""Model loading (hub id, local HF dir, GGUF, tiny random).

``ModelConfig`` is what the Hydra ``model`` group instantiates; ``load_model`` turns it into
``(model, tokenizer)``. A GGUF checkpoint is dequantised to fp32 by transformers and then rebuilt
as a plain HF model (a GGUF-quantised HF model refuses ``save_pretrained``); the rebuilt model is
cached as safetensors under ``<cache>/gguf/`` so the slow GGUF parse happens once per file.

The architecture registry lives in ``slim_lightning.models.arch``, the tiny random models in
``slim_lightning.models.tiny`` and path resolution (``model_source``, the embedded SmolLM2 GGUF, the GGUF
cache key, the hub probe) and ``ModelConfig`` in ``slim_lightning.models.source``.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..dtypes import FLOAT_DTYPES
from ..errors import ConfigError
from ..io import cache_root
from .arch import (
    arch_of_config,
    block_linears,
    get_arch,
    get_blocks,
)
from .source import (
    ModelConfig,
    ModelSource,
    _gguf_cache,
    _probe_hub,
)
from .tiny import byte_tokenizer, tiny_config, tiny_model

log = logging.getLogger(__name__)


# -- loading --------------------------------------------------------------------------------------
# Order of a run: ``load_config`` (config.json / GGUF header: architecture, dimensions) and
# ``load_tokenizer`` are cheap and run before anything heavy, so a bad ``model.path`` fails in
# seconds; ``load_model`` then loads the weights and refuses NaN/Inf tensors by name.
def _dtype_kw(dtype: torch.dtype) -> dict[str, torch.dtype]:
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype" if (major, minor) >= (4, 56) else "torch_dtype": dtype}


def _finish(model: nn.Module, cfg: ModelConfig) -> nn.Module:
    model.to(FLOAT_DTYPES[cfg.dtype])
    model.eval()
    if hasattr(model, "config"):
        model.config.use_cache = False
    return model


def rebuild_plain(model: nn.Module) -> nn.Module:
    """A plain HF model with ``model``'s config and weights (drops GGUF quantisation state).

    Returns a new fp32 model built from the config whose ``save_pretrained`` works; its state
    dict is bit-identical to ``model``'s.
    """
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, **_dtype_kw(torch.float32))
    plain.load_state_dict(model.state_dict(), strict=True)
    plain.tie_weights()
    return plain


def load_config(cfg: ModelConfig) -> Any:
    """The model's Hugging Face config, without loading weights (seconds even for 70B).

    Raises:
        ConfigError: ``model.path`` when the directory has no ``config.json``, the config is
            unreadable, the hub cannot be reached, or the architecture is not supported.
    """
    from transformers import AutoConfig

    src = cfg.source
    if src.kind == "tiny":
        tiny = dict(cfg.tiny or {})
        tiny.pop("seed", None)
        try:
            return tiny_config(**tiny)
        except Exception as e:  # noqa: BLE001 - transformers' own config validation
            raise ConfigError("model.tiny", cfg.tiny, f"a valid tiny model config ({e})") from None
    kw: dict[str, Any] = {"trust_remote_code": bool(cfg.trust_remote_code)}
    try:
        if src.kind == "gguf":
            cache = _gguf_cache(cfg, src)
            if cache is not None and (cache / "config.json").is_file():
                try:
                    config = AutoConfig.from_pretrained(str(cache), **kw)
                except Exception:  # noqa: BLE001 - a damaged cache entry is rebuilt on load
                    config = AutoConfig.from_pretrained(
                        src.location, gguf_file=src.gguf_file, trust_remote_code=False
                    )
            else:
                if src.kind == "gguf" and not Path(src.location).exists():
                    _probe_hub(replace_path(cfg, src.location))
                gkw: dict[str, Any] = {"trust_remote_code": False}
                if cfg.revision:
                    gkw["revision"] = cfg.revision
                config = AutoConfig.from_pretrained(src.location, gguf_file=src.gguf_file, **gkw)
        elif src.kind == "dir":
            d = Path(src.location)
            if not (d / "config.json").is_file():
                have = sorted(p.name for p in d.iterdir())[:8] if d.is_dir() else []
                raise ConfigError(
                    "model.path",
                    cfg.path,
                    "a Hugging Face model directory containing config.json, or a .gguf file "
                    f"(found: {', '.join(have) or 'nothing'})",
                )
            config = AutoConfig.from_pretrained(str(d), **kw)
        else:
            _probe_hub(cfg)
            if cfg.revision:
                kw["revision"] = cfg.revision
            config = AutoConfig.from_pretrained(cfg.path, **kw)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - malformed JSON, unknown model_type, bad GGUF, ...
        raise ConfigError(
            "model.path", cfg.path, f"a readable model config ({type(e).__name__}: {e})"
        ) from None
    try:  # the structure, from a weightless (meta) build of the config
        arch_of_config(config, cfg.arch, cfg.ignore, bool(cfg.trust_remote_code))
    except ValueError as e:
        raise ConfigError(
            "model.path",
            cfg.path,
            "a decoder whose blocks the engine understands (an nn.ModuleList of identical "
            f"blocks of nn.Linear layers or fused experts); model_type "
            f"{getattr(config, 'model_type', None)!r}: {e}",
        ) from None
    except Exception as e:  # noqa: BLE001 - transformers has no causal LM for this config
        raise ConfigError(
            "model.path",
            cfg.path,
            f"a causal language model ({type(e).__name__}: {e})",
        ) from None
    return config


def replace_path(cfg: ModelConfig, path: str) -> ModelConfig:
    """``cfg`` with another ``path`` (no validation)."""
    new = copy.copy(cfg)
    object.__setattr__(new, "path", path)
    return new


def load_tokenizer(cfg: ModelConfig) -> Any:
    """The model's tokenizer only (before any weights), with a clear error naming model.path."""
    from transformers import AutoTokenizer

    src = cfg.source
    if src.kind == "tiny":
        return byte_tokenizer()
    kw: dict[str, Any] = {"trust_remote_code": bool(cfg.trust_remote_code)}
    if cfg.revision and src.kind in ("hub", "gguf"):
        kw["revision"] = cfg.revision
    try:
        if src.kind == "gguf":
            cache = _gguf_cache(cfg, src)
            if cache is not None and (cache / "tokenizer_config.json").is_file():
                try:
                    return AutoTokenizer.from_pretrained(str(cache), trust_remote_code=False)
                except Exception:  # noqa: BLE001 - damaged cache: read the GGUF itself
                    pass
            return AutoTokenizer.from_pretrained(src.location, gguf_file=src.gguf_file, **kw)
        return AutoTokenizer.from_pretrained(src.location, **kw)
    except Exception as e:  # noqa: BLE001
        raise ConfigError(
            "model.path",
            cfg.path,
            f"a model with a loadable tokenizer (tokenizer.json or tokenizer.model): "
            f"{type(e).__name__}: {str(e)[:300]}",
        ) from None


def _load_gguf(cfg: ModelConfig, src: ModelSource, tokenizer: Any) -> nn.Module:
    """The GGUF model rebuilt as a plain HF model (from the conversion cache when present);
    ``tokenizer`` is stored beside a new cache entry."""
    from transformers import AutoModelForCausalLM

    cache = _gguf_cache(cfg, src)
    if cache is not None and (cache / "config.json").is_file():
        try:
            _verify_cache(cache)  # a changed byte would otherwise load as a different model
            model, info = AutoModelForCausalLM.from_pretrained(
                str(cache),
                trust_remote_code=False,
                **_dtype_kw(FLOAT_DTYPES[cfg.dtype]),
                output_loading_info=True,
            )
            check_loading_info(info, f"the GGUF conversion cache {cache}")
            check_finite(model, f"the GGUF conversion cache {cache}")
            return model
        except Exception as e:  # noqa: BLE001 - self-healing: rebuild a damaged cache entry
            log.warning("rebuilding the damaged GGUF conversion cache %s (%s)", cache, e)
            shutil.rmtree(cache, ignore_errors=True)
    kw: dict[str, Any] = {"gguf_file": src.gguf_file, "trust_remote_code": False}
    if cfg.revision:
        kw["revision"] = cfg.revision
    quantised = AutoModelForCausalLM.from_pretrained(src.location, **kw, **_dtype_kw(torch.float32))
    model = rebuild_plain(quantised)
    del quantised
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{cache.name}.", dir=cache.parent))
        try:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            _record_cache(tmp)
            os.replace(tmp, cache)  # atomic; another process may have won the race
        except OSError:
            pass
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return model


CACHE_DIGESTS = "slim_cache.json"


def _record_cache(directory: Path) -> None:
    """Every file's sha256 beside a GGUF conversion, checked on each load (``_verify_cache``)."""
    import json

    from ..io import dir_sha256

    files = dir_sha256(directory)
    (directory / CACHE_DIGESTS).write_text(json.dumps({"files": files}, indent=1))


def _verify_cache(directory: Path) -> None:
    """Raises ValueError unless every file recorded by ``_record_cache`` is there, unchanged,
    and weights are among them (a cache without digests is rebuilt once)."""
    import json

    from ..io import first_digest_mismatch

    try:
        files = json.loads((directory / CACHE_DIGESTS).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"no readable {CACHE_DIGESTS} ({type(e).__name__})") from None
    if not isinstance(files, dict) or not any(str(n).endswith(".safetensors") for n in files):
        raise ValueError(f"{CACHE_DIGESTS} lists no safetensors weights")
    bad = first_digest_mismatch(directory, files)
    if bad is not None:
        why = "is missing" if bad[1] == "missing" else "differs from its recorded sha256"
        raise ValueError(f"{bad[0].name} {why}")


def check_loading_info(info: dict[str, Any], source: str) -> None:
    """Raises ValueError naming ``source`` when transformers left model tensors unloaded (it
    would initialise them randomly and only log it) or found mismatched shapes."""
    missing = sorted(info.get("missing_keys") or [])
    mismatched = list(info.get("mismatched_keys") or [])
    if missing or mismatched:
        what = f"missing tensors {missing[:5]}" if missing else f"mismatched {mismatched[:5]}"
        raise ValueError(
            f"{source}: the checkpoint does not hold the whole model ({what}); transformers "
            "would fill them with random values"
        )


def check_finite(model: nn.Module, source: str) -> None:
    """Raises ValueError naming the first tensor with NaN/Inf values and where it came from."""
    for name, t in model.state_dict().items():
        if t.is_floating_point() and t.device.type != "meta" and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise ValueError(
                f"{source}: tensor {name} {tuple(t.shape)} has {bad} NaN/Inf values; the "
                "checkpoint is corrupt (nothing was compressed)"
            )


def load_model(
    cfg: ModelConfig, tokenizer: Any = None, config: Any = None
) -> tuple[nn.Module, Any]:
    """Loads ``(model, tokenizer)`` as described by ``cfg``.

    Args:
        tokenizer: an already loaded tokenizer (``load_tokenizer``) to return instead of loading
            it again.
        config: the model config preflight already read (``load_config``); read here when None,
            so a bad ``model.path`` still fails before any weights are read.

    Returns:
        A causal LM in eval mode with ``config.use_cache = False`` and weights in ``cfg.dtype``
        (on CPU), and its tokenizer. GGUF models come back as plain (dequantised) HF models.

    Raises:
        ConfigError: ``model.path`` problems (missing config.json, unreachable hub, unsupported
            architecture); ValueError: NaN/Inf weights, naming the tensor.
    """
    from transformers import AutoModelForCausalLM

    src = cfg.source
    if src.kind == "tiny":
        model, tok = tiny_model(**(cfg.tiny or {}))
        return _finish(model, cfg), tokenizer if tokenizer is not None else tok
    if config is None:
        load_config(cfg)  # fails fast, naming model.path, before any weights are read
    if tokenizer is None:
        tokenizer = load_tokenizer(cfg)
    if src.kind == "gguf":
        model = _load_gguf(cfg, src, tokenizer)
    else:
        kw: dict[str, Any] = {"trust_remote_code": bool(cfg.trust_remote_code)}
        if cfg.revision and src.kind == "hub":
            kw["revision"] = cfg.revision
        model, info = AutoModelForCausalLM.from_pretrained(
            src.location, **kw, **_dtype_kw(FLOAT_DTYPES[cfg.dtype]), output_loading_info=True
        )
        check_loading_info(info, f"model.path={cfg.path}")
    get_arch(model, cfg.arch, cfg.ignore)  # fail now, not in the middle of calibration
    model = _finish(model, cfg)
    check_finite(model, f"model.path={cfg.path}")
    return model, tokenizer


def source_dtype(cfg: ModelConfig, config: Any = None) -> str:
    """The dtype the original checkpoint stores its weights in (``export.dtype=auto``).

    HF directories and hub ids: ``config.json``'s ``dtype`` / ``torch_dtype`` (float32 when
    absent); GGUF files: float16 (GGUF stores no 16-bit dtype of the source model and its 4/8-bit
    blocks dequantise with fp16 scales); the tiny random model: float32.
    """
    src = cfg.source
    if src.kind == "tiny":
        return "float32"
    if src.kind == "gguf":
        return "float16"
    config = load_config(cfg) if config is None else config
    dt = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    name = str(dt).removeprefix("torch.") if dt is not None else "float32"
    return name if name in FLOAT_DTYPES else "float32"


@torch.no_grad()
def round_uncompressed(model: nn.Module, dtype: str, ignore: tuple[str, ...] = ()) -> int:
    """Rounds every floating tensor that is exported uncompressed to ``dtype`` (kept in place in
    the model's own dtype), so the run evaluates exactly what the packed checkpoint stores.

    The block linears' weights (compressed later) and non-persistent buffers are left alone.

    Returns:
        The number of tensors rounded.
    """
    if dtype == "float32":
        return 0
    arch = get_arch(model, ignore=ignore)
    skip = set()
    for i, block in enumerate(get_blocks(model, arch)):
        for name in block_linears(block, arch):
            skip.add(f"{arch.blocks_path}.{i}.{name}.weight")
    dt = FLOAT_DTYPES[dtype]
    n = 0
    seen: set[int] = set()
    for name, t in model.state_dict(keep_vars=True).items():
        if name in skip or not t.is_floating_point() or id(t) in seen:
            continue
        seen.add(id(t))
        t.data.copy_(t.data.to(dt).to(t.dtype))
        n += 1
    return n


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".json", ".model")


def weights_digest(cfg: ModelConfig, model: nn.Module | None = None) -> str:
    """sha256 identifying the model's weights (the resume fingerprint includes it).

    Local files (GGUF, HF directory, a hub snapshot in the local cache) are hashed by content,
    cached by path + size + mtime under ``<cache>/digests.json`` so a 13B model is hashed once.
    Anything else (a tiny random model) hashes the loaded ``model``'s tensors.
    """
    from ..io import cached_file_sha256, tensors_sha256

    src = cfg.source
    files: list[Path] = []
    if src.kind == "gguf" and (Path(src.location) / (src.gguf_file or "")).is_file():
        files = [Path(src.location) / src.gguf_file]  # type: ignore[operator]
    elif src.kind == "dir":
        files = sorted(p for p in Path(src.location).iterdir() if p.suffix in _WEIGHT_SUFFIXES)
    elif src.kind == "hub":
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(cfg.path, "config.json", revision=cfg.revision)
        if isinstance(cached, str):
            snap = Path(cached).parent
            files = sorted(p for p in snap.iterdir() if p.suffix in _WEIGHT_SUFFIXES)
    h = hashlib.sha256()
    if files:
        db = cache_root(cfg.cache_dir) / "digests.json"
        for f in files:
            h.update(f"{f.name}|{cached_file_sha256(f, db)}\n".encode())
        return h.hexdigest()
    if model is None:
        raise ValueError(f"weights_digest: no local files for model.path={cfg.path!r}")
    return tensors_sha256(model.state_dict())
