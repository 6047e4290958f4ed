"""The one device resolver (``auto`` -> ``cuda`` when available, else ``cpu``) and a scoped
torch intra-op thread count (``torch_threads``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from .errors import ConfigError

F = TypeVar("F", bound=Callable[..., Any])


def resolve_device(device: str, key: str = "device") -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``; refuses ``cuda*`` without CUDA.

    Raises:
        ConfigError: naming ``key`` when a CUDA device is asked for and none is visible.
    """
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(key, device, "cpu or auto (no CUDA device is visible)")
    return device


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Runs the body with ``n`` torch intra-op threads (None: unchanged), restoring them after."""
    import torch

    if n is None or n == torch.get_num_threads():
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def with_threads(fn: F, n: int | None) -> F:
    """``fn`` run under ``torch_threads(n)`` (``fn`` itself when ``n`` is None)."""
    if n is None:
        return fn
    import functools

    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with torch_threads(n):
            return fn(*args, **kwargs)

    return wrapped  # type: ignore[return-value]
