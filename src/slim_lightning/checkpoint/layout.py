"""Checks and measurements of packed checkpoints: what ``load_compressed`` verifies.

* ``read_meta``: reads and validates ``slim.json`` (format, version, layers, tied, dtype);
* ``verify_files``: every file against the sha256 recorded in ``slim.json`` when it was written;
* ``written_sizes``: the sizes ``save_compressed`` records, measured from the written file;
* ``CheckpointError``: raised for a missing, damaged, edited or inconsistent checkpoint.

The checkpoint layout is described in ``slim_lightning.checkpoint.save``.
"""

from __future__ import annotations

import json
import math
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError

FORMAT = "slim-lightning"
VERSION = 1
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"  # sharded checkpoints (streaming runs)
META = "slim.json"


def written_sizes(
    weights: Path, model: nn.Module, mods: dict[str, nn.Module], tied: list[str]
) -> dict[str, Any]:
    """Sizes measured from the written safetensors file, against the model's 16-bit bytes.

    ``linears``: every tensor stored under a compressed layer (packed weight, adapters, scales,
    bias) vs that layer's weight and bias at 16 bits; ``rest``: everything else (embeddings,
    norms, lm_head; quantised or not) vs its 16-bit bytes; ``checkpoint``: the whole file (header
    included) vs the whole model at 16 bits. ``mods``: the compressed layers counted as linears.
    """
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as f:
        stored = []
        for k in f.keys():
            sl = f.get_slice(k)
            stored.append((k, math.prod(sl.get_shape()) * _st_dtype(sl.get_dtype()).itemsize))
    tally = SizeTally(tied)
    tally.add(model.named_modules(), model.state_dict().items(), stored, set(mods))
    return tally.result(weights.stat().st_size)


class SizeTally:
    """What ``written_sizes`` measures, added up one part of the model at a time (the whole
    model at once, or the non-block tensors and then one decoder block after another).

    Args:
        tied: tensor names stored under another name (not counted again).
    """

    def __init__(self, tied: Any) -> None:
        self.tied = set(tied)
        self.lin = self.rest = self.lin16 = self.rest16 = self.weights_numel = 0

    def add(self, modules: Any, state: Any, stored: Any, sized: set[str]) -> None:
        """Counts one part.

        Args:
            modules: its ``(full name, module)`` pairs.
            state: its ``(full key, tensor)`` state-dict pairs (meta tensors count by shape).
            stored: ``(key, bytes)`` of the tensors written for it.
            sized: the names of its compressed layers counted as linears (not the LM head).
        """
        for k, n in stored:
            if k.rpartition(".")[0] in sized:
                self.lin += n
            else:
                self.rest += n
        for k, v in state:
            if k not in self.tied and k.rpartition(".")[0] not in sized and v.is_floating_point():
                self.rest16 += 2 * v.numel()
        for name, m in modules:
            if name in sized:
                bias = m.out_features if m.bias is not None else 0
                self.lin16 += 2 * (m.in_features * m.out_features + bias)
                self.weights_numel += m.in_features * m.out_features
            elif hasattr(m, "packed_weight") and f"{name}.weight_values" not in self.tied:
                # quantised embedding / LM head: their 16-bit tables
                self.rest16 += 2 * math.prod(m.packed_weight().shape)

    def result(self, file_bytes: int) -> dict[str, Any]:
        """The sizes, with ``file_bytes`` the bytes of every weights file written."""
        lin, lin16, rest16 = self.lin, self.lin16, self.rest16
        numel = self.weights_numel
        return {
            "checkpoint_bytes": file_bytes,
            "checkpoint_fp16_bytes": lin16 + rest16,
            "checkpoint_ratio_vs_fp16": file_bytes / (lin16 + rest16),
            "linears_bytes": lin,
            "linears_fp16_bytes": lin16,
            "linears_ratio_vs_fp16": lin / lin16 if lin16 else None,
            "linears_bits_per_weight": 8 * lin / numel if numel else None,
            "rest_bytes": self.rest,
            "rest_fp16_bytes": rest16,
            # the summary table's keys: the compressed linears
            "packed_bytes": lin,
            "dense_fp16_bytes": lin16,
            "ratio_vs_fp16": lin / lin16 if lin16 else None,
        }


def weight_files(path: str | Path) -> list[Path]:
    """The safetensors files of a packed checkpoint: ``model.safetensors``, or the shards that
    ``model.safetensors.index.json`` lists (in name order).

    Raises:
        CheckpointError: naming the file: no weights, both layouts at once, an unreadable
            index, a listed shard that is missing, or a ``*.safetensors`` file the index does
            not list (a stray or extra shard).
    """
    path = Path(path)
    single, index = path / WEIGHTS, path / INDEX
    if not index.is_file():
        if not single.is_file():
            raise CheckpointError(f"{single}: missing (and no {INDEX})")
        return [single]
    if single.exists():
        raise CheckpointError(
            f"{single}: beside {index.name}; a checkpoint is one file or shards, not both"
        )
    shards = sorted(set(read_index(index).values()))
    for name in shards:
        if not (path / name).is_file():
            raise CheckpointError(f"{path / name}: missing ({index.name} lists it)")
    extra = sorted(f.name for f in path.glob("*.safetensors") if f.name not in shards)
    if extra:
        raise CheckpointError(
            f"{path / extra[0]}: not listed in {index.name} (a stray or extra shard); remove "
            "it or re-export the checkpoint"
        )
    return [path / name for name in shards]


def read_index(index: Path) -> dict[str, str]:
    """The ``weight_map`` of a sharded checkpoint's index (tensor name -> plain file name)."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(
            f"{index}: unreadable ({type(e).__name__}: {e}); the checkpoint is damaged"
        ) from None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: 'weight_map' must map tensor names to shard files")
    for k, v in weight_map.items():
        if not isinstance(v, str) or Path(v).name != v or not v.endswith(".safetensors"):
            raise CheckpointError(f"{index}: tensor {k} maps to {v!r}, not a shard file name")
    return weight_map


def read_meta(path: str | Path) -> dict[str, Any]:
    """The checkpoint's ``slim.json``; raises CheckpointError naming the file for anything else."""
    path = Path(path)
    f = path / META
    if not f.is_file():
        raise CheckpointError(
            f"{path} is not a slim-lightning checkpoint (no {META}); compress.py writes one to "
            "RUN_DIR/packed"
        )
    try:
        meta = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(
            f"{f}: unreadable ({type(e).__name__}: {e}); the checkpoint is damaged"
        ) from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{f}: not a JSON object; the checkpoint is damaged")
    version = meta.get("version", -1)
    if meta.get("format") != FORMAT or not isinstance(version, int) or version != VERSION:
        raise CheckpointError(
            f"{f}: format {meta.get('format')!r} version {meta.get('version')!r}; "
            f"this slim-lightning reads {FORMAT!r} version {VERSION}"
        )
    layers, tied = meta.get("layers"), meta.get("tied", [])
    if (
        not isinstance(layers, dict)
        or not layers
        or not all(isinstance(v, dict) for v in layers.values())
    ):
        raise CheckpointError(f"{f}: 'layers' must map module names to layer metadata")
    if not isinstance(tied, list) or not all(isinstance(k, str) for k in tied):
        raise CheckpointError(f"{f}: 'tied' must be a list of tensor names")
    if meta.get("dtype", "float32") not in ("float32", "float16", "bfloat16"):
        raise CheckpointError(
            f"{f}: dtype {meta.get('dtype')!r}; allowed float32, float16, bfloat16"
        )
    return meta


def verify_files(path: str | Path, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """Checks every file against the sha256 that ``slim.json`` recorded when it was written.

    Returns:
        The metadata. Raises CheckpointError naming the first missing or changed file.
    """
    from ..io import first_digest_mismatch

    path = Path(path)
    meta = read_meta(path) if meta is None else meta
    files = meta.get("files")
    if not isinstance(files, dict) or not (WEIGHTS in files or INDEX in files):
        raise CheckpointError(
            f"{path / META}: no file digests (written by an older slim-lightning); load it with "
            "verify=False to trust it as is"
        )
    bad = first_digest_mismatch(path, files)
    if bad is None and INDEX in files:  # every shard the (verified) index lists is recorded
        unrecorded = sorted(set(read_index(path / INDEX).values()) - set(files))
        if unrecorded:
            raise CheckpointError(
                f"{path / unrecorded[0]}: {INDEX} lists it but {META} records no digest for it "
                "(the index was replaced); re-export the checkpoint"
            )
    if bad is not None and bad[1] == "missing":
        raise CheckpointError(
            f"{bad[0]}: missing (slim.json lists it); the checkpoint is incomplete"
        )
    if bad is not None:
        raise CheckpointError(
            f"{bad[0]}: sha256 differs from the one recorded in {META} when it was written (the "
            "file is corrupt or was edited); re-export it, or pass verify=False to load anyway"
        )
    return meta


# safetensors' own dtype names and their order (the Rust ``Dtype`` enum; tensors are laid out
# from the highest to the lowest, ties by name): the writer (shards_out) and the readers share it
_ST_NAMES: dict[torch.dtype, tuple[int, str]] = {
    torch.bool: (0, "BOOL"),
    torch.uint8: (4, "U8"),
    torch.int8: (5, "I8"),
    torch.int16: (9, "I16"),
    torch.uint16: (10, "U16"),
    torch.float16: (11, "F16"),
    torch.bfloat16: (12, "BF16"),
    torch.int32: (13, "I32"),
    torch.uint32: (14, "U32"),
    torch.float32: (15, "F32"),
    torch.float64: (16, "F64"),
    torch.int64: (17, "I64"),
    torch.uint64: (18, "U64"),
}
_ST_DTYPES = {name: dt for dt, (_, name) in _ST_NAMES.items()}


def _st_dtype(name: str) -> Any:
    return _ST_DTYPES.get(name, name)


def package_versions() -> dict[str, str]:
    """Versions of the packages that determine a run's numbers."""
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in (
        "slim-lightning",
        "torch",
        "transformers",
        "lightning",
        "triton",
        "datasets",
        "hydra-core",
        "safetensors",
        "wandb",
        "bitsandbytes",
        "lm-eval",
    ):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def linear_sizes(
    model: torch.nn.Module, offloaded: dict[str, dict] | None = None
) -> dict[str, float]:
    """Packed bytes of the compressed linears vs their fp16 size, from the modules in memory
    (an estimate used only when nothing is written; written runs report the file's bytes).

    ``offloaded``: ``{name: SLiMLinear.meta()}`` of compressed layers that are not in memory
    (a streaming run's blocks on disk), counted from their metadata (nothing is read).
    """
    from ..nn.linear import SLiMLinear

    packed = dense = 0
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    mods = [m for m in model.modules() if isinstance(m, SLiMLinear) and m is not head]
    for meta in (offloaded or {}).values():
        mods.append(SLiMLinear.from_meta(meta, device="meta"))  # shapes and dtypes only
    for mod in mods:
        packed += mod.packed_nbytes()
        dense += mod.in_features * mod.out_features * 2
    if dense == 0:
        return {}
    return {"packed_bytes": packed, "dense_fp16_bytes": dense, "ratio_vs_fp16": packed / dense}
