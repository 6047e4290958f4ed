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

import gc
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ConfigError

log = logging.getLogger(__name__)

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


# -- the checkpoint's shards ----------------------------------------------------------------------
class ShardReader:
    """Reads single tensors from a directory of safetensors shards by model parameter name.

    Handles ``model.safetensors.index.json`` or a single ``model.safetensors`` (or any set of
    ``*.safetensors`` files), and checkpoints saved with or without the base-model prefix
    (``model.layers.0...`` vs ``layers.0...``).
    """

    def __init__(self, directory: str | Path, base_prefix: str = "model", what: str = ""):
        from safetensors import safe_open

        self.dir = Path(directory)
        self.base_prefix = base_prefix
        index = self.dir / INDEX
        self.files: dict[str, str] = {}
        if index.is_file():
            self.files = dict(json.loads(index.read_text())["weight_map"])
        else:
            shards = [self.dir / SINGLE] if (self.dir / SINGLE).is_file() else []
            shards = shards or sorted(self.dir.glob("*.safetensors"))
            for shard in shards:
                with safe_open(str(shard), framework="pt") as f:
                    for k in f.keys():
                        self.files[k] = shard.name
        if not self.files:
            have = sorted(p.name for p in self.dir.iterdir())[:8] if self.dir.is_dir() else []
            raise ConfigError(
                "engine.streaming",
                True,
                f"false for {what or self.dir}: streaming reads one tensor at a time from "
                f"safetensors shards ({SINGLE} or {INDEX}), and this checkpoint has none "
                f"(found: {', '.join(have) or 'nothing'}); convert it with "
                "save_pretrained(safe_serialization=True)",
            )

    def key(self, name: str) -> str | None:
        """The checkpoint key of model tensor ``name`` (None when the checkpoint lacks it)."""
        p = self.base_prefix + "."
        for k in (name, name.removeprefix(p) if name.startswith(p) else p + name):
            if k in self.files:
                return k
        return None

    def read(self, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """Yields ``(name, tensor)`` for the model tensor names present in the checkpoint, one
        at a time: each is read alone (its shard opened for it and closed right after, so no
        mapped shard pages stay resident) and the caller drops it before the next is read."""
        from safetensors import safe_open

        for n in names:
            k = self.key(n)
            if k is not None:
                with safe_open(str(self.dir / self.files[k]), framework="pt") as f:
                    t = f.get_tensor(k)
                yield n, t


def _checkpoint_dir(cfg: Any, tokenizer: Any) -> Path:
    """The local directory of safetensors shards for ``cfg`` (downloading / converting once)."""
    from .models import _gguf_cache, _load_gguf
    from .sources import model_source

    src = model_source(cfg)
    if src.kind == "tiny":
        raise ConfigError(
            "engine.streaming", True, "false for a random tiny model (it has no checkpoint)"
        )
    if src.kind == "dir":
        return Path(src.location)
    if src.kind == "hub":  # pragma: no cover - needs the network
        from huggingface_hub import snapshot_download

        patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "*.txt"]
        return Path(snapshot_download(cfg.path, revision=cfg.revision, allow_patterns=patterns))
    cache = _gguf_cache(cfg, src)
    if cache is None:
        raise ConfigError(
            "engine.streaming",
            True,
            "false for a GGUF file unless model.cache_gguf=true (streaming reads the cached "
            "safetensors conversion)",
        )
    if not (cache / "config.json").is_file():
        log.warning(
            "streaming: converting %s once into %s (this first conversion holds the whole "
            "dequantised model in memory)",
            src.gguf_file,
            cache,
        )
        del_model = _load_gguf(cfg, src, tokenizer)
        del del_model
        gc.collect()
        if not (cache / "config.json").is_file():
            raise ConfigError("model.cache_dir", cfg.cache_dir, "a writable cache directory")
    return cache


def check_streamable(cfg: Any) -> None:
    """Raises the ConfigError of a checkpoint streaming cannot read (no safetensors), without
    reading weights (local directories only; hub ids and GGUF files are checked at load)."""
    from .sources import model_source

    src = model_source(cfg)
    if src.kind in ("tiny", "dir"):
        if src.kind == "dir":
            ShardReader(src.location, what=f"model.path={cfg.path}")
        else:
            _checkpoint_dir(cfg, None)


# -- materialising meta tensors -------------------------------------------------------------------
def _owner(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    mod_path, _, attr = name.rpartition(".")
    return (root.get_submodule(mod_path) if mod_path else root), attr


def _assign(root: nn.Module, name: str, t: torch.Tensor) -> None:
    mod, attr = _owner(root, name)
    if attr in mod._parameters:
        old = mod._parameters[attr]
        mod._parameters[attr] = nn.Parameter(t, requires_grad=old.requires_grad)
    else:
        mod._buffers[attr] = t


def _drop_storage(mod: nn.Module) -> None:
    """Replaces ``mod``'s own tensors by meta tensors of the same shapes (frees their storage)."""
    for store in (mod._parameters, mod._buffers):
        for k, t in list(store.items()):
            if t is not None and not t.is_meta:
                meta = torch.empty(t.shape, dtype=t.dtype, device="meta")
                store[k] = nn.Parameter(meta, requires_grad=False) if k in mod._parameters else meta


def drop_dense_after_install(install: Any, drop_results: bool = True) -> Any:
    """``install_fn`` that then frees what is dense of the linear it replaced: the replaced
    module's weight (when the install swapped the module, i.e. packed installs; merged installs
    keep their dense weight by design) and, with ``drop_results``, the result's dense weight
    view (``c.weight``, the dequantised weight ``canonicalize`` computed) when the quantised
    codes hold it (the resume state saves the codes; the engine keeps a block's results until
    the block is committed)."""

    def install_then_drop(block: nn.Module, name: str, linear: nn.Module, c: Any) -> None:
        install(block, name, linear, c)
        if drop_results and c.weight_q is not None and c.weight.numel():
            c.weight = c.weight.new_empty(0)
        if block.get_submodule(name) is not linear:
            _drop_storage(linear)

    return install_then_drop


_LOW = (torch.float16, torch.bfloat16)


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


def _upcast_weight(dtype: torch.dtype) -> tuple[Any, Any]:
    """Forward pre/post hooks that let a linear stored in 16 bits compute in ``dtype``: the
    weight is widened for the call (exactly: every 16-bit value is a ``dtype`` value) and the
    16-bit parameter put back after it, so only one layer's wide copy exists at a time."""

    def pre(mod: nn.Module, _args: tuple) -> None:
        low = mod._parameters["weight"]
        mod.__dict__["_slim_low_weight"] = low  # (plain attribute: not a registered parameter)
        mod._parameters["weight"] = nn.Parameter(low.detach().to(dtype), requires_grad=False)

    def post(mod: nn.Module, _args: tuple, _out: Any) -> None:
        mod._parameters["weight"] = mod.__dict__.pop("_slim_low_weight")

    return pre, post


def _upcast_output(dtype: torch.dtype) -> Any:
    def hook(_mod: nn.Module, _args: tuple, out: torch.Tensor) -> torch.Tensor:
        return out.to(dtype)

    return hook


def _tensor_names(root: nn.Module) -> tuple[list[str], list[str]]:
    """(parameters and persistent buffers, non-persistent buffers) of ``root``, by name."""
    saved, volatile = [n for n, _ in root.named_parameters()], []
    for n, _ in root.named_buffers():
        mod, attr = _owner(root, n)
        (volatile if attr in mod._non_persistent_buffers_set else saved).append(n)
    return saved, volatile


class StreamingSource:
    """A meta-device model whose tensors are read from safetensors shards on demand.

    Args:
        cfg: the ``ModelConfig``.
        config: the model's HF config.
        export_dtype: storage dtype of the uncompressed tensors (``round_uncompressed``).
        tokenizer: stored beside a new GGUF conversion cache entry.
    """

    def __init__(self, cfg: Any, config: Any, export_dtype: str, tokenizer: Any = None):
        from .models import DTYPES

        self.cfg, self.config, self.export_dtype = cfg, config, export_dtype
        self.dtype = DTYPES[cfg.dtype]
        mmap_large_allocations()  # block-sized buffers go back to the OS when freed
        self.dir = _checkpoint_dir(cfg, tokenizer)
        from .sources import model_source

        if model_source(cfg).kind == "gguf":  # the conversion cache's own config
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
        self._offloaded: dict[int, dict[str, dict]] = {}  # block -> its SLiMLinear metas

    # -- skeleton -------------------------------------------------------------------------------
    def build(self) -> nn.Module:
        """The model with everything but its decoder blocks materialised (blocks on meta)."""
        import copy

        from transformers import AutoModelForCausalLM

        from .arch import get_arch, get_blocks
        from .models import _dtype_kw

        config = copy.deepcopy(self.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, **_dtype_kw(self.dtype))
        self.model = model
        self.arch = get_arch(model, self.cfg.arch)
        self.blocks = get_blocks(model, self.arch)
        self.reader = ShardReader(
            self.dir,
            getattr(model, "base_model_prefix", "model") or "model",
            what=f"model.path={self.cfg.path}",
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
            _drop_storage(mod)
        return_freed_memory()

    def restore(self) -> None:
        """Reads back everything outside the blocks that :meth:`park` freed (and re-ties)."""
        prefix = self.arch.blocks_path + "."
        model = self.model
        names = [n for n, p in model.named_parameters() if p.is_meta and not n.startswith(prefix)]
        self._materialise(model, names, rounded=True, low=self._vocab_names())
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
        with torch.device("cpu"):
            new = type(old)(config=root.config)
        new.to(self.dtype)  # as _finish's model.to(dtype) does to every floating buffer
        root.set_submodule(path, new)

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
        from .models import DTYPES

        base = "" if root is self.model else f"{self.arch.blocks_path}.{self._current}."
        rdt = DTYPES[self.export_dtype] if self.export_dtype != "float32" else None
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
        from .io import atomic_save_tensors, make_dir
        from .modules import SLiMLinear

        if self.offload_dir is None:
            raise ValueError("streaming: offload_block needs offload_dir")
        make_dir(self.offload_dir)
        self._offloaded[i] = {
            n: block.get_submodule(n).meta()
            for n in self.arch.linear_names
            if isinstance(block.get_submodule(n), SLiMLinear)
        }
        atomic_save_tensors(block.state_dict(), self.offload_dir / f"block_{i:04d}.safetensors")
        self.evict_block(block)

    def reload_block(self, i: int, block: nn.Module) -> None:
        """Reads back block ``i`` as ``offload_block`` wrote it (bit for bit)."""
        from .io import load_tensors
        from .modules import SLiMLinear

        for n, meta in self._offloaded.pop(i).items():
            block.set_submodule(n, SLiMLinear.from_meta(meta, device="meta"))
        path = self.offload_dir / f"block_{i:04d}.safetensors"
        block.load_state_dict(load_tensors(path), strict=True, assign=True)
        path.unlink()  # (a later resume re-installs from the resume state)
        _, volatile = _tensor_names(block)
        for n in volatile:
            self._rebuild_module(block, n.rpartition(".")[0])

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


class _Replay(nn.Module):
    """Stands in for a model's decoder blocks: returns the last block's saved output."""

    def __init__(self, out: Any):
        super().__init__()
        self.out = out

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.out


@torch.no_grad()
def streaming_perplexity(
    model: nn.Module,
    windows: torch.Tensor,
    *,
    stream: StreamingSource,
    batch_size: int = 1,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> dict[str, float | int]:
    """``evaluation.perplexity`` of the dense model of a streaming run, one block at a time.

    The windows' hidden states go through block 0 (read from the shards, then evicted), then
    block 1, ...; the last block's outputs are fed to the model's own head (final norm, LM head,
    the fp32 NLL of ``per_window_nll``) by a stand-in for the block list. The same operations as
    a whole-model forward, so the same perplexity; the host holds the vocabulary tables, one
    block and the windows' hidden states. Blocks run on ``device``, the rest on the CPU.
    """
    import math

    from tqdm.auto import tqdm

    from .calibration import _block_output, capture_block_inputs, to_device
    from .evaluation import per_window_nll

    if windows.dim() != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows must be (n, seqlen>=2), got {tuple(windows.shape)}")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    blocks = stream.blocks
    hidden, kwargs = capture_block_inputs(model, blocks[0], windows, batch_size)
    kwargs_dev = [to_device(kw, dev) for kw in kwargs]
    outs: list[Any] = []
    for i in tqdm(range(len(blocks)), desc="Perplexity (streamed)", disable=not progress):
        block = blocks[i]
        stream.read_block(i, block, low=True)
        block.to(dev)
        outs = [block(x.to(dev), **kw) for x, kw in zip(hidden, kwargs_dev)]
        hidden = [_block_output(o).to("cpu") for o in outs]
        stream.evict_block(block)
    last = [to_device(o, "cpu") for o in outs]
    del outs, hidden
    path = stream.arch.blocks_path
    total, n_tokens = torch.zeros((), dtype=torch.float64), 0
    try:
        for b, start in enumerate(range(0, windows.shape[0], batch_size)):
            model.set_submodule(path, nn.ModuleList([_Replay(last[b])]))
            nll, n = per_window_nll(model, windows[start : start + batch_size])
            total += nll.double()
            n_tokens += n
    finally:
        model.set_submodule(path, blocks)
    mean = float(total) / n_tokens
    return {
        "ppl": math.exp(mean) if mean < 700 else float("inf"),
        "nll": mean,
        "n_tokens": n_tokens,
    }


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
