"""Distillation from the dense parent (``train.loss=kd|kd_squarehead``).

The teacher is the uncompressed model (``model=``), frozen, kept outside the LightningModule's
module tree (not in checkpoints, not wrapped by DDP; each rank holds its own copy). Memory: one
more copy of the dense model in ``train.teacher_dtype`` (16-bit on a GPU: 2 bytes per parameter;
fp32 on CPU, where 16-bit matmuls are slow) plus its activations for one batch (no gradients).

* ``kd``: per-token KL(teacher || student) of the next-token distributions at temperature ``T``,
  times ``T^2``, over every position; the LM head and both log-softmaxes run ``chunk_tokens``
  rows at a time under activation checkpointing (no full-vocabulary logits of the batch).
* ``kd_squarehead``: ``kd`` plus SquareHead feature distillation, the mean over decoder layers
  of ``||h_s - h_t||^2 / ||h_t||^2`` (each layer's output hidden states).
* ``train.lm_weight`` adds the usual next-token loss on the data's labels, computed from the same
  student forward and the same logits chunks (one decoder pass, one LM head pass per chunk).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def _split(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    base = getattr(model, "model", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if base is None or head is None:
        raise TypeError(
            f"{type(model).__name__} has no decoder (.model) + LM head split; train.loss=kd "
            "needs one (LLaMA/Mistral/Qwen2/OPT-style causal LMs)"
        )
    return base, head


def distill_loss(
    student: nn.Module,
    teacher: nn.Module,
    ids: torch.Tensor,
    *,
    kind: str = "kd",
    temperature: float = 1.0,
    squarehead_weight: float = 1.0,
    lm_weight: float = 0.0,
    chunk_tokens: int = 256,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The distillation loss of one batch ``ids`` (b, T): KL per token (+ SquareHead) (+
    ``lm_weight`` x the mean next-token NLL of the labels ``ids[:, 1:]``, at temperature 1).

    Returns:
        ``(loss, parts)``: the 0-dim fp32 loss to minimise and its parts as floats.
    """
    from torch.utils.checkpoint import checkpoint

    s_base, s_head = _split(student)
    t_base, t_head = _split(teacher)
    feats = kind == "kd_squarehead"
    with torch.no_grad():
        t_out = t_base(input_ids=ids, use_cache=False, output_hidden_states=feats)
    s_out = s_base(input_ids=ids, use_cache=False, output_hidden_states=feats)
    hs, ht = s_out[0], t_out[0]
    b, t, d = hs.shape
    hs, ht = hs.reshape(b * t, d), ht.reshape(b * t, d).to(hs.dtype)
    tau = float(temperature)
    with_lm = lm_weight > 0
    # next-token labels of every flattened position; a window's last position has none (-100)
    labels = torch.cat([ids[:, 1:], ids.new_full((b, 1), -100)], dim=1).reshape(-1)

    def chunk_losses(hc: torch.Tensor, htc: torch.Tensor, yc: torch.Tensor) -> torch.Tensor:
        z = s_head(hc).float()
        ls = F.log_softmax(z / tau, dim=-1)
        with torch.no_grad():
            lt = F.log_softmax(t_head(htc).float() / tau, dim=-1)
        kl = F.kl_div(ls, lt, log_target=True, reduction="sum")
        if not with_lm:
            return kl.reshape(1)
        return torch.stack([kl, F.cross_entropy(z, yc, ignore_index=-100, reduction="sum")])

    sums = hs.new_zeros(2 if with_lm else 1, dtype=torch.float32)
    for s in range(0, hs.shape[0], chunk_tokens):
        args = (hs[s : s + chunk_tokens], ht[s : s + chunk_tokens], labels[s : s + chunk_tokens])
        if torch.is_grad_enabled() and args[0].requires_grad:
            sums = sums + checkpoint(chunk_losses, *args, use_reentrant=False)
        else:
            sums = sums + chunk_losses(*args)
    kd = sums[0] * (tau * tau) / (b * t)
    loss, parts = kd, {"kd": float(kd.detach())}
    if with_lm:
        nll = sums[1] / max(1, b * (t - 1))
        loss = loss + lm_weight * nll
        parts["lm"] = float(nll.detach())
    if feats:
        sq = hs.new_zeros((), dtype=torch.float32)
        layers = list(zip(s_out.hidden_states[1:], t_out.hidden_states[1:]))
        for a, ref in layers:
            a, ref = a.float(), ref.float().to(a.device)
            sq = sq + ((a - ref) ** 2).sum() / (ref * ref).sum().clamp_min(1e-30)
        sq = sq / max(1, len(layers))
        loss = loss + squarehead_weight * sq
        parts["squarehead"] = float(sq.detach())
    return loss, parts


def check_teacher(plan: Any, compressed_meta: dict | None, digest: str | None) -> None:
    """Refuses a teacher (``model=``, weights digest ``digest``) that is not the dense parent
    recorded in the compressed checkpoint (``slim.json["source_sha256"]``): distilling from
    another model trains silently towards the wrong outputs. Nothing to compare (a checkpoint
    from before the record, no digest) passes."""
    from ..errors import ConfigError

    want = (compressed_meta or {}).get("source_sha256")
    if want and digest and digest != want:
        raise ConfigError(
            "model",
            getattr(plan.model, "path", plan.model),
            f"the dense parent of compressed.path for train.loss=kd* (the checkpoint was "
            f"compressed from weights with sha256 {want[:12]}; these hash to {digest[:12]}); "
            "or train.loss=lm",
        )


def load_teacher(plan: Any, prepared: Any, dtype: str, device: torch.device) -> nn.Module:
    """The dense parent (``plan.model``), loaded and verified like any base model, frozen;
    refused when the compressed checkpoint records another parent (:func:`check_teacher`)."""
    from ..compress.pipeline import load_base
    from ..dtypes import FLOAT_DTYPES

    base = load_base(plan, prepared)
    check_teacher(plan, getattr(prepared, "compressed_meta", None), base.model_digest)
    teacher = base.model
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" else "float32"
    teacher.to(device=device, dtype=FLOAT_DTYPES[dtype])
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher
