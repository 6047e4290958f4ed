"""Writing a packed checkpoint whose decoder blocks wait on disk (a streaming run's export).

``save_streaming`` writes the same checkpoint as ``save.save_compressed`` would write from the
whole model, but holds only the non-block tensors (embeddings, final norm, LM head) and, at any
moment, one compressed layer of one block (or one of its tensors):

1. for each block, its layers are read one at a time from where the block waits (``BlockTensors``:
   a streaming run's offload file, read with ``pread`` into memory that is freed with the
   tensors), each as a ``SLiMLinear``: off-grid adapters are re-quantised (the new codes are
   kept, they are small), the packed base is fed to ``base_sha256`` and the layer's metadata
   taken, exactly as ``save_compressed`` does on the whole model;
2. the block's shard is then written tensor by tensor (``shards_out.write_planned``): its header
   comes from the stored dtypes and shapes (``save.stored_dtype``), each tensor is read, converted
   (``save.stored_tensor``: same keys and dtypes, 4-bit adapters as their codes) and written.

Layout: Hugging Face's sharded safetensors (``shards_out``): ``n = blocks + 1`` shards,
``model-00001-of-0000n.safetensors`` holds everything outside the decoder blocks (tied keys
dropped, as in the one-file layout) and ``model-<i + 2>-of-0000n.safetensors`` decoder block
``i``; ``model.safetensors.index.json`` maps every tensor to its shard; every shard has the bytes
``safetensors.torch.save_file`` writes for its tensors. ``slim.json`` and ``config.json`` have the
content the one-file writer gives them: ``base_sha256`` is fed layer by layer in
``nn.adapters.state_hashes``' order (the blocks are visited in the name order of their layers:
``layers.0, layers.1, layers.10, ...``; the shard numbers follow the block numbers), the sizes are
added up from the tensors written (``layout.SizeTally``; ``checkpoint_bytes`` is the bytes of all
shards, each with its own header), and ``files`` takes each shard's sha256 as it is written (only
the small files are read back). The directory is written under a temporary name and renamed when
complete (``io.atomic_dir``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from ..io import atomic_dir, dir_sha256, fault_point
from .layout import FORMAT, META, SizeTally, _st_dtype
from .save import (
    _tied_keys,
    checkpoint_meta,
    packed_embeddings,
    storage_dtype,
    stored_dtype,
    stored_tensor,
    write_config,
)
from .shards_out import ShardedWriter


class BlockTensors(Protocol):
    """One decoder block's state dict (block-relative keys) and its compressed layers."""

    layers: dict[str, dict]  # block-relative layer name -> SLiMLinear.meta()

    def header(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """Every tensor's dtype and shape (nothing read)."""
        ...

    def read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """The named tensors (memory the caller frees by dropping them)."""
        ...


@dataclass(frozen=True)
class FileBlock:
    """A block's tensors in a safetensors file (a streaming run's offload file)."""

    path: Path
    layers: dict[str, dict]

    def header(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        from safetensors import safe_open

        with safe_open(str(self.path), framework="pt") as f:
            out = {}
            for k in f.keys():
                sl = f.get_slice(k)
                out[k] = (_st_dtype(sl.get_dtype()), tuple(sl.get_shape()))
        return out

    def read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        # pread: each tensor in memory of its own (a mapped file stays resident as long as
        # any tensor read from it lives); older safetensors map the file, closed right after
        try:
            f = safe_open(str(self.path), framework="pt", backend="pread")
        except TypeError:
            f = safe_open(str(self.path), framework="pt")
        with f:
            return {k: f.get_tensor(k) for k in keys}


@dataclass(frozen=True)
class ModuleBlock:
    """A block held in memory (its layers re-quantised in place, like the one-file writer's)."""

    module: nn.Module

    @property
    def layers(self) -> dict[str, dict]:
        from ..nn.linear import SLiMLinear

        return {n: m.meta() for n, m in self.module.named_modules() if isinstance(m, SLiMLinear)}

    def header(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        return {k: (v.dtype, tuple(v.shape)) for k, v in self.module.state_dict().items()}

    def read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        sd = self.module.state_dict()
        return {k: sd[k] for k in keys}


@dataclass(frozen=True)
class OffloadedBlocks:
    """The decoder blocks of a model that holds them as meta skeletons.

    Attributes:
        path: the block list's module path (``model.layers``).
        count: the number of blocks.
        open: ``open(i)`` is a context manager that yields block ``i`` as the whole model would
            hold it (packed layers installed) and frees it again on exit.
        tensors: ``tensors(i)``: block ``i``'s ``BlockTensors`` (read a layer at a time).
    """

    path: str
    count: int
    open: Callable[[int], AbstractContextManager[nn.Module]]
    tensors: Callable[[int], BlockTensors]

    def name(self, i: int) -> str:
        return f"{self.path}.{i}"


def save_streaming(
    model: nn.Module,
    blocks: OffloadedBlocks,
    tokenizer: Any,
    out_dir: str | Path,
    *,
    plan: Any = None,
    results: dict[str, Any] | None = None,
    calibration: str | None = None,
    dtype: str | None = None,
    source_sha256: str | None = None,
) -> Path:
    """``save_compressed`` of ``model`` whose blocks wait on disk (see the module docstring for
    the layout and the order of work). Arguments as ``save_compressed``'s."""
    from ..nn.adapters import hash_base
    from ..nn.linear import SLiMLinear

    out_dir = Path(out_dir)
    prefix = blocks.path + "."
    resident = {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, SLiMLinear) and not n.startswith(prefix)
    }
    compute = _compute_dtype(model, blocks)
    store = storage_dtype(dtype, compute)
    for m in resident.values():
        if not m.adapters_on_grid():
            m.requantize_adapters()
    layers = {n: m.meta() for n, m in resident.items()}
    head = model.get_output_embeddings()
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith(prefix)}
    tied_to = _tied_keys(model, sd)
    tally = SizeTally(tied_to)
    # state_hashes' order: every layer by name; a block's layers are contiguous in it
    visit = sorted(
        [(blocks.name(i) + ".", i) for i in range(blocks.count)] + [(n, -1) for n in resident]
    )
    base = hashlib.sha256()
    with atomic_dir(out_dir) as tmp:
        writer = ShardedWriter(tmp, blocks.count + 1, {"format": FORMAT}, out_dir.name)
        tensors = {}
        for k, v in sd.items():
            t = None if k in tied_to else stored_tensor(k, v, resident, store, layers)
            if t is not None:
                tensors[k] = t
        writer.write(1, tensors)
        rest = [(n, m) for n, m in model.named_modules() if not n.startswith(prefix)]
        sized = {n for n, m in resident.items() if m is not head}
        tally.add(rest, sd.items(), [(k, _nbytes(t)) for k, t in tensors.items()], sized)
        del tensors, sd, rest
        for key, i in visit:
            if i < 0:
                hash_base(base, key, resident[key])
            else:
                src = blocks.tensors(i)
                _write_block(writer, i + 2, blocks.name(i), src, store, layers, base, tally)
        if not layers:
            raise ValueError(
                "save_compressed: the model has no SLiMLinear layers (nothing is packed)"
            )
        writer.finish()
        order = [n for n, _ in model.named_modules() if n in layers]  # the one-file writer's
        meta = checkpoint_meta(
            {n: layers[n] for n in order},
            tied_to,
            packed_embeddings(model),
            store,
            compute,
            base.hexdigest(),
            plan=plan,
            results=results,
            calibration=calibration,
            source_sha256=source_sha256,
        )
        write_config(tmp, model, tokenizer, meta, out_dir.name)
        meta["size"] = tally.result(sum(writer.sizes.values()))
        # the shards' digests were taken as they were written; the small files are read
        small = dir_sha256(tmp, exclude=(META, *writer.digests))
        meta["files"] = dict(sorted({**small, **writer.digests}.items()))
        fault_point(f"write {out_dir.name}/{META}")
        (tmp / META).write_text(json.dumps(meta, indent=2, default=str))
    return out_dir


def _write_block(
    writer: ShardedWriter,
    shard: int,
    full: str,
    src: BlockTensors,
    store: str,
    layers: dict[str, dict],
    base: Any,
    tally: SizeTally,
) -> None:
    """Block ``full``'s layers (hashed, metadata, re-quantised adapters) and then its shard, one
    layer or one tensor in memory at a time (see the module docstring)."""
    from ..nn.adapters import hash_base
    from ..nn.linear import SLiMLinear

    header = src.header()
    mods: dict[str, nn.Module] = {}  # full name -> the layer on the meta device (its metadata)
    fresh: dict[str, torch.Tensor] = {}  # re-quantised adapter codes (block-relative keys)
    for name in sorted(src.layers):  # state_hashes' order within the block
        with _layer(src, name, header) as mod:
            if not mod.adapters_on_grid():
                mod.requantize_adapters()
                fresh.update(
                    {
                        f"{name}.{k}": v
                        for k, v in mod.state_dict().items()
                        if k.startswith("adapter_")
                    }
                )
            hash_base(base, f"{full}.{name}", mod)
            layers[f"{full}.{name}"] = mod.meta()
        mods[f"{full}.{name}"] = SLiMLinear.from_meta(src.layers[name], device="meta")
    plan = {}
    for k, (dtype, shape) in header.items():
        out = stored_dtype(f"{full}.{k}", dtype, mods, store, layers)
        if out is not None:
            plan[f"{full}.{k}"] = (out, shape)

    def fetch(key: str) -> torch.Tensor:
        k = key[len(full) + 1 :]
        t = fresh[k] if k in fresh else src.read([k])[k]
        return t.to(plan[key][0]).contiguous()

    writer.write_planned(shard, plan, fetch)
    state = [
        (f"{full}.{k}", torch.empty(shape, dtype=dt, device="meta"))
        for k, (dt, shape) in header.items()
    ]
    stored = [(k, torch.Size(shape).numel() * dt.itemsize) for k, (dt, shape) in plan.items()]
    tally.add(mods.items(), state, stored, set(mods))


@contextmanager
def _layer(src: BlockTensors, name: str, header: dict) -> Iterator[nn.Module]:
    """Layer ``name`` of a block as a ``SLiMLinear`` holding its stored tensors (read for it)."""
    from ..nn.linear import SLiMLinear

    mod = SLiMLinear.from_meta(src.layers[name], device="meta")
    keys = [k for k in header if k.rpartition(".")[0] == name]
    own = {k[len(name) + 1 :]: v for k, v in src.read(keys).items()}
    mod.load_state_dict(own, strict=True, assign=True)
    del own
    try:
        yield mod
    finally:
        del mod


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _compute_dtype(model: nn.Module, blocks: OffloadedBlocks) -> str:
    """The dtype of the whole model's first parameter (``save_compressed``'s
    ``compute_dtype``); when it is in a block, that block is opened for it (nothing of it is
    touched: a packed layer's first parameter may differ from the skeleton's stand-in)."""
    prefix = blocks.path + "."
    name, p = next(model.named_parameters(), (None, None))
    if p is None:
        raise ValueError("save_compressed: the model has no parameters")
    if name.startswith(prefix):
        with blocks.open(int(name[len(prefix) :].split(".", 1)[0])) as block:
            p = next(block.parameters(), p)
    return str(p.dtype).removeprefix("torch.")
