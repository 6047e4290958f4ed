"""Streaming compression: models larger than host memory (``engine.streaming=true``).

The model is built on the meta device (no weights); only what runs outside the decoder blocks
(embeddings, final norm, LM head, rotary buffers) is read from the checkpoint's safetensors shards
up front. The calibration engine then calls :meth:`StreamingSource.block_hook` for each block:
``load`` reads block i from the shards just before it is processed, ``resume`` installs a block
whose compressed layers come from the resume state (``calib_state``) without reading its dense
linear weights, and ``done`` checks that no dense linear weight of the finished block is left.
Each tensor is read alone (``safe_open(...).get_tensor(key)``), so the host holds at most: the
non-block tensors, one dense block (plus its compression work copies) and the packed blocks
before it.

Every tensor goes through the same steps as in the non-streaming load: cast to ``model.dtype``,
the NaN/Inf check, and ``round_uncompressed``'s rounding to the export dtype for everything the
packed checkpoint stores uncompressed, so a streaming run's packed output is bit-identical to a
non-streaming one's.

Sources: a local HF directory, a hub id (``snapshot_download`` of the json, safetensors and
tokenizer files) and GGUF files (through the fp32 conversion cache of ``models._load_gguf``: the
first run of a GGUF file still converts it in memory once). Checkpoints without safetensors
(``pytorch_model.bin``) are refused with a ConfigError.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..memory import mmap_large_allocations, return_freed_memory
from ..models.shards import ShardReader, checkpoint_dir
from .meta_tensors import (
    _LOW,
    _assign,
    _drop_storage,
    _owner,
    _tensor_names,
    _upcast_output,
    _upcast_weight,
)

log = logging.getLogger(__name__)


class StreamingSource:
    """A meta-device model whose tensors are read from safetensors shards on demand.

    Args:
        cfg: the ``ModelConfig``.
        config: the model's HF config.
        export_dtype: storage dtype of the uncompressed tensors (``round_uncompressed``).
        tokenizer: stored beside a new GGUF conversion cache entry.
    """

    def __init__(self, cfg: Any, config: Any, export_dtype: str, tokenizer: Any = None):
        from ..dtypes import FLOAT_DTYPES

        self.cfg, self.config, self.export_dtype = cfg, config, export_dtype
        self.dtype = FLOAT_DTYPES[cfg.dtype]
        mmap_large_allocations()  # block-sized buffers go back to the OS when freed
        self.dir = checkpoint_dir(cfg, tokenizer)

        if cfg.source.kind == "gguf":  # the conversion cache's own config
            from transformers import AutoConfig

            self.config = AutoConfig.from_pretrained(str(self.dir), trust_remote_code=False)
        self.model: nn.Module | None = None
        self.reader: ShardReader | None = None
        # keep 16-bit checkpoint tensors in 16 bits where that is exact (a wider model.dtype
        # holds the same values): block linears when they are packed (set by compress_model)
        # and the vocabulary tables; they compute in model.dtype through upcast hooks
        self.low_precision_linears = False
        # where finished blocks go while later ones are compressed (set by compress_model)
        self.offload_dir: Path | None = None
        # leave them there after compression (the caller evaluates and exports block by block,
        # calling reinstall_all only where it needs the whole model)
        self.keep_offloaded = False
        self._offloaded: dict[int, dict[str, dict]] = {}  # block -> its SLiMLinear metas

    # -- skeleton -------------------------------------------------------------------------------
    def build(self) -> nn.Module:
        """The model with everything but its decoder blocks materialised (blocks on meta)."""
        import copy

        from transformers import AutoModelForCausalLM

        from ..models.arch import get_arch, get_blocks
        from ..models.load import _dtype_kw

        config = copy.deepcopy(self.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, **_dtype_kw(self.dtype))
        self.model = model
        self.arch = get_arch(model, self.cfg.arch, self.cfg.ignore)
        self.blocks = get_blocks(model, self.arch)
        self.reader = ShardReader(
            self.dir,
            getattr(model, "base_model_prefix", "model") or "model",
            what=str(self.cfg.path),
        )
        prefix = self.arch.blocks_path + "."
        saved, volatile = _tensor_names(model)
        outside = [n for n in saved if not n.startswith(prefix)]
        self._materialise(model, outside, rounded=True, low=self._vocab_names())
        self._tie(model)
        for n in volatile:  # non-persistent buffers (rotary inv_freq): rebuilt by their module
            if not n.startswith(prefix):
                self._rebuild_module(model, n.rpartition(".")[0])
        left = [n for n, t in model.state_dict().items() if not n.startswith(prefix) and t.is_meta]
        if left:
            raise ValueError(f"streaming: the checkpoint in {self.dir} has no tensors {left[:8]}")
        # as models._finish, without its model.to(dtype): every tensor read is model.dtype
        # already, except the 16-bit vocabulary tables, which stay 16-bit
        model.eval()
        model.config.use_cache = False
        return model

    def _vocab_modules(self) -> list[nn.Module]:
        model = self.model
        mods = [model.get_input_embeddings()]
        if hasattr(model, "get_output_embeddings") and model.get_output_embeddings() is not None:
            mods.append(model.get_output_embeddings())
        return mods

    def park(self) -> None:
        """Frees the input embedding and LM head while the blocks are compressed (only the
        captured block-0 inputs are needed then); :meth:`restore` reads them back."""
        for mod in self._vocab_modules():
            _drop_storage(mod, buffers=False)  # (a scaled embedding keeps its factor)
        return_freed_memory()

    def restore(self, input_only: bool = False) -> None:
        """Reads back everything outside the blocks that :meth:`park` freed (and re-ties).

        ``input_only``: just the input embedding when the LM head is a table of its own (it
        stays parked until the next call), so a caller that replaces the tables one at a time
        never holds both 16-bit tables."""
        prefix = self.arch.blocks_path + "."
        model = self.model
        names = [n for n, p in model.named_parameters() if p.is_meta and not n.startswith(prefix)]
        input_only = input_only and not getattr(model.config, "tie_word_embeddings", False)
        if input_only:
            emb = model.get_input_embeddings()
            mine = {n for n, m in model.named_modules() if m is emb}
            names = [n for n in names if n.rpartition(".")[0] in mine]
        self._materialise(model, names, rounded=True, low=self._vocab_names())
        if not input_only:  # (the parked head is read, or tied, by the next call)
            self._tie(model)

    def _vocab_names(self) -> set[str]:
        mods = {id(m) for m in self._vocab_modules()}
        return {n for n, m in self.model.named_modules() if id(m) in mods}

    def upcast_vocab(self) -> None:
        """Widens 16-bit vocabulary tables to ``model.dtype`` (what a non-streaming load holds)
        and removes their upcast hooks; a no-op for tables already replaced (quantised)."""
        wide: dict[int, nn.Parameter] = {}  # a tied table is widened once, shared again
        for mod in self._vocab_modules():
            w = getattr(mod, "weight", None)  # (quantised modules have packed buffers instead)
            if isinstance(w, torch.Tensor) and w.dtype in _LOW and w.dtype != self.dtype:
                if id(w) not in wide:
                    wide[id(w)] = nn.Parameter(w.detach().to(self.dtype), w.requires_grad)
                mod.weight = wide[id(w)]
            for h in mod.__dict__.pop("_slim_upcast_hooks", []):
                h.remove()

    def _low_ok(self, raw: torch.dtype, rounded: bool) -> bool:
        """Whether a ``raw``-typed tensor can stay in ``raw`` (its ``model.dtype`` values are
        exactly the 16-bit ones, after the export rounding when ``rounded``)."""
        if raw not in _LOW or self.dtype != torch.float32:
            return False
        return not rounded or self.export_dtype in ("float32", str(raw).removeprefix("torch."))

    def _hook_low(self, mod: nn.Module) -> None:
        """Upcast hooks on ``mod`` (a linear or an embedding with a 16-bit weight)."""
        if "_slim_upcast_hooks" in mod.__dict__:
            return
        if isinstance(mod, nn.Embedding):
            hooks = [mod.register_forward_hook(_upcast_output(self.dtype))]
        else:
            pre, post = _upcast_weight(self.dtype)
            hooks = [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
        mod.__dict__["_slim_upcast_hooks"] = hooks

    def _tie(self, model: nn.Module) -> None:
        out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if out_emb is not None and out_emb.weight.is_meta:
            if not getattr(model.config, "tie_word_embeddings", False):
                raise ValueError(f"streaming: the checkpoint in {self.dir} has no LM head weight")
            out_emb.weight = model.get_input_embeddings().weight

    def _rebuild_module(self, root: nn.Module, path: str) -> None:
        old = root.get_submodule(path)
        if not any(b.is_meta for b in old.buffers(recurse=False)):
            return
        try:
            with torch.device("cpu"):
                new = type(old)(config=root.config)
        except TypeError:  # not built from a config (Gemma's scaled embedding): copy the buffers
            self._buffers_from_donor(root, path, old)
            return
        new.to(self.dtype)  # as _finish's model.to(dtype) does to every floating buffer
        root.set_submodule(path, new)

    def _buffers_from_donor(self, root: nn.Module, path: str, old: nn.Module) -> None:
        """Fills ``old``'s meta buffers from the same module of a model built with real buffers
        and meta parameters (``meta_tensors.parameters_on_meta``, built once)."""
        from transformers import AutoModelForCausalLM

        from ..models.arch import get_arch
        from ..models.load import _dtype_kw
        from .meta_tensors import parameters_on_meta

        if getattr(self, "_donor", None) is None:
            config = copy.deepcopy(self.config)
            if hasattr(config, "quantization_config"):
                del config.quantization_config
            with parameters_on_meta():
                self._donor = AutoModelForCausalLM.from_config(config, **_dtype_kw(self.dtype))
            get_arch(self._donor)  # (the same module tree as the run's model)
        if root is not self.model:
            i = next(k for k, b in enumerate(self.blocks) if b is root)
            path = f"{self.arch.blocks_path}.{i}.{path}"
        donor = self._donor.get_submodule(path)
        for name, b in list(old._buffers.items()):
            if b is not None and b.is_meta:
                t = donor._buffers[name]
                old._buffers[name] = t.to(self.dtype) if t.is_floating_point() else t.clone()

    def _materialise(
        self,
        root: nn.Module,
        names: list[str],
        *,
        rounded: bool,
        skip: set = frozenset(),
        low: set = frozenset(),
    ) -> None:
        """Reads ``names`` (relative to ``root``) into ``root`` as ``model.dtype`` tensors,
        checking them for NaN/Inf and rounding the uncompressed ones to the export dtype.

        The weights of the modules named in ``low`` stay in their 16-bit checkpoint dtype when
        that is exact (``_low_ok``) and compute through upcast hooks.
        """
        from ..dtypes import FLOAT_DTYPES

        base = "" if root is self.model else f"{self.arch.blocks_path}.{self._current}."
        rdt = FLOAT_DTYPES[self.export_dtype] if self.export_dtype != "float32" else None
        for full, t in self.reader.read([base + n for n in names if n not in skip]):
            n = full[len(base) :]
            if t.is_floating_point():
                raw = t.dtype
                mod_name, _, attr = n.rpartition(".")
                if attr == "weight" and mod_name in low and self._low_ok(raw, rounded):
                    self._check_finite(full, t)
                    _assign(root, n, t)
                    self._hook_low(root.get_submodule(mod_name))
                    continue
                t = t.to(self.dtype)
                self._check_finite(full, t)
                if rounded and rdt is not None and raw != rdt:  # (raw == rdt: exact already)
                    t = t.to(rdt).to(self.dtype)
            _assign(root, n, t)

    def _check_finite(self, full: str, t: torch.Tensor, step: int = 1 << 22) -> None:
        flat = t.reshape(-1)  # checked in steps: no tensor-sized bool mask
        bad = sum(
            int((~torch.isfinite(flat[s : s + step])).sum()) for s in range(0, flat.numel(), step)
        )
        if bad:
            raise ValueError(
                f"model.path={self.cfg.path}: tensor {full} {tuple(t.shape)} has "
                f"{bad} NaN/Inf values; the checkpoint is corrupt (nothing was compressed)"
            )

    # -- the engine's hook ----------------------------------------------------------------------
    def block_hook(self, i: int, block: nn.Module, stage: str) -> None:
        """``CalibrationEngine``'s per-block hook.

        Stages: ``load`` (block i from the shards, before it is processed), ``resume`` (its
        compressed layers come from the resume state: everything but the compressed linears'
        weights is read; those get uninitialised storage that the install replaces) and
        ``done`` (after block i is installed and committed: freed memory goes back to the OS),
        ``offload`` (after ``done`` when the engine offloads: the finished block is written to
        ``offload_dir`` and becomes a meta skeleton again) and ``reload`` (reads it back).
        """
        if stage in ("load", "resume"):
            low = self.low_precision_linears and stage == "load"
            self.read_block(i, block, resume=stage == "resume", low=low)
        elif stage == "done":  # (the install dropped each replaced dense linear already)
            return_freed_memory()
        elif stage == "offload":
            self.offload_block(i, block)
        elif stage == "reload":
            self.reload_block(i, block)
        else:
            raise ValueError(f"block_hook: unknown stage {stage!r}")

    def read_block(self, i: int, block: nn.Module, *, resume: bool = False, low: bool = False):
        """Materialises block ``i`` from the shards (``resume``: all but its linears' weights,
        which get uninitialised storage for an install to replace; ``low``: 16-bit linears,
        computing through upcast hooks)."""
        self._current = i
        linears = {f"{n}.weight" for n in self.arch.linear_names}
        saved, volatile = _tensor_names(block)
        skip = linears if resume else set()
        # linear weights stay unrounded (they are compressed); the rest is rounded like
        # round_uncompressed does
        self._materialise(
            block,
            [n for n in saved if n in linears],
            rounded=False,
            skip=skip,
            low=set(self.arch.linear_names) if low else set(),
        )
        self._materialise(block, [n for n in saved if n not in linears], rounded=True)
        for n in volatile:
            self._rebuild_module(block, n.rpartition(".")[0])
        if resume:
            for n in linears:
                mod, attr = _owner(block, n)
                w = mod._parameters[attr]
                mod._parameters[attr] = nn.Parameter(
                    torch.empty(w.shape, dtype=self.dtype), requires_grad=w.requires_grad
                )
        left = [n for n, t in block.state_dict().items() if t.is_meta]
        if left:
            raise ValueError(
                f"streaming: the checkpoint in {self.dir} has no tensors "
                f"{[f'{self.arch.blocks_path}.{i}.{n}' for n in left[:8]]}"
            )

    def offload_block(self, i: int, block: nn.Module) -> None:
        """Writes finished block ``i`` (packed layers and all) to ``offload_dir`` and evicts it."""
        from ..io import atomic_save_tensors, make_dir
        from ..nn.linear import SLiMLinear

        if self.offload_dir is None:
            raise ValueError("streaming: offload_block needs offload_dir")
        make_dir(self.offload_dir)
        self._offloaded[i] = {
            n: block.get_submodule(n).meta()
            for n in self.arch.linear_names
            if isinstance(block.get_submodule(n), SLiMLinear)
        }
        atomic_save_tensors(block.state_dict(), self.offload_file(i))
        self.evict_block(block)

    def reload_block(self, i: int, block: nn.Module, keep: bool = False) -> None:
        """Reads back block ``i`` as ``offload_block`` wrote it (bit for bit); ``keep``: it
        stays offloaded too (a streamed evaluation evicts it again after use)."""
        from ..io import load_tensors
        from ..nn.linear import SLiMLinear

        metas = self._offloaded[i] if keep else self._offloaded.pop(i)
        for n, meta in metas.items():
            block.set_submodule(n, SLiMLinear.from_meta(meta, device="meta"))
        path = self.offload_file(i)
        block.load_state_dict(load_tensors(path), strict=True, assign=True)
        if not keep:
            path.unlink()  # (a later resume re-installs from the resume state)
        _, volatile = _tensor_names(block)
        for n in volatile:
            self._rebuild_module(block, n.rpartition(".")[0])

    @property
    def offloaded(self) -> bool:
        """Whether finished (compressed) blocks wait on disk (``keep_offloaded``)."""
        return bool(self._offloaded)

    def read_for_eval(self, i: int, block: nn.Module) -> None:
        """Block ``i`` as the model now has it: compressed from its offload file when finished
        blocks wait on disk, else dense from the shards (16-bit linears)."""
        if i in self._offloaded:
            self.reload_block(i, block, keep=True)
        else:
            self.read_block(i, block, low=True)

    def reinstall_all(self, keep: bool = False) -> None:
        """Reads every offloaded block back in (whole and packed again; ``keep``: files kept)."""
        for i in sorted(self._offloaded):
            self.reload_block(i, self.blocks[i], keep=keep)

    @property
    def offloaded_layers(self) -> dict[int, dict[str, dict]]:
        """``{block: {layer name in it: SLiMLinear.meta()}}`` of the blocks waiting on disk."""
        return self._offloaded

    def offload_file(self, i: int) -> Path:
        return self.offload_dir / f"block_{i:04d}.safetensors"  # block i's state dict

    @contextmanager
    def opened(self, i: int) -> Iterator[nn.Module]:
        """Block ``i`` for a while: read back from its offload file (kept) and evicted on exit."""
        block = self.blocks[i]
        if i not in self._offloaded:
            yield block
            return
        self.reload_block(i, block, keep=True)
        try:
            yield block
        finally:
            self.evict_block(block)

    def discard_offloaded(self) -> None:
        """Deletes the offload files (outputs written; a resume re-installs from calib_state)."""
        for i in sorted(self._offloaded):
            self.offload_file(i).unlink(missing_ok=True)
        self._offloaded.clear()

    def evict_block(self, block: nn.Module) -> None:
        """Back to a meta skeleton (compressed linears become meta ``nn.Linear`` again, as
        before the block was read), so that ``read_block`` can materialise it later."""
        for n in self.arch.linear_names:
            m = block.get_submodule(n)
            if not isinstance(m, nn.Linear):
                with torch.device("meta"):
                    new = nn.Linear(
                        m.in_features, m.out_features, bias=m.bias is not None, dtype=self.dtype
                    )
                block.set_submodule(n, new)
        for m in block.modules():
            _drop_storage(m)
            for h in m.__dict__.pop("_slim_upcast_hooks", []):
                h.remove()
        return_freed_memory()


def load_streaming(
    cfg: Any, config: Any, export_dtype: str, tokenizer: Any
) -> tuple[nn.Module, StreamingSource]:
    """The meta skeleton with its non-block tensors read, and the source that streams blocks."""
    src = StreamingSource(cfg, config, export_dtype, tokenizer)
    model = src.build()
    log.info(
        "engine.streaming: built %s on the meta device; decoder blocks are read from %s one at "
        "a time",
        type(model).__name__,
        src.dir,
    )
    return model, src
