"""One-shot compression: ``plan`` (typed groups -> ``CompressPlan``) -> ``pipeline``
(load-or-compress) -> ``engine`` (the layer-wise pass) with ``resume`` (per-block commits),
``distributed`` (block steps across ranks), ``reconstruct`` (block-wise reconstruction) and ``streaming`` (models larger than memory)."""

from .plan import (
    CompressPlan,
    EmbeddingConfig,
    EngineConfig,
    ExportConfig,
    LowRankConfig,
    PrunerConfig,
    QuantConfig,
    ReconConfig,
    SparsityConfig,
    build_plan,
)

__all__ = [
    "CompressPlan",
    "EmbeddingConfig",
    "EngineConfig",
    "ExportConfig",
    "LowRankConfig",
    "PrunerConfig",
    "QuantConfig",
    "ReconConfig",
    "SparsityConfig",
    "build_plan",
]
