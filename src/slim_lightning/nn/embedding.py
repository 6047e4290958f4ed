"""Quantised input embeddings and LM head (``embeddings.bits=8|4``), for embedding-heavy models.

Small models spend a large share of their parameters on the vocabulary (SmolLM2-135M: 21%), which
the linear-layer compression does not touch. ``quantize_embeddings`` replaces

* the input embedding with a ``PackedEmbedding``: groupwise AbsMax codes (``bits`` 8 or 4, groups
  of ``group_size`` along the hidden dimension, fp16 scales) in the ``dense`` packed format; a
  lookup dequantises only the rows it gathers;
* the LM head with a rank-0 ``SLiMLinear`` over the same kind of packed weight. A tied head shares
  the embedding's buffers (stored once; ``checkpoint`` re-ties them on load), so the weight the
  model reads and the weight it writes stay one tensor.

Round-to-nearest, no calibration: it runs after the block-wise compression, on the already
compressed model.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from ..formats import PackedWeight, pack_absmax
from ..formats.bitpack import _unpack_codes
from ..formats.packed import check_row_major

META_VERSION = 1


class PackedEmbedding(nn.Module):
    """``nn.Embedding`` whose table is a packed ``dense``-format ``PackedWeight``.

    Buffers ``weight_<field>`` as in ``SLiMLinear``; the output dtype follows ``.to(dtype)`` of
    the module (like a float embedding table), starting at ``out_dtype``.
    """

    def __init__(
        self,
        meta: dict,
        device: torch.device | str | None = None,
        out_dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        if int(meta.get("version", META_VERSION)) != META_VERSION:
            raise ValueError(f"PackedEmbedding meta version {meta.get('version')} != 1")
        wm = meta["weight"]
        if wm["format"] != "dense" or wm["bits"] not in (4, 8):
            raise ValueError(
                f"PackedEmbedding: format {wm['format']!r} bits {wm['bits']!r}; "
                "allowed: dense with 4 or 8 bits"
            )
        pw = PackedWeight.empty(wm, device)
        self.num_embeddings, self.embedding_dim = pw.shape
        self.padding_idx = meta.get("padding_idx")
        self._weight_meta = {k: v for k, v in wm.items() if k != "tensors"}
        self._fields = tuple(pw.tensors)
        for k, v in pw.tensors.items():
            self.register_buffer(f"weight_{k}", v)
        self.out_dtype = out_dtype
        # a scaled embedding's factor (Gemma: sqrt(hidden)), applied as the model's own class does
        scale = meta.get("embed_scale")
        if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale)):
            raise ValueError(f"PackedEmbedding: embed_scale {scale!r} is not a finite number")
        self.embed_scale = None if scale is None else float(scale)

    @classmethod
    def from_packed(
        cls,
        pw: PackedWeight,
        padding_idx: int | None,
        out_dtype: torch.dtype,
        embed_scale: float | None = None,
    ) -> PackedEmbedding:
        mod = cls(
            {"weight": pw.meta(), "padding_idx": padding_idx, "embed_scale": embed_scale},
            device="meta",
        )
        for k, v in pw.tensors.items():
            setattr(mod, f"weight_{k}", v)
        mod.out_dtype = out_dtype
        return mod

    def meta(self) -> dict:
        out = {
            "version": META_VERSION,
            "padding_idx": self.padding_idx,
            "weight": self.packed_weight().meta(),
        }
        if self.embed_scale is not None:
            out["embed_scale"] = self.embed_scale
        return out

    def packed_weight(self) -> PackedWeight:
        meta = {**self._weight_meta, "tensors": {}}
        pw = PackedWeight.empty(meta)
        pw.tensors = {k: getattr(self, f"weight_{k}") for k in self._fields}
        return pw

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pw = self.packed_weight()
        flat = ids.reshape(-1)
        codes = _unpack_codes(pw.tensors["values"][flat], pw.bits, self.embedding_dim)
        scale = pw.float_field("scale")[flat]  # (n, groups)
        scale = scale.repeat_interleave(pw.group_size, dim=1)[:, : self.embedding_dim]
        out = (codes.to(torch.float32) * scale).to(self.out_dtype)
        if self.embed_scale is not None:
            out = out * torch.tensor(self.embed_scale, dtype=self.out_dtype, device=out.device)
        return out.reshape(*ids.shape, self.embedding_dim)

    def _apply(self, fn, recurse: bool = True):
        # a float cast of the module changes the output dtype, a device move does not
        self.out_dtype = fn(torch.empty(0, dtype=self.out_dtype)).dtype
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return (
            f"{self.num_embeddings}, {self.embedding_dim}, bits={self._weight_meta['bits']}, "
            f"group_size={self._weight_meta['group_size']}"
        )


def _head_meta(pw: PackedWeight, has_bias: bool) -> dict:
    rows, cols = pw.shape
    return {
        "version": 1,
        "in_features": cols,
        "out_features": rows,
        "rank": 0,
        "adapter_bits": None,
        "has_bias": has_bias,
        "weight": pw.meta(),
    }


# elements per step when packing or measuring a table: vocabulary tables are the largest
# tensors of a model (32000 x 4096 = 0.5 GB in fp32); steps of whole rows, about STEP_ELEMS
# values each, keep the fp32 work copies at a few MB (the error's float64 work included). Rows
# are quantised independently (groups run along columns), so the codes equal a whole-table pack.
STEP_ELEMS = 1 << 20


def row_step(cols: int) -> int:
    """Rows per step for a table of ``cols`` columns."""
    return max(1, STEP_ELEMS // max(1, int(cols)))


def pack_rows(w: torch.Tensor, bits: int, group_size: int, step: int | None = None) -> PackedWeight:
    """``pack_absmax(w, bits, group_size)`` computed ``step`` rows at a time (equal codes and
    scales; the fp32 work copies are ``step`` rows, whatever ``w``'s dtype and size). Each step's
    fields are written into the whole table's tensors, allocated once (no second copy)."""
    rows, cols = w.shape
    step = step or row_step(cols)
    out, fields, nnz = None, {}, 0
    for s in range(0, rows, step):
        part = pack_absmax(w[s : s + step], bits, group_size)
        n = min(step, rows - s)
        if out is None:
            out = copy.copy(part)
            check_row_major(part.tensors, n, "pack_rows")
            fields = {k: v.new_empty((rows, *v.shape[1:])) for k, v in part.tensors.items()}
        for k, v in part.tensors.items():
            fields[k][s : s + n].copy_(v)
        nnz += part.nnz
        del part
    out.tensors, out.shape, out.nnz = fields, (rows, cols), nnz
    return out


def _rel_err(pw: PackedWeight, w: torch.Tensor, step: int | None = None) -> float:
    """Relative Frobenius error of the dequantised table against ``w`` (in row steps)."""
    err = ref = 0.0
    step = step or row_step(w.shape[1])
    for s in range(0, w.shape[0], step):
        ws = w[s : s + step].detach().float()
        d = pw.row_block(s, min(s + step, w.shape[0])).to_dense() - ws
        err += float((d.double() ** 2).sum())
        ref += float((ws.double() ** 2).sum())
    return (err**0.5) / max(ref**0.5, 1e-30)


@torch.no_grad()
def quantize_embeddings(
    model: nn.Module,
    bits: int,
    group_size: int,
    packed: bool = True,
    dtype: torch.dtype | None = None,
    fetch_head: Callable[[], None] | None = None,
) -> dict:
    """Replaces the input embedding and the LM head by packed ``bits``-bit versions (in place);
    with ``packed=False`` (dense exports) the float tables take the dequantised values instead.
    ``dtype``: what the packed embedding returns (default: the table's dtype; streaming keeps
    16-bit tables that compute in a wider dtype). Tables are packed in row steps (``row_step``).

    ``fetch_head``: called once the input embedding is replaced and before the LM head is
    read (streaming reads an untied head only then, so both float tables are never held).

    Returns ``{"bits", "group_size", "tied", "packed", "embedding_rel_err", "head_rel_err"}``
    (relative Frobenius errors of the dequantised tables).
    """
    from .linear import SLiMLinear

    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    if not isinstance(emb, nn.Embedding):
        raise ValueError(
            f"embeddings.bits: the input embedding is {type(emb).__name__}, not nn.Embedding"
        )
    tied = head is not None and getattr(head, "weight", None) is emb.weight
    w = emb.weight.detach()
    embed_scale = lookup_scale(emb)
    pw = pack_rows(w, bits, group_size)
    err = _rel_err(pw, w)
    if not packed:
        report = {"bits": bits, "group_size": group_size, "tied": tied, "packed": False}
        report["embedding_rel_err"] = report["head_rel_err"] = err
        emb.weight.copy_(pw.to_dense())  # (the model's own class keeps applying its scale)
        if isinstance(head, nn.Linear) and not tied:
            hpw = pack_rows(head.weight, bits, group_size)
            report["head_rel_err"] = _rel_err(hpw, head.weight)
            head.weight.copy_(hpw.to_dense())
        return report
    new_emb = PackedEmbedding.from_packed(pw, emb.padding_idx, dtype or w.dtype, embed_scale)
    model.set_input_embeddings(new_emb)
    report = {"bits": bits, "group_size": group_size, "tied": tied, "packed": True}
    report["embedding_rel_err"] = err
    if fetch_head is not None and not tied:
        del emb, w  # (the float input table is freed before the head is read)
        fetch_head()
        head = model.get_output_embeddings()
    if isinstance(head, nn.Linear):
        hw = head.weight.detach()
        hpw = pw if tied else pack_rows(hw, bits, group_size)
        new_head = SLiMLinear.from_meta(_head_meta(hpw, head.bias is not None), device="meta")
        for k, v in hpw.tensors.items():
            setattr(new_head, f"weight_{k}", v)  # a tied head shares the embedding's tensors
        if head.bias is not None:
            new_head.bias = head.bias.detach().clone()
        model.set_output_embeddings(new_head)
        if tied:
            model.config.tie_word_embeddings = False  # tied here, by shared buffers
            report["head_rel_err"] = err
        else:
            report["head_rel_err"] = _rel_err(hpw, hw)
    return report


def lookup_scale(emb: nn.Embedding) -> float | None:
    """The factor the model's embedding class multiplies its lookup by (Gemma's scaled
    embedding), None for a plain lookup; a class that does anything else is refused."""
    scale = getattr(emb, "embed_scale", None)
    scale = None if scale is None else float(torch.as_tensor(scale).float())
    if emb.weight.is_meta:
        return scale
    probe = torch.arange(min(emb.num_embeddings, 64), device=emb.weight.device)
    own = emb(probe)
    plain = F.embedding(probe, emb.weight)
    if scale is not None:
        plain = plain * torch.tensor(scale, dtype=plain.dtype, device=plain.device)
    if not torch.equal(own, plain):
        raise ValueError(
            f"embeddings.bits: the input embedding {type(emb).__name__} computes more than a "
            "table lookup (times a constant); allowed: embeddings.bits=null for this model"
        )
    return scale


def install_embeddings(model: nn.Module, metas: dict[str, dict], where: str) -> None:
    """Swaps the named ``nn.Embedding`` modules of a meta-device skeleton for empty
    ``PackedEmbedding`` modules (checkpoint loading)."""
    from ..errors import CheckpointError

    for name, meta in metas.items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            old = None
        if not isinstance(old, nn.Embedding):
            raise CheckpointError(
                f"{where}: embedding {name}: the model has no nn.Embedding there "
                f"(got {type(old).__name__})"
            )
        try:
            shape = tuple(meta["weight"]["shape"])
            if shape != (old.num_embeddings, old.embedding_dim):
                raise ValueError(f"shape {list(shape)} != the model's {list(old.weight.shape)}")
            new = PackedEmbedding(meta, device="meta", out_dtype=old.weight.dtype)
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{where}: embedding {name}: {type(e).__name__}: {e}") from None
        model.set_submodule(name, new)


@torch.no_grad()
def dequantize_embeddings(model: nn.Module) -> None:
    """Inverse of ``quantize_embeddings`` for dense exports: plain ``nn.Embedding`` / ``nn.Linear``
    holding the dequantised tables (re-tied when the head shared the embedding's codes)."""
    from .linear import SLiMLinear

    emb = model.get_input_embeddings()
    if not isinstance(emb, PackedEmbedding):
        return
    head = model.get_output_embeddings()
    table = emb.packed_weight().to_dense().to(emb.out_dtype)
    dense = nn.Embedding(*table.shape, padding_idx=emb.padding_idx, _weight=table)
    if emb.embed_scale is not None:
        dense = ScaledEmbedding(dense, emb.embed_scale)
    model.set_input_embeddings(dense)
    if isinstance(head, SLiMLinear) and head.rank == 0:
        tied = head.weight_values is emb.weight_values
        lin = nn.Linear(head.in_features, head.out_features, bias=head.bias is not None)
        lin.weight = dense.weight if tied else nn.Parameter(head.dense_weight().to(table.dtype))
        if head.bias is not None:
            lin.bias = nn.Parameter(head.bias.detach().clone())
        model.set_output_embeddings(lin)
        model.config.tie_word_embeddings = tied


class ScaledEmbedding(nn.Embedding):
    """A dequantised scaled embedding (Gemma): the lookup times ``embed_scale`` in the table's
    dtype, as the model's own class computes it (the factor is not a stored tensor)."""

    def __init__(self, dense: nn.Embedding, scale: float):
        super().__init__(*dense.weight.shape, padding_idx=dense.padding_idx, _weight=dense.weight)
        self.register_buffer("embed_scale", torch.tensor(scale), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids) * self.embed_scale.to(self.weight.dtype)
