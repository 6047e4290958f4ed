"""Crash-safe file writes, digests and fault injection.

Every file the project writes goes through here:

* a write goes to a fresh, uniquely named temporary sibling (``tempfile.mkstemp``: created with
  ``O_EXCL``, so a planted file or symlink is never followed), is flushed and fsync'd, then renamed
  over the target (``os.replace`` replaces a symlink at the target instead of writing through it);
  the directory is fsync'd after the rename, so the rename itself survives a power loss;
* files and directories get the permissions the process umask allows (``mkstemp``/``mkdtemp``
  would give 0600/0700), so other users of a shared filesystem can read the outputs;
* temporary names start with ``.<target name>.`` and end in ``.tmp`` (files) or are
  ``.<target name>.*`` directories: :func:`remove_stale_temps` deletes leftovers of a killed run;
* :func:`fault_point` is a test hook at every write boundary (see below).

Fault injection (tests only): ``SLIM_FAULT="<action>:<label glob>[:<k>]"`` makes the ``k``-th
(default first) :func:`fault_point` whose label matches the glob ``kill`` the process with SIGKILL
(nothing is cleaned up, as in a real kill) or raise ``OSError(ENOSPC)`` (``enospc``) or
``OSError(EIO)`` (``eio``). ``SLIM_FAULT_TRACE=<file>`` appends every label reached to a file, so a
test can enumerate the boundaries of an uninterrupted run and then kill at each one.
"""

from __future__ import annotations

import errno
import fnmatch
import hashlib
import json
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _current_umask()
FILE_MODE = 0o666 & ~_UMASK
DIR_MODE = 0o777 & ~_UMASK

# -- fault injection ----------------------------------------------------------------------------
_fault_hits: dict[str, int] = {}


def fault_point(label: str) -> None:
    """A write boundary. Does nothing unless ``SLIM_FAULT`` / ``SLIM_FAULT_TRACE`` are set."""
    trace = os.environ.get("SLIM_FAULT_TRACE")
    if trace:
        with open(trace, "a") as f:
            f.write(label + "\n")
    spec = os.environ.get("SLIM_FAULT")
    if not spec:
        return
    action, _, rest = spec.partition(":")
    pattern, _, nth = rest.rpartition(":") if rest.count(":") else (rest, "", "1")
    if not fnmatch.fnmatchcase(label, pattern):
        return
    _fault_hits[spec] = _fault_hits.get(spec, 0) + 1
    if _fault_hits[spec] != int(nth or 1):
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if action == "enospc":
        raise OSError(errno.ENOSPC, f"injected fault at {label}: No space left on device")
    if action == "eio":
        raise OSError(errno.EIO, f"injected fault at {label}: Input/output error")
    raise ValueError(f"SLIM_FAULT: unknown action {action!r}; allowed: kill, enospc, eio")


# -- atomic writes ------------------------------------------------------------------------------
def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _tmp_file(path: Path) -> tuple[int, Path]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, FILE_MODE)
    return fd, Path(tmp)


def _commit(tmp: Path, path: Path) -> None:
    fault_point(f"rename {path.parent.name}/{path.name}")
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    fault_point(f"renamed {path.parent.name}/{path.name}")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Writes ``data`` to a unique temp sibling, fsyncs it and renames it over ``path``."""
    path = Path(path)
    fd, tmp = _tmp_file(path)
    try:
        with os.fdopen(fd, "wb") as f:
            fault_point(f"write {path.parent.name}/{path.name}")
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        _commit(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Writes JSON atomically (see :func:`atomic_write_bytes`)."""
    atomic_write_bytes(path, json.dumps(obj, indent=2, default=_json_default).encode())


def atomic_save_tensors(
    tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> None:
    """Saves a safetensors file atomically (contiguous CPU copies, temp name, fsync, rename)."""
    path = Path(path)
    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    fd, tmp = _tmp_file(path)
    os.close(fd)
    try:
        fault_point(f"write {path.parent.name}/{path.name}")
        save_file(flat, str(tmp), metadata=metadata)
        os.chmod(tmp, FILE_MODE)
        _fsync_file(tmp)
        _commit(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_tensors(path: str | Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Loads a safetensors file (the only weight format we read besides HF's own loaders)."""
    return load_file(str(path), device=device)


def make_dir(path: str | Path) -> Path:
    """``mkdir -p`` with the umask's permissions."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
    return path


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yields a temporary sibling directory that replaces ``path`` only if the block succeeds.

    Every file written inside is fsync'd before the rename. A kill inside the block leaves only a
    ``.<name>.*`` directory, which :func:`remove_stale_temps` removes at the next run's start.
    """
    path = Path(path)
    make_dir(path.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    os.chmod(tmp, DIR_MODE)
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file() and not f.is_symlink():
                os.chmod(f, FILE_MODE)
                _fsync_file(f)
        _fsync_dir(tmp)
        fault_point(f"rename {path.parent.name}/{path.name}/")
        if path.exists() or path.is_symlink():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
        fault_point(f"renamed {path.parent.name}/{path.name}/")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_stale_temps(directory: str | Path) -> list[str]:
    """Deletes temp files/dirs a killed writer left in ``directory`` (not recursive).

    Only call this while holding the directory's run lock (no other writer is active).

    Returns:
        The names removed.
    """
    directory = Path(directory)
    removed = []
    if not directory.is_dir():
        return removed
    for entry in directory.iterdir():
        name = entry.name
        if not name.startswith(".") or name in (".lock", ".hydra"):
            continue
        stale_file = name.endswith(".tmp") and (entry.is_file() or entry.is_symlink())
        stale_dir = entry.is_dir() and not entry.is_symlink() and name.count(".") >= 2
        if stale_file:
            entry.unlink(missing_ok=True)
            removed.append(name)
        elif stale_dir and not name.startswith((".pl_hydra", ".git")):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(name)
    return removed


# -- digests ------------------------------------------------------------------------------------
def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes (streamed)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def dir_sha256(directory: str | Path, exclude: tuple[str, ...] = ()) -> dict[str, str]:
    """``{name: sha256}`` of every file directly in ``directory`` (sorted), except ``exclude``."""
    return {
        f.name: file_sha256(f)
        for f in sorted(Path(directory).iterdir())
        if f.is_file() and f.name not in exclude
    }


def first_digest_mismatch(directory: str | Path, files: dict[str, str]) -> tuple[Path, str] | None:
    """The first of ``files`` (``{name: sha256}``, as ``dir_sha256`` records them) that is not a
    plain name of a file in ``directory`` (``"missing"``) or whose bytes changed
    (``"changed"``), as ``(path, why)``; None when all match."""
    directory = Path(directory)
    for name, digest in files.items():
        f = directory / str(name)
        if Path(str(name)).name != str(name) or not f.is_file():
            return f, "missing"
        if file_sha256(f) != digest:
            return f, "changed"
    return None


def cached_file_sha256(path: str | Path, cache_file: str | Path) -> str:
    """sha256 of ``path``, cached in ``cache_file`` by real path + size + mtime.

    A 13B checkpoint is hashed once, not on every run; a corrupt or unreadable cache is rebuilt.
    """
    p = Path(path).resolve()
    st = p.stat()
    key = f"{p}|{st.st_size}|{st.st_mtime_ns}"
    cache_file = Path(cache_file)
    cache: dict[str, str] = {}
    try:
        cache = json.loads(cache_file.read_text())
        if not isinstance(cache, dict):
            cache = {}
    except (OSError, ValueError):
        cache = {}
    if key in cache and isinstance(cache[key], str):
        return cache[key]
    digest = file_sha256(p)
    cache[key] = digest
    try:
        atomic_write_json(cache_file, cache)
    except OSError:
        pass  # a read-only cache only costs re-hashing
    return digest


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes of ``tensors`` (sorted by name)."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().to("cpu").contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _json_default(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "__dataclass_fields__"):
        import dataclasses

        return dataclasses.asdict(o)
    return str(o)


def cache_root(override: str | None = None) -> Path:
    """Cache root: ``override``, else ``$SLIM_LIGHTNING_CACHE``, else ``~/.cache/slim_lightning``."""
    root = override or os.environ.get("SLIM_LIGHTNING_CACHE") or "~/.cache/slim_lightning"
    return Path(root).expanduser()
