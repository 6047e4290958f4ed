"""Reading a checkpoint one tensor at a time (``engine.streaming``): where its safetensors shards
are (``checkpoint_dir``: local directory, hub snapshot, GGUF conversion cache), whether a model
can stream (``check_streamable``) and the per-tensor reader (``ShardReader``).
"""

from __future__ import annotations

import gc
import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError

log = logging.getLogger(__name__)
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


# -- the checkpoint's shards ----------------------------------------------------------------------
class ShardReader:
    """Reads single tensors from a directory of safetensors shards by model parameter name.

    Handles ``model.safetensors.index.json`` or a single ``model.safetensors`` (or any set of
    ``*.safetensors`` files), and checkpoints saved with or without the base-model prefix
    (``model.layers.0...`` vs ``layers.0...``).
    """

    def __init__(self, directory: str | Path, base_prefix: str = "model", what: str = ""):

        self.dir = Path(directory)
        self.base_prefix = base_prefix
        self.what = what or str(self.dir)
        index = self.dir / INDEX
        self.files: dict[str, str] = {}
        if index.is_file():
            self.files = self._read_index(index)
            shards = sorted({self.dir / f for f in self.files.values()})
        else:
            shards = [self.dir / SINGLE] if (self.dir / SINGLE).is_file() else []
            shards = shards or sorted(self.dir.glob("*.safetensors"))
        # every shard's header is read now (no tensor data): a missing, truncated or garbled
        # shard, or an index that lists tensors a shard lacks, fails before any weights load
        for shard in shards:
            keys = self._header_keys(shard)
            if index.is_file():
                listed = [k for k, f in self.files.items() if f == shard.name]
                absent = sorted(set(listed) - keys)
                if absent:
                    raise ConfigError(
                        "model.path",
                        self.what,
                        f"a checkpoint whose shards hold what {INDEX} lists: {shard} lacks "
                        f"{len(absent)} of its tensors (e.g. {absent[:3]})",
                    )
            else:
                for k in keys:
                    self.files[k] = shard.name
        if not self.files:
            have = sorted(p.name for p in self.dir.iterdir())[:8] if self.dir.is_dir() else []
            raise ConfigError(
                "engine.streaming",
                True,
                f"false for {what or self.dir}: streaming reads one tensor at a time from "
                f"safetensors shards ({SINGLE} or {INDEX}), and this checkpoint has none "
                f"(found: {', '.join(have) or 'nothing'}); convert it with "
                "save_pretrained(safe_serialization=True)",
            )

    def _read_index(self, index: Path) -> dict[str, str]:
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            if not isinstance(weight_map, dict) or not all(
                isinstance(v, str) and Path(v).name == v for v in weight_map.values()
            ):
                raise ValueError("weight_map must map tensor names to shard file names")
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(
                "model.path", self.what, f"a readable {INDEX} ({index}: {type(e).__name__}: {e})"
            ) from None
        return dict(weight_map)

    def _header_keys(self, shard: Path) -> set[str]:
        from safetensors import safe_open

        if not shard.is_file():
            raise ConfigError(
                "model.path",
                self.what,
                f"a complete checkpoint: {shard} is listed in {INDEX} but missing",
            )
        try:
            with safe_open(str(shard), framework="pt") as f:
                return set(f.keys())
        except Exception as e:  # noqa: BLE001 - truncated or garbled safetensors
            raise ConfigError(
                "model.path",
                self.what,
                f"readable safetensors shards: {shard} is damaged ({type(e).__name__}: {e}); "
                "re-download or re-save it",
            ) from None

    def key(self, name: str) -> str | None:
        """The checkpoint key of model tensor ``name`` (None when the checkpoint lacks it)."""
        p = self.base_prefix + "."
        for k in (name, name.removeprefix(p) if name.startswith(p) else p + name):
            if k in self.files:
                return k
        return None

    def read(self, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """Yields ``(name, tensor)`` for the model tensor names present in the checkpoint, one
        at a time: each is read alone (its shard opened for it and closed right after, so no
        mapped shard pages stay resident) and the caller drops it before the next is read."""
        from safetensors import safe_open

        for n in names:
            k = self.key(n)
            if k is not None:
                shard = self.dir / self.files[k]
                try:
                    with safe_open(str(shard), framework="pt") as f:
                        t = f.get_tensor(k)
                except Exception as e:  # noqa: BLE001 - changed on disk since the header check
                    raise ConfigError(
                        "model.path",
                        self.what,
                        f"readable safetensors shards: reading {k} from {shard} failed "
                        f"({type(e).__name__}: {e})",
                    ) from None
                yield n, t


def checkpoint_dir(cfg: Any, tokenizer: Any) -> Path:
    """The local directory of safetensors shards for ``cfg`` (downloading / converting once)."""
    from ..models.load import _load_gguf, _verify_cache
    from ..models.source import _gguf_cache

    src = cfg.source
    if src.kind == "tiny":
        raise ConfigError(
            "engine.streaming", True, "false for a random tiny model (it has no checkpoint)"
        )
    if src.kind == "dir":
        return Path(src.location)
    if src.kind == "hub":  # pragma: no cover - needs the network
        from huggingface_hub import snapshot_download

        patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "*.txt"]
        return Path(snapshot_download(cfg.path, revision=cfg.revision, allow_patterns=patterns))
    cache = _gguf_cache(cfg, src)
    if cache is None:
        raise ConfigError(
            "engine.streaming",
            True,
            "false for a GGUF file unless model.cache_gguf=true (streaming reads the cached "
            "safetensors conversion)",
        )
    if (cache / "config.json").is_file():
        try:
            _verify_cache(cache)  # streaming reads these files directly: verify them first
        except ValueError as e:
            log.warning("rebuilding the damaged GGUF conversion cache %s (%s)", cache, e)
            shutil.rmtree(cache, ignore_errors=True)
    if not (cache / "config.json").is_file():
        log.warning(
            "streaming: converting %s once into %s (this first conversion holds the whole "
            "dequantised model in memory)",
            src.gguf_file,
            cache,
        )
        del_model = _load_gguf(cfg, src, tokenizer)
        del del_model
        gc.collect()
        if not (cache / "config.json").is_file():
            raise ConfigError("model.cache_dir", cfg.cache_dir, "a writable cache directory")
    return cache


def check_streamable(cfg: Any) -> None:
    """Raises the ConfigError of a checkpoint streaming cannot read (no safetensors), without
    reading weights (local directories only; hub ids and GGUF files are checked at load)."""

    src = cfg.source
    if src.kind in ("tiny", "dir"):
        if src.kind == "dir":
            ShardReader(src.location, what=str(cfg.path))
        else:
            checkpoint_dir(cfg, None)
