"""One run per run directory: an OS lock, a status in ``report.json``, no stale outputs.

``run_session(run_dir, ...)`` wraps the body of ``compress.py`` and ``train.py``:

* it takes an exclusive ``flock`` on ``RUN/.lock`` for the run's whole life, so a second run
  started into the same directory fails at once (:class:`RunDirBusy`) instead of interleaving its
  files with the first; the lock dies with the process, so a killed run never leaves it held;
* it removes what a killed writer left (``.<name>.*`` temp files and directories) and the
  previous run's outputs (``report.json``, ``packed/``, ``hf/``, ``compressed/``, ``layers.png``),
  except those this run reads (``compressed.path``, ``ckpt_path`` inside the directory); resume
  state (``calib_state/``) and Lightning checkpoints stay: they are verified before reuse;
* it writes ``report.json`` with ``status: running`` first and ``status: failed`` (with the error)
  when the body raises, so a failed run never leaves a success report behind; the body writes
  ``status: done`` itself;
* a run that fails before it holds the directory (its config is refused) still leaves no
  success report there: ``record_early_failure`` moves a previous ``report.json`` aside to
  ``report.previous.json`` (its outputs stay, so a typo never deletes a good checkpoint) and
  writes ``status: failed`` with the error;
* under Hydra it writes ``.hydra/`` (config, overrides) only after taking the lock (the root
  configs set ``hydra.output_subdir: null`` so Hydra does not overwrite a running job's copy).

Only global rank zero locks and writes; the other ranks of a distributed run share its directory.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..io import atomic_write_json, make_dir, remove_stale_temps

LOCK = ".lock"
OUTPUTS = (
    "report.json",
    "report.previous.json",
    "packed",
    "hf",
    "servable",
    "compressed",
    "layers.png",
    "rank_hashes",
    "offloaded",  # streaming's scratch copies of finished blocks (rewritten on resume)
)
PREVIOUS = "report.previous.json"


class RunDirBusy(RuntimeError):
    """The run directory cannot be used: another live process holds its lock, or it cannot be
    created or written."""


def global_rank() -> int:
    """This process's rank from the launcher's environment (0 when not distributed)."""
    for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        v = os.environ.get(var)
        if v is not None and v.strip().isdigit():
            return int(v)
    return 0


def _holder(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return os.read(fd, 4096).decode(errors="replace").strip() or "unknown process"
    except OSError:
        return "unknown process"


def acquire(run_dir: Path) -> int:
    """Takes the run directory's exclusive lock; returns its fd (held until closed)."""
    try:
        make_dir(run_dir)
    except OSError as e:
        raise RunDirBusy(
            f"hydra.run.dir: cannot create the run directory {run_dir} ({e.strerror}); choose a "
            "writable directory"
        ) from None
    if not os.access(run_dir, os.W_OK | os.X_OK):
        raise RunDirBusy(f"hydra.run.dir: {run_dir} is not writable; choose another directory")
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(run_dir / LOCK, flags, 0o666)
    except OSError as e:
        raise RunDirBusy(f"hydra.run.dir: cannot create the lock {run_dir / LOCK}: {e}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        who = _holder(fd)
        os.close(fd)
        raise RunDirBusy(
            f"hydra.run.dir: {run_dir} is in use by another run ({who}); wait for it to "
            "finish or choose another hydra.run.dir"
        ) from None
    info = (
        f"pid {os.getpid()} on {socket.gethostname()}, started "
        f"{time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(sys.argv)[:300]}"
    )
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, info.encode())
    return fd


def _inside(p: Path, d: Path) -> bool:
    try:
        p.resolve().relative_to(d.resolve())
        return True
    except ValueError:
        return False


def clear_outputs(run_dir: Path, keep: tuple[str | Path | None, ...] = ()) -> list[str]:
    """Removes the previous run's outputs and stale temps; keeps anything under ``keep``."""
    removed = remove_stale_temps(run_dir)
    kept = [Path(k).expanduser() for k in keep if k]
    ranks = tuple(p.name for p in run_dir.glob("report.rank*.json"))  # other ranks' records
    for name in (*OUTPUTS, *ranks):
        p = run_dir / name
        if not (p.exists() or p.is_symlink()):
            continue
        if any(_inside(k, p) or _inside(p, k) for k in kept):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
        removed.append(name)
    return removed


def record_early_failure(run_dir: str | Path, kind: str, error: BaseException) -> None:
    """A run refused before ``run_session`` (see the module docstring); does nothing while
    another live run holds the directory, or where no directory exists yet."""
    import json

    run_dir = Path(run_dir)
    if global_rank() != 0 or not run_dir.is_dir():
        return
    try:
        fd = acquire(run_dir)
    except RunDirBusy:
        return
    try:
        report = run_dir / "report.json"
        failed: dict[str, Any] = {
            "status": "failed",
            "kind": kind,
            "stage": "config",
            "error": f"{type(error).__name__}: {error}"[:2000],
            "finished": time.time(),
        }
        if report.is_file():
            try:
                previous = json.loads(report.read_text()).get("status")
            except (OSError, ValueError, AttributeError):
                previous = None
            if previous != "failed":
                os.replace(report, run_dir / PREVIOUS)
                failed["previous_report"] = PREVIOUS
        atomic_write_json(report, failed)
    except OSError:
        pass
    finally:
        os.close(fd)


def _save_hydra_files(run_dir: Path) -> None:
    try:
        from hydra.core.hydra_config import HydraConfig
        from omegaconf import OmegaConf
    except ImportError:
        return
    if not HydraConfig.initialized():
        return
    hc = HydraConfig.get()
    d = make_dir(run_dir / ".hydra")
    from ..io import atomic_write_bytes

    atomic_write_bytes(d / "overrides.yaml", OmegaConf.to_yaml(list(hc.overrides.task)).encode())
    atomic_write_bytes(d / "hydra.yaml", OmegaConf.to_yaml(hc).encode())


@contextmanager
def run_session(
    run_dir: str | Path,
    kind: str,
    *,
    config: Any = None,
    keep: tuple[str | Path | None, ...] = (),
) -> Iterator[dict[str, Any]]:
    """Holds the run directory for the body of one run (see the module docstring).

    Args:
        kind: ``compress`` or ``train`` (recorded in the status).
        config: the resolved config (plain dict), saved as ``.hydra/config.yaml`` under Hydra.
        keep: inputs of this run that live in ``run_dir`` and must not be cleared.

    Yields:
        The status dict (``status``, ``kind``, ``started``, ``removed``) for the final report.
    """
    from ..memory import PROGRESS
    from .signals import SignalGuard, signal_name

    run_dir = Path(run_dir)
    status: dict[str, Any] = {"status": "running", "kind": kind, "started": time.time()}
    PROGRESS.clear()
    rank = global_rank()
    if rank != 0:  # (rank zero holds the directory; each rank records its own interruption)
        guard = SignalGuard(lambda name: _record_interrupted(run_dir, status, name, rank))
        with guard:
            try:
                yield status
            except BaseException as e:
                if signal_name(e):
                    guard.record_once(signal_name(e))  # type: ignore[arg-type]
                raise
        return
    fd = acquire(run_dir)
    try:
        status["previous"] = _previous_status(run_dir)
        status["removed"] = clear_outputs(run_dir, keep)
        if config is not None:
            from omegaconf import OmegaConf

            from ..io import atomic_write_bytes

            _save_hydra_files(run_dir)
            if (run_dir / ".hydra").is_dir():
                atomic_write_bytes(
                    run_dir / ".hydra" / "config.yaml",
                    OmegaConf.to_yaml(OmegaConf.create(config)).encode(),
                )
        atomic_write_json(run_dir / "report.json", {**status, "pid": os.getpid()})
        guard = SignalGuard(lambda name: _record_interrupted(run_dir, status, name, 0))
        with guard:
            try:
                yield status
            except BaseException as e:
                name = signal_name(e)
                if name is not None:
                    guard.record_once(name)
                elif not guard.recorded:  # (an error the interruption caused keeps its record)
                    failed = {
                        **status,
                        "status": "failed",
                        "error": f"{type(e).__name__}: {e}"[:2000],
                        "finished": time.time(),
                        **{k: v for k, v in PROGRESS.items() if v is not None},
                    }
                    try:
                        atomic_write_json(run_dir / "report.json", failed)
                    except OSError:
                        pass
                raise
    finally:
        os.close(fd)


def _previous_status(run_dir: Path) -> dict[str, Any] | None:
    """The last run's ``status``, ``stage`` and progress from its report.json (None if none)."""
    import json

    try:
        rep = json.loads((run_dir / "report.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(rep, dict):
        return None
    keys = ("status", "kind", "signal", "stage", "last_block", "last_step")
    return {k: rep[k] for k in keys if k in rep}


def _record_interrupted(run_dir: Path, status: dict[str, Any], signame: str, rank: int) -> None:
    """``status: interrupted`` with the signal, the stage and the last finished block or step:
    ``report.json`` on rank zero, ``report.rank<r>.json`` on the others."""
    from ..memory import PROGRESS

    rec = {
        **status,
        "status": "interrupted",
        "signal": signame,
        "rank": rank,
        "finished": time.time(),
        **{k: v for k, v in PROGRESS.items() if v is not None},
        "resume": "run the same command again: compression continues after its last saved "
        "block (one process; several processes start over), training from its newest "
        "checkpoint",
    }
    if not run_dir.is_dir():
        return
    name = "report.json" if rank == 0 else f"report.rank{rank}.json"
    atomic_write_json(run_dir / name, rec)
