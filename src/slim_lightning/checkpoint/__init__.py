"""Packed checkpoints: ``layout`` (files, ``slim.json``, digests, sizes), ``save``, ``load``."""

from .layout import read_meta
from .load import load_compressed
from .save import save_compressed

__all__ = ["load_compressed", "read_meta", "save_compressed"]
