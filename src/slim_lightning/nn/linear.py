"""``SLiMLinear``: a compressed linear layer that owns its packed weight and its adapters.

``y = x (Q(W) * M)^T + (x L) R + bias``

* The sparse quantised weight is a ``PackedWeight`` (``slim_lightning.formats``) held as persistent
  integer buffers ``weight_<field>`` (never trainable; ``.to(dtype)`` cannot touch them).
* Adapters ``lora_l (d_in, r)`` and ``lora_r (r, d_out)`` are fp32 ``nn.Parameter`` s (the only
  parameters, so DDP / optimisers see only them). When the adapters are quantised
  (``adapter_bits`` not None) the forward uses their AbsMax fake-quantised values (groups along each
  matmul's reduction axis) with a straight-through estimator, and the packed 4-bit serving copy is
  kept in the buffers ``adapter_l_<field>`` (``L^T (r, d_in)``) / ``adapter_r_<field>``
  (``R^T (d_out, r)``); ``requantize_adapters()`` refreshes it from the parameters.
* ``bias`` is a frozen buffer (or None).

Backends: ``reference`` (plain PyTorch; the test oracle and CPU path) and ``triton`` (the fused
kernels in ``slim_lightning.kernels``; inference only, 2:4 / dense 4-bit weights).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from ..core.quant import fake_quant_absmax
from ..core.types import CompressedLinear
from ..dtypes import FLOAT_DTYPES
from ..formats import PackedWeight, pack_absmax
from .functional import (
    FakeQuantSTE,
    PackedBaseMatmul,
    pack_compressed,
    strip_tensors,
    tensor_meta,
    version_key,
)

Backend = Literal["reference", "triton"]
META_VERSION = 1


class SLiMLinear(nn.Module):
    """Compressed linear layer ``y = x (Q(W)*M)^T + (x L) R + bias`` (see module docstring).

    Build with ``from_compressed`` (from the compression core) or ``from_meta`` (empty, to be
    filled by ``load_state_dict``). ``packed_nbytes()`` counts the packed weight, its scales, the
    adapters as served (packed 4-bit codes + scales when quantised, the fp32 parameters otherwise);
    the bias is NOT counted (it is not part of the weight).

    Attributes:
        in_features, out_features: ``d_in``, ``d_out``.
        rank: adapter rank (0 = no adapters).
        adapter_bits: adapter code width or None (fp32 adapters).
        backend: ``reference`` or ``triton`` (settable; ``set_backend(model, "auto")`` picks
            triton on CUDA for the layers the kernels support).
        cache_dense: opt-in (default False): the reference backend keeps the dequantised dense
            weight per dtype, trading the memory of a dense layer for CPU speed
            (``set_dense_cache``). Off, only the packed buffers stay resident.
    """

    def __init__(self, meta: dict, device: torch.device | str | None = None):
        """Creates correctly shaped, uninitialised buffers and parameters from ``meta()``."""
        super().__init__()
        if int(meta.get("version", META_VERSION)) != META_VERSION:
            raise ValueError(f"SLiMLinear meta version {meta.get('version')} != {META_VERSION}")
        self._meta_static = {
            k: meta[k] for k in ("in_features", "out_features", "rank", "adapter_bits", "has_bias")
        }
        self.in_features = int(meta["in_features"])
        self.out_features = int(meta["out_features"])
        self.rank = int(meta["rank"])
        self.adapter_bits = meta["adapter_bits"]
        # storage dtype of fp adapters (their values are exactly representable in it; the
        # parameters stay fp32 for training); quantised adapters are stored as their codes
        self.adapter_dtype = str(meta.get("adapter_dtype", "float32"))
        if self.adapter_dtype not in FLOAT_DTYPES:
            raise ValueError(
                f"adapter_dtype {self.adapter_dtype!r}; allowed: {', '.join(FLOAT_DTYPES)}"
            )
        self._weight_meta = strip_tensors(meta["weight"])
        pw = PackedWeight.empty(meta["weight"], device)
        if pw.shape != (self.out_features, self.in_features):
            raise ValueError(
                f"weight shape {pw.shape} != (out_features, in_features) "
                f"= ({self.out_features}, {self.in_features})"
            )
        for k, v in pw.tensors.items():
            self.register_buffer(f"weight_{k}", v)
        self._weight_fields = tuple(pw.tensors)
        self._adapter_meta: dict[str, dict] = {}
        self._adapter_fields: dict[str, tuple[str, ...]] = {}
        if self.rank > 0:
            self.lora_l = nn.Parameter(
                torch.empty(self.in_features, self.rank, dtype=torch.float32, device=device)
            )
            self.lora_r = nn.Parameter(
                torch.empty(self.rank, self.out_features, dtype=torch.float32, device=device)
            )
            if self.adapter_bits is not None:
                for side in ("l", "r"):
                    apw = PackedWeight.empty(meta[f"adapter_{side}"], device)
                    self._adapter_meta[side] = strip_tensors(meta[f"adapter_{side}"])
                    self._adapter_fields[side] = tuple(apw.tensors)
                    for k, v in apw.tensors.items():
                        self.register_buffer(f"adapter_{side}_{k}", v)
        else:
            self.lora_l = None
            self.lora_r = None
        if meta["has_bias"]:
            bias_dtype = getattr(torch, meta.get("bias_dtype", "float32"))
            self.register_buffer(
                "bias", torch.empty(self.out_features, dtype=bias_dtype, device=device)
            )
        else:
            self.register_buffer("bias", None)
        self.backend: Backend = "reference"
        # opt-in: keep a dequantised dense copy per dtype (CPU speed for the memory of a dense
        # layer); off, the weight is dequantised just in time and only packed bytes stay resident
        self.cache_dense = False
        self._dense_cache: dict = {}
        self._adapter_cache: dict = {}
        self._kernel_cache: dict = {}  # the triton backend's packed adapters

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_compressed(
        cls,
        c: CompressedLinear,
        bias: torch.Tensor | None = None,
        *,
        n: int = 2,
        m: int = 4,
        adapter_dtype: str = "float32",
    ) -> SLiMLinear:
        """Packs a ``CompressedLinear`` (the weight's format is chosen by ``PackedWeight``).

        Args:
            c: the compression result (``weight_q`` None -> fp32 values are stored; ``mask`` None
                -> dense; ``lora_l`` None -> no adapters; ``lora_l_q`` None -> fp32 adapters).
            bias: optional ``(d_out,)`` bias, copied and frozen.
            n, m: the N:M pattern tried first for a masked weight (else ``unstructured``).
            adapter_dtype: storage dtype of fp adapters (``float32``, ``float16``, ``bfloat16``);
                their values are rounded to it so that what is stored is what is computed.
        """
        meta, pw, packed_ad = pack_compressed(c, bias, n, m, adapter_dtype, META_VERSION)
        rank, quant_ad = meta["rank"], bool(packed_ad)
        device = (c.weight_q.q if c.weight_q is not None else c.weight).device
        mod = cls(meta, device=device)
        with torch.no_grad():
            for k, v in pw.tensors.items():
                getattr(mod, f"weight_{k}").copy_(v)
            for side, apw in packed_ad.items():
                for k, v in apw.tensors.items():
                    getattr(mod, f"adapter_{side}_{k}").copy_(v)
            if rank:
                if quant_ad:  # the parameters start on the grid: exactly the packed adapters
                    mod.lora_l.copy_(packed_ad["l"].to_dense().T)
                    mod.lora_r.copy_(packed_ad["r"].to_dense().T)
                else:
                    mod.lora_l.copy_(c.lora_l)
                    mod.lora_r.copy_(c.lora_r)
                    mod.round_fp_adapters()
            if bias is not None:
                mod.bias.copy_(bias.detach())
        return mod

    @classmethod
    def from_meta(cls, meta: dict, device: torch.device | str | None = None) -> SLiMLinear:
        """Empty module with the buffers/parameters ``meta`` describes (fill via load_state_dict)."""
        return cls(meta, device=device)

    def meta(self) -> dict:
        """JSON-able description: shapes, formats, bits, group sizes, rank, adapter quantisation."""
        out = {"version": META_VERSION, **self._meta_static, "adapter_dtype": self.adapter_dtype}
        out["weight"] = self._packed_meta(self._weight_meta, "weight", self._weight_fields)
        if self.bias is not None:
            out["bias_dtype"] = str(self.bias.dtype).removeprefix("torch.")
        for side, fields in self._adapter_fields.items():
            out[f"adapter_{side}"] = self._packed_meta(
                self._adapter_meta[side], f"adapter_{side}", fields
            )
        out["adapter_group_size_l"] = self._adapter_meta["l"]["group_size"] if self._q_ad else None
        out["adapter_group_size_r"] = self._adapter_meta["r"]["group_size"] if self._q_ad else None
        out["adapter_in_scale"] = self._q_ad and "in_scale" in self._adapter_fields["l"]
        return out

    def _packed_meta(self, base: dict, prefix: str, fields: tuple[str, ...]) -> dict:
        return {**base, "tensors": tensor_meta(self._fields(prefix, fields))}

    # -- packed views ------------------------------------------------------------------------
    @property
    def _q_ad(self) -> bool:
        return self.rank > 0 and self.adapter_bits is not None

    def _fields(self, prefix: str, fields: tuple[str, ...]) -> dict[str, torch.Tensor]:
        return {k: getattr(self, f"{prefix}_{k}") for k in fields}

    def packed_weight(self) -> PackedWeight:
        """The packed sparse weight (a view over this module's buffers)."""
        pw = PackedWeight.empty({**self._weight_meta, "tensors": {}})
        pw.tensors = self._fields("weight", self._weight_fields)
        return pw

    def packed_adapter(self, side: Literal["l", "r"]) -> PackedWeight | None:
        """Packed ``L^T (r, d_in)`` (side ``l``) or ``R^T (d_out, r)`` (``r``); None if fp."""
        if not self._q_ad:
            return None
        pw = PackedWeight.empty({**self._adapter_meta[side], "tensors": {}})
        pw.tensors = self._fields(f"adapter_{side}", self._adapter_fields[side])
        return pw

    @property
    def format(self) -> str:
        """Weight format name: ``nm`` (with ``n``/``m`` in meta), ``unstructured`` or ``dense``."""
        return self._weight_meta["format"]

    # -- weights -----------------------------------------------------------------------------
    def dense_weight(self) -> torch.Tensor:
        """fp32 ``(d_out, d_in)`` sparse quantised weight ``Q(W) * M`` (fresh tensor)."""
        return self.packed_weight().to_dense()

    def _cached_dense(self, dtype: torch.dtype) -> torch.Tensor:
        """Dense weight in ``dtype``, cached until a weight buffer changes (reference backend)."""
        if not self.cache_dense:
            return self.dense_weight().to(dtype)
        key = version_key(*self._fields("weight", self._weight_fields).values())
        if self._dense_cache.get("key") != key:
            self._dense_cache = {"key": key}
        if dtype not in self._dense_cache:
            self._dense_cache[dtype] = self.dense_weight().to(dtype)
        return self._dense_cache[dtype]

    def adapters(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Effective ``(L (d_in, r), R (r, d_out))`` as the forward uses them (autograd-connected).

        Quantised adapters: fake-quantised values with a straight-through gradient. Under
        ``torch.no_grad`` with ``cache_dense`` the values are cached until the parameters change.
        """
        if self.rank == 0:
            return None
        if not self._q_ad:
            return self.lora_l, self.lora_r
        grad = torch.is_grad_enabled() and (self.lora_l.requires_grad or self.lora_r.requires_grad)
        # the in_scale buffers are fixed (load_state_dict and .to() clear the cache): the cache
        # is checked before anything else is decoded (a per-token cost when generating)
        key = version_key(self.lora_l, self.lora_r)
        if not grad and self.cache_dense and self._adapter_cache.get("key") == key:
            return self._adapter_cache["lr"]
        (g_l, ins_l), (g_r, ins_r) = self._adapter_quant_args("l"), self._adapter_quant_args("r")
        bits = self.adapter_bits
        if grad:
            # L^T (r, d_in) is grouped along d_in, R^T (d_out, r) along r. Contiguous like the
            # parameters: the same matmul layout as the no-grad path and as fp adapters, so
            # training and inference values agree bit for bit
            left = FakeQuantSTE.apply(self.lora_l.t(), bits, g_l, ins_l).t().contiguous()
            right = FakeQuantSTE.apply(self.lora_r.t(), bits, g_r, ins_r).t().contiguous()
            return left, right
        if not self.cache_dense:  # lean: transient values, nothing adapter-sized kept
            with torch.no_grad():
                left = fake_quant_absmax(self.lora_l.t(), bits, g_l, ins_l).t()
                right = fake_quant_absmax(self.lora_r.t(), bits, g_r, ins_r).t()
            return left.contiguous(), right.contiguous()
        if self._adapter_cache.get("key") != key:
            with torch.no_grad():
                left = fake_quant_absmax(self.lora_l.t(), bits, g_l, ins_l).t()
                right = fake_quant_absmax(self.lora_r.t(), bits, g_r, ins_r).t()
            self._adapter_cache = {"key": key, "lr": (left.contiguous(), right.contiguous())}
        return self._adapter_cache["lr"]

    def _adapter_quant_args(self, side: str) -> tuple[int, torch.Tensor | None]:
        """(group size, in_scale in its logical dtype or None) of packed adapter ``side``; both
        stay fixed during fine-tuning."""
        pw = self.packed_adapter(side)
        return pw.group_size, pw.float_field("in_scale")

    def merged_weight(self) -> torch.Tensor:
        """fp32 ``(d_out, d_in)``: ``Q(W) * M + (L R)^T`` with the adapters the forward uses."""
        w = self.dense_weight()
        with torch.no_grad():
            lr = self.adapters()
            if lr is not None:
                w = w + (lr[0].to(torch.float32) @ lr[1].to(torch.float32)).T
        return w

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """A plain fp32 ``nn.Linear`` computing what this layer computes (adapters merged)."""
        w = self.merged_weight()  # (out_features, in_features)
        lin = nn.Linear(w.shape[1], w.shape[0], bias=self.bias is not None)
        lin.weight.data.copy_(w)
        if self.bias is not None:
            lin.bias.data.copy_(self.bias.detach().float())
        return lin

    @torch.no_grad()
    def round_fp_adapters(self) -> None:
        """Rounds fp adapter parameters to their storage dtype (no-op for fp32 / quantised)."""
        if self.rank and not self._q_ad and self.adapter_dtype != "float32":
            dt = FLOAT_DTYPES[self.adapter_dtype]
            for p in (self.lora_l, self.lora_r):
                p.copy_(p.to(dt).to(p.dtype))

    @torch.no_grad()
    def rebuild_adapter_params(self) -> None:
        """Sets quantised adapters' fp32 parameters to their packed codes (bit-exact; a packed
        checkpoint stores only the codes and scales)."""
        if not self._q_ad:
            return
        for side in ("l", "r"):
            value = self.packed_adapter(side).to_dense().T.contiguous()
            setattr(self, f"lora_{side}", nn.Parameter(value))

    def adapters_on_grid(self) -> bool:
        """True when quantised adapter parameters equal their packed codes (always for fp)."""
        if not self._q_ad:
            return True
        return all(
            torch.equal(getattr(self, f"lora_{s}").detach(), self.packed_adapter(s).to_dense().T)
            for s in ("l", "r")
        )

    @torch.no_grad()
    def requantize_adapters(self) -> None:
        """Re-quantises the adapter parameters into the packed buffers and snaps them to the grid.

        No-op for fp adapters or rank 0.
        """
        if not self._q_ad:
            return
        for side, param in (("l", self.lora_l), ("r", self.lora_r)):
            group, ins = self._adapter_quant_args(side)
            pw = pack_absmax(param.t(), self.adapter_bits, group, ins)  # L^T or R^T
            for k in self._adapter_fields[side]:
                buf = getattr(self, f"adapter_{side}_{k}")
                new = pw.tensors[k]
                if new.dtype != buf.dtype:  # scale dtype grew from fp16 to fp32 (not expected)
                    raise ValueError(
                        f"requantize_adapters: {side} {k} needs {new.dtype}, stored {buf.dtype}"
                    )
                buf.copy_(new)
            param.copy_(pw.to_dense().T)

    def packed_nbytes(self) -> int:
        """Bytes stored for serving: packed weight + scales + adapters (bias excluded).

        Quantised adapters count their packed codes and scales (the fp32 training parameters are
        a fine-tuning copy, rebuilt from the codes on load, not stored); fp adapters count their
        values at ``adapter_dtype`` (what a packed checkpoint stores).
        """
        total = self.packed_weight().nbytes()
        if self._q_ad:
            total += self.packed_adapter("l").nbytes() + self.packed_adapter("r").nbytes()
        elif self.rank:
            size = FLOAT_DTYPES[self.adapter_dtype].itemsize
            total += size * self.rank * (self.in_features + self.out_features)
        return total

    # -- forward -----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x (..., d_in)`` -> ``(..., d_out)`` in ``x``'s dtype.

        The packed base is a frozen function of the buffers: its product runs through
        ``PackedBaseMatmul``, which dequantises the weight just in time in the forward and again
        in the backward (``grad_x = grad_y W``), so nothing dense outlives one layer call unless
        ``cache_dense`` is on. The adapters are ordinary autograd (STE when quantised).
        """
        if x.shape[-1] != self.in_features:
            raise ValueError(f"SLiMLinear: input last dim {x.shape[-1]} != {self.in_features}")
        if self.backend == "triton":
            return self._forward_triton(x)
        if self.backend != "reference":
            raise ValueError(
                f"SLiMLinear.backend: got {self.backend!r}; allowed: reference, triton"
            )
        dtype = x.dtype
        if self.cache_dense:
            y = nn.functional.linear(x, self._cached_dense(dtype))
        else:
            y = PackedBaseMatmul.apply(x, self)
        return self._add_adapters_and_bias(x, y)

    def _add_adapters_and_bias(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        lr = self.adapters()
        if lr is not None:
            y = y + (x @ lr[0].to(dtype)) @ lr[1].to(dtype)
        if self.bias is not None:
            y = y + self.bias.to(dtype)
        return y

    def _needs_grad(self, x: torch.Tensor) -> bool:
        if not torch.is_grad_enabled():
            return False
        adapters = self.rank and (self.lora_l.requires_grad or self.lora_r.requires_grad)
        return bool(x.requires_grad or adapters)

    def _forward_triton(self, x: torch.Tensor) -> torch.Tensor:
        from ..kernels.ops import slim_base_triton, slim_linear_triton

        if not self._needs_grad(x):
            return slim_linear_triton(self, x)  # fused: 2:4 base + adapters + bias
        # training: the base through the kernel (backward: grad_y W, dequantised just in time),
        # the adapters through autograd so their gradients (STE) flow
        y = PackedBaseMatmul.apply(x, self, slim_base_triton)
        return self._add_adapters_and_bias(x, y)

    # -- housekeeping ------------------------------------------------------------------------
    def _apply(self, fn, recurse: bool = True):
        self._dense_cache = {}
        self._adapter_cache = {}
        self._kernel_cache = {}
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self._dense_cache = {}
        self._adapter_cache = {}
        self._kernel_cache = {}
        return super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        w = self._weight_meta
        fmt = f"{w['n']}:{w['m']}" if w["format"] == "nm" else w["format"]
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, format={fmt}, "
            f"bits={w['bits']}, rank={self.rank}, adapter_bits={self.adapter_bits}, "
            f"bias={self.bias is not None}, backend={self.backend}"
        )
