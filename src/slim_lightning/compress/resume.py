"""Resume state of the calibration engine: per-block commits in ``state_dir``.

``BlockStore`` saves each finished block's compressed layers and the next block's inputs, and on
a rerun verifies what was committed so that ``CalibrationEngine`` resumes from the last committed
block and ends bit-identical to an uninterrupted run. ``compressed_to_tensors`` /
``compressed_from_tensors`` (de)serialise one ``CompressedLinear`` for it.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

import torch

from ..core.grouped import GroupQuant
from ..core.types import CompressedLinear, QuantTensor
from ..io import (
    atomic_save_tensors,
    atomic_write_json,
    file_sha256,
    load_tensors,
    make_dir,
    remove_stale_temps,
)

log = logging.getLogger(
    "slim_lightning.compress.engine"
)  # the engine's logger, as before the split


class ResumeStateDiscarded(UserWarning):
    """Saved calibration state could not be reused (other configuration, missing or corrupt)."""


STATE_FORMAT = 2
EXTRA = "__block__."  # prefix of a block's other trained tensors in block_NNNN.safetensors


def _inputs_name(i: int) -> str:
    return f"inputs_{i:04d}.safetensors"


def canonicalize(c: CompressedLinear, dense_views: bool = True) -> CompressedLinear:
    """Recomputes the dense views from the quantised parts so a reload is bit-identical (a
    quantised weight's view on the meta device unless ``dense_views``)."""
    if c.weight_q is not None and not dense_views:
        c.weight = torch.empty(c.weight_q.q.shape, dtype=torch.float32, device="meta")
    elif c.weight_q is not None:
        c.weight = c.weight.new_empty(0)  # (freed first: one dense copy at a time)
        w = c.weight_q.dequantize()
        # (codes are 0 where pruned, so this only writes +0.0 over +0.0: the product by the
        # mask, without a float copy of it)
        c.weight = w.masked_fill_(~c.mask, 0.0) if c.mask is not None else w
    if c.lora_l_q is not None:
        c.lora_l = c.lora_l_q.dequantize().T.contiguous()
    if c.lora_r_q is not None:
        c.lora_r = c.lora_r_q.dequantize().T.contiguous()
    return c


def _qt_to(prefix: str, qt: QuantTensor | GroupQuant, out: dict, meta: dict) -> None:
    if isinstance(qt, GroupQuant):
        tensors, meta[prefix] = qt.to_tensors()
        out.update({f"{prefix}.{k}": v for k, v in tensors.items()})
        return
    out[f"{prefix}.q"] = qt.q
    out[f"{prefix}.scale"] = qt.scale
    if qt.in_scale is not None:
        out[f"{prefix}.in_scale"] = qt.in_scale
    meta[prefix] = {"group_size": qt.group_size, "bits": qt.bits}


def _qt_from(prefix: str, t: dict, meta: dict) -> QuantTensor | GroupQuant | None:
    if prefix not in meta:
        return None
    if meta[prefix].get("kind") == "group":
        mine = {k[len(prefix) + 1 :]: v for k, v in t.items() if k.startswith(prefix + ".")}
        return GroupQuant.from_tensors(mine, meta[prefix])
    return QuantTensor(
        q=t[f"{prefix}.q"],
        scale=t[f"{prefix}.scale"],
        in_scale=t.get(f"{prefix}.in_scale"),
        **meta[prefix],
    )


def compressed_to_tensors(name: str, c: CompressedLinear) -> tuple[dict, dict]:
    """Flattens a CompressedLinear into safetensors-ready tensors and JSON metadata."""
    out: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {f"{name}.metrics": c.metrics}
    if c.weight_q is not None:
        _qt_to(f"{name}.weight_q", c.weight_q, out, meta)
    else:
        out[f"{name}.weight"] = c.weight
    if c.mask is not None:
        out[f"{name}.mask"] = c.mask
    for attr in ("lora_l_q", "lora_r_q"):
        qt = getattr(c, attr)
        if qt is not None:
            _qt_to(f"{name}.{attr}", qt, out, meta)
    for attr in ("lora_l", "lora_r"):
        if getattr(c, attr) is not None and getattr(c, attr + "_q") is None:
            out[f"{name}.{attr}"] = getattr(c, attr)
    return out, meta


def compressed_from_tensors(name: str, t: dict, meta: dict) -> CompressedLinear:
    """Inverse of :func:`compressed_to_tensors`."""
    c = CompressedLinear(
        weight=t.get(f"{name}.weight", torch.empty(0)),
        weight_q=_qt_from(f"{name}.weight_q", t, meta),
        mask=t.get(f"{name}.mask"),
        lora_l=t.get(f"{name}.lora_l"),
        lora_r=t.get(f"{name}.lora_r"),
        lora_l_q=_qt_from(f"{name}.lora_l_q", t, meta),
        lora_r_q=_qt_from(f"{name}.lora_r_q", t, meta),
        metrics=meta.get(f"{name}.metrics", {}),
    )
    return canonicalize(c)


class BlockStore:
    """The calibration engine's resume state in ``state_dir``, for one run.

    Args:
        state_dir: the directory (created if missing).
        fingerprint: identifies everything that determines the result; a record written with
            another fingerprint is discarded with a ``ResumeStateDiscarded`` warning.
        n_blocks: the model's number of decoder blocks.
        linear_names: dotted names of the linears compressed inside each block.

    Attributes:
        discarded: why saved state was discarded by ``load_progress`` (None: it was not).
    """

    # Layout of ``state_dir`` (format 2):
    #   block_NNNN.safetensors / block_NNNN.json  block NNNN's compressed layers and metadata
    #   inputs_NNNN.safetensors                   the calibration activations entering block NNNN
    #   progress.json                             the commit record, written last (fsync'd):
    #       {"format": 2, "fingerprint", "n_blocks", "next_block", "files": {name: sha256}}
    # Block i is committed only when progress.json names its files and inputs_{i+1}; the
    # previous inputs file is deleted after that. A kill anywhere leaves either the old record
    # (block i is recomputed from inputs_i, which still exists) or the new one (complete files).
    # On resume every file in the record is verified against its sha256; a record written by
    # another configuration (fingerprint) or with missing/corrupt files is discarded loudly.
    def __init__(
        self,
        state_dir: str | Path,
        fingerprint: str,
        n_blocks: int,
        linear_names: tuple[str, ...],
    ):
        self.state_dir = Path(state_dir)
        self.fingerprint, self.n_blocks, self.linear_names = fingerprint, n_blocks, linear_names
        self.discarded: str | None = None
        self._committed: dict[str, str] = {}

    def _progress_file(self) -> Path:
        return self.state_dir / "progress.json"

    def _discard_state(self, reason: str) -> None:
        msg = f"discarding resume state in {self.state_dir}: {reason}; compressing from block 0"
        log.warning(msg)
        # stacklevel 3: the line in CalibrationEngine.run that calls load_progress
        warnings.warn(msg, ResumeStateDiscarded, stacklevel=3)
        self.discarded = reason
        for f in self.state_dir.iterdir():
            if f.is_file() and (f.name.startswith(("block_", "inputs", "progress", "."))):
                f.unlink(missing_ok=True)

    def load_progress(self) -> int:
        """Creates ``state_dir``, removes stale temps and verifies the commit record.

        Returns:
            The first block still to compress (0 when there is no usable state).
        """
        make_dir(self.state_dir)
        remove_stale_temps(self.state_dir)
        pf = self._progress_file()
        if not pf.parent.is_dir():
            return 0
        if not pf.exists():
            if any(pf.parent.glob("block_*")) or any(pf.parent.glob("inputs*")):
                self._discard_state("block files without a progress record")
            return 0
        try:
            prog = json.loads(pf.read_text())
            if not isinstance(prog, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as e:
            self._discard_state(f"{pf} is unreadable ({e})")
            return 0
        if prog.get("format") != STATE_FORMAT:
            self._discard_state(f"{pf} has state format {prog.get('format')!r}, not {STATE_FORMAT}")
            return 0
        if prog.get("fingerprint") != self.fingerprint or prog.get("n_blocks") != self.n_blocks:
            self._discard_state(
                f"it was written by a different run (fingerprint {prog.get('fingerprint')!r} != "
                f"{self.fingerprint!r}: the model weights, calibration data, method options, "
                "seed, engine.batch_size or device differ)"
            )
            return 0
        nxt = prog.get("next_block")
        files = prog.get("files")
        if not isinstance(nxt, int) or not 0 <= nxt <= self.n_blocks or not isinstance(files, dict):
            self._discard_state(f"{pf} is malformed")
            return 0
        need = [f"block_{i:04d}.{ext}" for i in range(nxt) for ext in ("safetensors", "json")]
        if 0 < nxt < self.n_blocks:
            need.append(_inputs_name(nxt))
        for name in need:
            f = self.state_dir / name
            if name not in files or not f.is_file():
                self._discard_state(f"{f} is missing")
                return 0
            if file_sha256(f) != files[name]:
                self._discard_state(f"{f} does not match its sha256 in {pf.name} (corrupt)")
                return 0
        self._committed = {k: files[k] for k in need}
        return nxt

    def save_block(
        self,
        i: int,
        results: dict[str, CompressedLinear],
        inputs: list[torch.Tensor],
        dense: list[torch.Tensor] | None = None,
        extra: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Commits block ``i``'s results and the inputs of block ``i + 1`` (CPU tensors).

        ``dense``: the dense path's inputs of block ``i + 1`` (block reconstruction's targets);
        ``extra``: other trained tensors of the block by parameter name (norm gains).
        """
        tensors, meta = {}, {}
        for name, c in results.items():
            t, m = compressed_to_tensors(name, c)
            tensors.update(t)
            meta.update(m)
        for name, t in (extra or {}).items():
            tensors[f"{EXTRA}{name}"] = t.detach().to("cpu").contiguous()
        written = {}
        for fname, write in (
            (f"block_{i:04d}.safetensors", lambda p: atomic_save_tensors(tensors, p)),
            (f"block_{i:04d}.json", lambda p: atomic_write_json(p, meta)),
        ):
            write(self.state_dir / fname)
            written[fname] = file_sha256(self.state_dir / fname)
        if i + 1 < self.n_blocks:
            fname = _inputs_name(i + 1)
            saved = {f"b{j}": x for j, x in enumerate(inputs)}
            saved.update({f"d{j}": x for j, x in enumerate(dense or [])})
            atomic_save_tensors(saved, self.state_dir / fname)
            written[fname] = file_sha256(self.state_dir / fname)
        files = {k: v for k, v in self._committed.items() if k.startswith("block_")}
        files.update(written)
        # progress.json is written last: it is the commit point of block i
        atomic_write_json(
            self._progress_file(),
            {
                "format": STATE_FORMAT,
                "fingerprint": self.fingerprint,
                "n_blocks": self.n_blocks,
                "next_block": i + 1,
                "files": files,
            },
        )
        self._committed = files
        (self.state_dir / _inputs_name(i)).unlink(missing_ok=True)  # superseded

    def load_block(self, i: int) -> dict[str, CompressedLinear]:
        """Block ``i``'s committed results, by linear name."""
        t = load_tensors(self.state_dir / f"block_{i:04d}.safetensors")
        meta = json.loads((self.state_dir / f"block_{i:04d}.json").read_text())
        return {n: compressed_from_tensors(n, t, meta) for n in self.linear_names}

    def load_extra(self, i: int) -> dict[str, torch.Tensor]:
        """Block ``i``'s other trained tensors (norm gains), by parameter name."""
        t = load_tensors(self.state_dir / f"block_{i:04d}.safetensors")
        return {k[len(EXTRA) :]: v for k, v in t.items() if k.startswith(EXTRA)}

    def load_inputs(self, i: int, dense: bool = False) -> list[torch.Tensor]:
        """The committed inputs of block ``i`` (one tensor per batch); ``dense``: the dense
        path's inputs saved beside them."""
        saved = load_tensors(self.state_dir / _inputs_name(i))
        key = "d" if dense else "b"
        n = sum(1 for k in saved if k.startswith(key))
        return [saved[f"{key}{j}"] for j in range(n)]
