"""SIGTERM and SIGINT end a run as ``status: interrupted``, on every rank, resumable.

torchrun sends SIGTERM to every rank when one dies, SLURM before it preempts or times a job out,
a user presses Ctrl-C. :class:`SignalGuard` (entered by ``rundir.run_session`` on every rank):

* the handler raises :class:`Interrupted` in the main thread, so the run unwinds through its
  ``finally`` blocks (the lock is released; block and training checkpoints are written
  atomically, so what exists is whole) and ``run_session`` records the interruption;
* a watcher thread, woken through ``signal.set_wakeup_fd`` even while the main thread waits in
  native code (a collective whose peer died), records the interruption at once, and ends the
  process after ``grace`` seconds if the main thread has not unwound by then;
* the record names the signal, the stage and the last finished block or training step
  (``memory.PROGRESS``) and how to resume: the same command again (compression resumes from its
  last saved block, training from its last checkpoint).

Outside the main thread (nothing can install a handler there) the guard does nothing.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from typing import Any

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(BaseException):
    """Raised in the main thread by SIGTERM / SIGINT (a ``BaseException``, like
    ``KeyboardInterrupt``: ``except Exception`` blocks do not swallow it)."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"{signal.Signals(signum).name} received")


def signal_name(e: BaseException) -> str | None:
    """The signal behind an exception that ends a run by interruption, else None."""
    if isinstance(e, Interrupted):
        return signal.Signals(e.signum).name
    if isinstance(e, KeyboardInterrupt):
        return "SIGINT"
    return None


class SignalGuard:
    """See the module docstring. ``record(signame)`` writes the interruption record; it is called
    at most once, from the watcher thread or from the main thread, whichever comes first."""

    def __init__(self, record: Callable[[str], None], grace: float = 20.0):
        self._record, self.grace = record, grace
        self._lock = threading.Lock()
        self._recorded = False
        self._done = threading.Event()
        self._previous: dict[int, Any] = {}
        self._wakeup: tuple[int, int] | None = None
        self._old_fd: int | None = None
        self._fired = False

    @property
    def recorded(self) -> bool:
        return self._recorded

    def record_once(self, signame: str) -> None:
        with self._lock:
            if self._recorded:
                return
            self._recorded = True
        try:
            self._record(signame)
        except OSError:
            pass

    def _handler(self, signum: int, _frame: Any) -> None:
        if self._fired:  # a second signal while unwinding: the first one is being handled
            return
        self._fired = True
        raise Interrupted(signum)

    def _watch(self, fd: int) -> None:
        try:
            while True:
                data = os.read(fd, 64)
                if not data:
                    return  # the write end closed: the guard is done
                sigs = [b for b in data if b in {int(s) for s in SIGNALS}]
                if sigs:
                    break
            self.record_once(signal.Signals(sigs[0]).name)
            if not self._done.wait(self.grace):  # the main thread is stuck in native code
                os._exit(128 + sigs[0])
        except OSError:
            return
        finally:
            os.close(fd)

    def __enter__(self) -> SignalGuard:
        if threading.current_thread() is not threading.main_thread():
            return self
        r, w = os.pipe()
        os.set_blocking(w, False)
        try:
            self._old_fd = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        except ValueError:
            os.close(r)
            os.close(w)
            return self
        self._wakeup = (r, w)
        for s in SIGNALS:
            self._previous[s] = signal.signal(s, self._handler)
        threading.Thread(target=self._watch, args=(r,), daemon=True, name="signals").start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._done.set()
        if self._wakeup is None:
            return
        for s, h in self._previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
        signal.set_wakeup_fd(self._old_fd if self._old_fd is not None else -1)
        os.close(self._wakeup[1])  # the watcher reads EOF, closes its end and ends
        self._wakeup = None
