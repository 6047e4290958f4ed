"""Writing Hugging Face's sharded safetensors layout one shard at a time.

A sharded directory holds ``model-00001-of-0000N.safetensors`` ... ``model-0000N-of-0000N
.safetensors`` and ``model.safetensors.index.json`` (``{"metadata": {"total_size": bytes of
every stored tensor, ...}, "weight_map": {tensor name: shard file name}}``, written as
transformers writes it: indent 2, sorted keys), which is what ``from_pretrained`` and
``safetensors`` readers expect.

``write_safetensors`` writes one file in the safetensors format with the exact bytes that
``safetensors.torch.save_file`` writes for the same tensors (8-byte little-endian header length,
compact JSON header with ``__metadata__`` first and the tensors by descending dtype then name,
space-padded to a multiple of 8, then the tensors' bytes in that order), but streams every
tensor's bytes straight from its storage (``save_file`` first copies every tensor of the file
into ``bytes``) and hashes them as they are written, so a file's sha256 needs no second read.
``write_planned`` builds the header from names, dtypes and shapes alone and fetches each tensor
only when its bytes are due, so a caller can hold one tensor of the file at a time.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..io import fault_point
from .layout import _ST_NAMES, INDEX

SHARD = "model-{:05d}-of-{:05d}.safetensors"


def shard_name(k: int, n: int) -> str:
    """File name of shard ``k`` (1-based) of ``n``."""
    return SHARD.format(k, n)


def tensor_nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


Plan = dict[str, tuple[torch.dtype, tuple[int, ...]]]  # tensor name -> (dtype, shape)


def write_safetensors(
    path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> tuple[str, int]:
    """Writes ``tensors`` to ``path`` (see the module docstring); returns ``(sha256, bytes)``.

    Args:
        path: the file (created or truncated; callers write inside an ``io.atomic_dir``).
        tensors: name -> CPU tensor (made contiguous one at a time when it is not).
        metadata: the header's ``__metadata__`` (string values), or None.
    """
    plan = {k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()}
    return write_planned(path, plan, tensors.__getitem__, metadata)


def write_planned(
    path: str | Path,
    plan: Plan,
    fetch: Callable[[str], torch.Tensor],
    metadata: dict[str, str] | None = None,
) -> tuple[str, int]:
    """``write_safetensors`` of tensors that are only fetched when their bytes are written: the
    header is built from ``plan`` and ``fetch(name)`` is called once per tensor, in file order,
    so the caller can hold one tensor at a time. Returns ``(sha256, bytes)``.

    Raises:
        ValueError: a fetched tensor's dtype or shape is not the planned one.
    """
    order = sorted(plan, key=lambda k: (-_dtype_rank(plan[k][0], k), k))
    header: dict[str, Any] = {}
    if metadata is not None:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for k in order:
        dtype, shape = plan[k]
        n = math.prod(shape) * dtype.itemsize
        header[k] = {
            "dtype": _ST_NAMES[dtype][1],
            "shape": list(shape),
            "data_offsets": [offset, offset + n],
        }
        offset += n
    head = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    head += b" " * (-len(head) % 8)
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for chunk in (len(head).to_bytes(8, "little"), head):
            f.write(chunk)
            digest.update(chunk)
        for k in order:
            t = fetch(k).detach()
            if (t.dtype, tuple(t.shape)) != plan[k] or t.device.type != "cpu":
                raise ValueError(
                    f"write_safetensors: tensor {k} is {t.dtype} {tuple(t.shape)} on "
                    f"{t.device}; planned {plan[k][0]} {plan[k][1]} on the CPU"
                )
            if t.numel() == 0:
                continue
            # a flat byte view of the storage (no copy for a contiguous tensor)
            view = t.contiguous().reshape(-1).view(torch.uint8).numpy()
            f.write(memoryview(view))
            digest.update(memoryview(view))
            del t, view
        f.flush()
        os.fsync(f.fileno())
    return digest.hexdigest(), 8 + len(head) + offset


def _dtype_rank(dtype: torch.dtype, name: str) -> int:
    entry = _ST_NAMES.get(dtype)
    if entry is None:
        raise ValueError(f"write_safetensors: tensor {name} has dtype {dtype}, not stored here")
    return entry[0]


class ShardedWriter:
    """Writes ``n`` shards into ``directory`` (in any order) and then their index.

    Args:
        directory: the target (a temporary directory of ``io.atomic_dir``).
        n: the number of shards (known up front: file names carry it).
        metadata: every shard's ``__metadata__``.
        label: prefix of the fault-injection labels (``io.fault_point``), e.g. ``packed``.

    After the shards are written, ``digests`` maps every shard file name to its sha256 and
    ``sizes`` to its bytes; ``weight_map`` and ``total_size`` are the index's.
    """

    def __init__(
        self, directory: Path, n: int, metadata: dict[str, str] | None, label: str
    ) -> None:
        self.directory, self.n, self.metadata, self.label = Path(directory), n, metadata, label
        self.digests: dict[str, str] = {}
        self.sizes: dict[str, int] = {}
        self.weight_map: dict[str, str] = {}
        self.total_size = 0

    def write(self, k: int, tensors: dict[str, torch.Tensor]) -> str:
        """Writes shard ``k`` (1-based); returns its file name."""
        plan = {key: (t.dtype, tuple(t.shape)) for key, t in tensors.items()}
        return self.write_planned(k, plan, tensors.__getitem__)

    def write_planned(self, k: int, plan: Plan, fetch: Callable[[str], torch.Tensor]) -> str:
        """Writes shard ``k`` (1-based) from a plan, fetching one tensor at a time
        (``write_planned``); returns its file name."""
        name = shard_name(k, self.n)
        if not 1 <= k <= self.n or name in self.digests:
            raise ValueError(f"ShardedWriter: shard {k} of {self.n} (written: {len(self.digests)})")
        twice = sorted(set(plan) & set(self.weight_map))
        if twice:
            raise ValueError(f"ShardedWriter: tensors {twice[:5]} are in two shards")
        fault_point(f"write {self.label}/{name}")
        self.digests[name], self.sizes[name] = write_planned(
            self.directory / name, plan, fetch, self.metadata
        )
        for key, (dtype, shape) in plan.items():
            self.weight_map[key] = name
            self.total_size += math.prod(shape) * dtype.itemsize
        return name

    def finish(self, **extra: Any) -> dict[str, Any]:
        """Writes the index (``extra`` joins ``total_size`` in its ``metadata``); returns it."""
        missing = [shard_name(k, self.n) for k in range(1, self.n + 1)]
        missing = [m for m in missing if m not in self.digests]
        if missing:
            raise ValueError(f"ShardedWriter: shards {missing[:3]} were not written")
        index = {
            "metadata": {"total_size": self.total_size, **extra},
            "weight_map": dict(sorted(self.weight_map.items())),
        }
        fault_point(f"write {self.label}/{INDEX}")
        (self.directory / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        return index
