"""slim-lightning: one-shot SLiM compression (4-bit + sparsity + low-rank adapters) for LLMs."""

from __future__ import annotations

from typing import Any

from .version import __version__

__all__ = ["__version__", "load_compressed", "save_compressed"]


def load_compressed(path: Any, **kwargs: Any) -> Any:
    """Rebuilds a compressed model from a packed checkpoint: see ``checkpoint.load_compressed``."""
    from .checkpoint import load_compressed as _load

    return _load(path, **kwargs)


def save_compressed(*args: Any, **kwargs: Any) -> Any:
    """Writes a packed checkpoint: see ``checkpoint.save_compressed``."""
    from .checkpoint import save_compressed as _save

    return _save(*args, **kwargs)


def _register_with_transformers() -> None:
    # AutoModelForCausalLM.from_pretrained(RUN/packed) works after `import slim_lightning`; the
    # registration waits until transformers loads its quantizer registry (no import cost here)
    from .deploy.hf_quantizer import install_hook

    install_hook()


_register_with_transformers()


def _guard_kernels_name() -> None:
    # this checkout's kernels/ folder must not shadow Hugging Face's `kernels` package
    from .shadow import guard

    guard()


_guard_kernels_name()
