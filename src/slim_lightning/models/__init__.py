"""Where weights come from: ``source`` (``ModelConfig``, path resolution), ``load`` (hub, local,
GGUF, tiny), ``arch`` (the architecture registry), ``shards`` (per-tensor safetensors reads),
``tiny`` (random test models)."""

from .source import ModelConfig

__all__ = ["ModelConfig"]
