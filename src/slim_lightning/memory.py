"""Host and device memory of a run: per-stage peaks (``report.json["memory"]``) and the glibc
calls that hand freed memory back to the OS (streaming frees block-sized tensors every block).
"""

from __future__ import annotations

import gc
import os
import resource
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch


def _hwm_kib() -> int:
    """This process's peak RSS since start or the last reset (KiB): VmHWM on Linux, else
    ``ru_maxrss`` (which cannot be reset)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _rss_kib() -> int:
    """Current RSS (KiB) from /proc/self/statm; 0 where unavailable."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * (os.sysconf("SC_PAGE_SIZE") // 1024)
    except (OSError, ValueError, IndexError):
        return 0


class StageMemory:
    """Peak host RSS and peak device allocation per stage of a run (``report.json["memory"]``).

    ``with stage(timings, "compress"):`` records the stage's seconds into ``timings`` and its
    peaks here. The process-wide peak watermark is never reset (``/usr/bin/time`` and
    ``ru_maxrss`` stay exact): a stage's host peak is the watermark when the stage raised it
    (exact), otherwise the highest RSS a sampling thread saw during the stage (every
    ``interval`` seconds). The device peak is ``torch.cuda.max_memory_allocated`` after
    ``reset_peak_memory_stats`` at the stage's start. Nested stages fold into enclosing ones.
    """

    def __init__(self, interval: float = 0.02) -> None:
        self.stages: dict[str, dict[str, float | None]] = {}
        self.interval = interval
        self._open: list[list] = []  # [name, host peak KiB, device peak bytes, hwm at start]
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while True:
            time.sleep(self.interval)
            kib = _rss_kib()
            with self._lock:
                for entry in self._open:
                    entry[1] = max(entry[1], kib)

    def begin(self, name: str) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._sample, daemon=True, name="slim-mem")
            self._thread.start()
        cuda = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
        with self._lock:
            for entry in self._open:  # the enclosing stages keep what they saw so far
                entry[2] = max(entry[2], cuda)
            self._open.append([name, _rss_kib(), 0, _hwm_kib()])
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def end(self) -> None:
        hwm, rss = _hwm_kib(), _rss_kib()
        cuda = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
        with self._lock:
            name, kib, dev, hwm0 = self._open.pop()
            kib = max(kib, rss, hwm if hwm > hwm0 else 0)
            dev = max(dev, cuda)
            for entry in self._open:
                entry[1] = max(entry[1], kib)
                entry[2] = max(entry[2], dev)
        self.stages[name] = {
            "host_peak_gib": kib / 2**20,
            "device_peak_gib": dev / 2**30 if torch.cuda.is_available() else None,
        }

    def reset(self) -> None:
        """Forgets the stages of an earlier run in this process (a new run starts)."""
        with self._lock:
            self.stages = {}

    def peak_rss_kib(self) -> int:
        return max(_hwm_kib(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


MEMORY = StageMemory()


def reset_stages() -> None:
    """A new run starts: forget per-stage memory recorded earlier in this process."""
    MEMORY.reset()


#: where the run is, for the record an interruption leaves (``app.signals``): the innermost
#: open stage, and the last finished decoder block (compression) or optimiser step (training)
PROGRESS: dict[str, Any] = {}


@contextmanager
def stage(timings: dict[str, float], name: str) -> Iterator[None]:
    """Times a stage into ``timings[name + "_s"]`` and records its peak memory (``MEMORY``)."""
    MEMORY.begin(name)
    outer = PROGRESS.get("stage")
    PROGRESS["stage"] = name
    t0 = time.perf_counter()
    ok = False
    try:
        yield
        ok = True
    finally:
        timings[f"{name}_s"] = time.perf_counter() - t0
        MEMORY.end()
        if ok:  # (a stage that raised stays recorded: the run's failure record names it)
            PROGRESS["stage"] = outer


def peak_memory() -> dict[str, Any]:
    """Peak resident memory of this process (GiB), peak CUDA allocation when there is one, and
    the per-stage peaks recorded by ``stage``."""
    out: dict[str, Any] = {"peak_rss_gib": MEMORY.peak_rss_kib() / 2**20}
    if torch.cuda.is_available():
        stage_peaks = [v["device_peak_gib"] or 0.0 for v in MEMORY.stages.values()]
        out["peak_cuda_gib"] = max([torch.cuda.max_memory_allocated() / 2**30, *stage_peaks])
    if MEMORY.stages:
        out["stages"] = dict(MEMORY.stages)
    return out


def _libc() -> Any:
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:  # pragma: no cover - not glibc
        return None


def return_freed_memory() -> None:
    """Hands freed heap memory back to the OS (glibc ``malloc_trim``): block-sized tensors are
    freed every block, and without a trim the heap keeps their pages resident. No-op elsewhere."""
    gc.collect()
    libc = _libc()
    trim = getattr(libc, "malloc_trim", None)
    if trim is not None:
        trim(0)


def mmap_large_allocations(threshold: int = 1 << 20) -> None:
    """Fixes glibc's mmap threshold (``mallopt(M_MMAP_THRESHOLD)``), so allocations above
    ``threshold`` bytes are mapped and unmapped on free instead of growing the heap (the dynamic
    threshold otherwise rises to 32 MiB after the first large frees). No-op elsewhere."""
    libc = _libc()
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is not None:
        mallopt(-3, int(threshold))  # M_MMAP_THRESHOLD
