"""Writing a packed checkpoint whose decoder blocks wait on disk (a streaming run's export).

``save_streaming`` writes the same checkpoint as ``save.save_compressed`` would write from the
whole model, but never holds more than the non-block tensors (embeddings, final norm, LM head)
and one decoder block: each block is opened from where it waits (``OffloadedBlocks.open``),
converted exactly as ``save_compressed`` converts it (``save.stored_tensor``: same keys and
dtypes, 4-bit adapters as their codes, off-grid adapters re-quantised first), written to a shard
of its own and closed again.

Layout: Hugging Face's sharded safetensors (``shards_out``): ``n = blocks + 1`` shards,
``model-00001-of-0000n.safetensors`` holds everything outside the decoder blocks (tied keys
dropped, as in the one-file layout) and ``model-<i + 2>-of-0000n.safetensors`` decoder block
``i``; ``model.safetensors.index.json`` maps every tensor to its shard. ``slim.json`` and
``config.json`` have the content the one-file writer gives them: ``base_sha256`` is fed layer by
layer in ``nn.adapters.state_hashes``' order (the blocks are visited in the name order of their
layers: ``layers.0, layers.1, layers.10, ...``; the shard numbers follow the block numbers),
the sizes are added up from the tensors written (``layout.SizeTally``; ``checkpoint_bytes`` is
the bytes of all shards, each with its own header), and ``files`` takes each shard's sha256
as it is written (only the small files are read back). The directory is written under a
temporary name and renamed when complete (``io.atomic_dir``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ..io import atomic_dir, dir_sha256, fault_point
from .layout import FORMAT, INDEX, META, SizeTally
from .save import (
    _tied_keys,
    checkpoint_meta,
    packed_embeddings,
    storage_dtype,
    stored_tensor,
    write_config,
)
from .shards_out import ShardedWriter, tensor_nbytes


@dataclass(frozen=True)
class OffloadedBlocks:
    """The decoder blocks of a model that holds them as meta skeletons.

    Attributes:
        path: the block list's module path (``model.layers``).
        count: the number of blocks.
        open: ``open(i)`` is a context manager that yields block ``i`` as the whole model would
            hold it (packed layers installed) and frees it again on exit.
    """

    path: str
    count: int
    open: Callable[[int], AbstractContextManager[nn.Module]]

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
) -> Path:
    """``save_compressed`` of ``model`` whose blocks are opened one at a time (see the module
    docstring for the layout). Arguments as ``save_compressed``'s."""
    from ..nn.adapters import hash_base
    from ..nn.linear import SLiMLinear

    out_dir = Path(out_dir)
    prefix = blocks.path + "."
    resident = {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, SLiMLinear) and not n.startswith(prefix)
    }
    compute, first_in = _compute_dtype(model, blocks)
    if compute is None and dtype is None:  # the model's first parameter is in a block
        with blocks.open(first_in) as block:
            compute = _first_dtype(block)
    store = storage_dtype(dtype, compute or "float32")
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
    n_shards = blocks.count + 1
    found = False
    with atomic_dir(out_dir) as tmp:
        writer = ShardedWriter(tmp, n_shards, {"format": FORMAT}, out_dir.name)
        tensors = {}
        for k, v in sd.items():
            t = None if k in tied_to else stored_tensor(k, v, resident, store, layers)
            if t is not None:
                tensors[k] = t
        writer.write(1, tensors)
        rest = {n: m for n, m in model.named_modules() if not n.startswith(prefix)}
        sized = {n for n, m in resident.items() if m is not head}
        tally.add(rest.items(), sd.items(), _nbytes(tensors), sized)
        del tensors, sd
        for key, i in visit:
            if i < 0:
                hash_base(base, key, resident[key])
                continue
            with blocks.open(i) as block:
                if i == first_in:
                    compute = _first_dtype(block) or compute
                full = blocks.name(i)
                mods = {
                    f"{full}.{n}": m for n, m in block.named_modules() if isinstance(m, SLiMLinear)
                }
                found = found or bool(mods)
                for m in mods.values():
                    if not m.adapters_on_grid():
                        m.requantize_adapters()
                for name in sorted(mods):
                    hash_base(base, name, mods[name])
                layers.update({n: m.meta() for n, m in mods.items()})
                state = [(f"{full}.{k}", v) for k, v in block.state_dict().items()]
                tensors = {}
                for k, v in state:
                    t = stored_tensor(k, v, mods, store, layers)
                    if t is not None:
                        tensors[k] = t
                writer.write(i + 2, tensors)
                named = [(f"{full}.{n}" if n else full, m) for n, m in block.named_modules()]
                tally.add(named, state, _nbytes(tensors), set(mods))
                del tensors, state, named, mods
        if not (found or resident):
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
            compute or store,
            base.hexdigest(),
            plan=plan,
            results=results,
            calibration=calibration,
        )
        write_config(tmp, model, tokenizer, meta, out_dir.name)
        meta["size"] = tally.result(sum(writer.sizes.values()))
        # the shards' digests were taken as they were written; the small files are read
        small = dir_sha256(tmp, exclude=(META, *writer.digests))
        meta["files"] = dict(sorted({**small, **writer.digests}.items()))
        fault_point(f"write {out_dir.name}/{META}")
        (tmp / META).write_text(json.dumps(meta, indent=2, default=str))
    return out_dir


def _nbytes(tensors: dict[str, Any]) -> list[tuple[str, int]]:
    return [(k, tensor_nbytes(t)) for k, t in tensors.items()]


def _first_dtype(module: nn.Module) -> str | None:
    p = next(module.parameters(), None)
    return None if p is None else str(p.dtype).removeprefix("torch.")


def _compute_dtype(model: nn.Module, blocks: OffloadedBlocks) -> tuple[str | None, int]:
    """The dtype of the whole model's first parameter (``save_compressed``'s ``compute_dtype``)
    when it is outside the blocks, else ``(None, i)`` with ``i`` the block it is in (the
    skeleton's meta stand-ins do not tell: a packed layer's first parameter may be another)."""
    prefix = blocks.path + "."
    name, p = next(model.named_parameters(), (None, None))
    if p is None:
        raise ValueError("save_compressed: the model has no parameters")
    if not name.startswith(prefix):
        return str(p.dtype).removeprefix("torch."), -1
    return None, int(name[len(prefix) :].split(".", 1)[0])


__all__ = ["INDEX", "OffloadedBlocks", "save_streaming"]
