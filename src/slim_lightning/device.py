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


OMP_WAIT = ("passive", "active", "auto")


def check_omp_wait(policy: Any, key: str = "engine.omp_wait") -> None:
    """Refuses an ``engine.omp_wait`` other than passive, active, auto or null, naming ``key``."""
    if policy is not None and str(policy).lower() not in OMP_WAIT:
        raise ConfigError(
            key, policy, "passive, active, auto or null (the OpenMP runtime's default)"
        )


def busy_cores(seconds: float = 0.2) -> float | None:
    """How many CPU cores other processes keep busy, from ``/proc/stat`` over ``seconds`` (this
    process sleeps meanwhile); None where ``/proc/stat`` is unreadable."""
    import os
    import time

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        idle = v[3] + (v[4] if len(v) > 4 else 0)  # idle + iowait
        return sum(v) - idle, sum(v)

    try:
        b0, t0 = sample()
        time.sleep(seconds)
        b1, t1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    if t1 <= t0:
        return 0.0
    return (b1 - b0) / (t1 - t0) * (os.cpu_count() or 1)


def set_omp_wait_policy(policy: Any, key: str = "engine.omp_wait") -> str | None:
    """Sets ``OMP_WAIT_POLICY`` for the OpenMP runtime torch loads, which reads it once, when
    torch is first imported: the entry points call this before anything imports torch.

    ``passive``: idle OpenMP workers sleep at once instead of spinning; the many small BLAS and
    LAPACK calls of the per-linear solvers then stop fighting a process that shares the cores
    (2.4x faster per block with one competing process, 1.27x slower idle:
    benchmarks/results/threads_smollm2.json). ``auto``: passive when other processes keep at
    least half a core busy at start (``busy_cores``), else the runtime's default. The policy
    changes how threads wait, never what they compute: results are the same either way.
    ``None`` leaves the runtime's default. A user's own ``OMP_WAIT_POLICY`` always wins.
    Returns the policy in effect (None: the runtime's default).

    Raises:
        ConfigError: naming ``key`` for a value other than passive, active, auto or null.
    """
    import logging
    import os
    import sys
    import warnings

    check_omp_wait(policy, key)
    if "OMP_WAIT_POLICY" in os.environ or policy is None:
        return os.environ.get("OMP_WAIT_POLICY")
    if "torch" in sys.modules:  # too late for this process (e.g. a test calling run_compress)
        if str(policy).lower() != "auto":
            warnings.warn(
                f"{key}={policy}: torch is already loaded, the OpenMP wait policy stays as it is",
                stacklevel=2,
            )
        return None
    policy = str(policy).lower()
    if policy == "auto":
        busy = busy_cores()
        if busy is None or busy < 0.5:
            return None
        logging.getLogger(__name__).info(
            "%s=auto: other processes keep %.1f cores busy: OMP_WAIT_POLICY=PASSIVE", key, busy
        )
        policy = "passive"
    os.environ["OMP_WAIT_POLICY"] = policy.upper()
    return os.environ["OMP_WAIT_POLICY"]
