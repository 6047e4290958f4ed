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


OMP_WAIT = ("passive", "active")


def set_omp_wait_policy(policy: Any, key: str = "engine.omp_wait") -> str | None:
    """Sets ``OMP_WAIT_POLICY`` for the OpenMP runtime torch loads, which reads it once, when
    torch is first imported: the entry points call this before anything imports torch.

    ``passive``: idle OpenMP workers sleep at once instead of spinning; the many small BLAS and
    LAPACK calls of the per-linear solvers then stop fighting a process that shares the cores
    (benchmarks/results/threads_smollm2.json). ``None`` leaves the runtime's default. A user's
    own ``OMP_WAIT_POLICY`` always wins. Returns the policy in effect (None: the default).

    Raises:
        ConfigError: naming ``key`` for a value other than passive, active or null.
    """
    import os
    import sys
    import warnings

    if policy is not None and str(policy).lower() not in OMP_WAIT:
        raise ConfigError(key, policy, "passive, active or null (the OpenMP runtime's default)")
    if "OMP_WAIT_POLICY" in os.environ or policy is None:
        return os.environ.get("OMP_WAIT_POLICY")
    if "torch" in sys.modules:  # too late for this process (e.g. a test calling run_compress)
        warnings.warn(
            f"{key}={policy}: torch is already loaded, the OpenMP wait policy stays as it is",
            stacklevel=2,
        )
        return None
    os.environ["OMP_WAIT_POLICY"] = str(policy).upper()
    return os.environ["OMP_WAIT_POLICY"]
