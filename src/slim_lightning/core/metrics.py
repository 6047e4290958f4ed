"""Error measures of a compressed layer, computed in blocks of rows for large weights."""

from __future__ import annotations

import math

import torch

#: values of a weight measured at once (larger weights in blocks of rows: no full-size
#: temporaries beside the weight)
ROW_STEP = 1 << 22


def weighted_rel_error(
    w: torch.Tensor,
    w_hat: torch.Tensor,
    s: torch.Tensor,
    left: torch.Tensor | None = None,
    right: torch.Tensor | None = None,
) -> float:
    """Saliency-weighted relative error ``||(W - W_hat) diag(s)||_F / ||W diag(s)||_F``, with
    ``W_hat + (L R)^T`` when the adapters ``left`` / ``right`` are given. A weight of more than
    ``ROW_STEP`` values is measured in blocks of rows (no full-size temporaries)."""
    rows, cols = w.shape
    step = max(1, ROW_STEP // cols)
    if rows <= step:
        if left is not None:
            w_hat = w_hat + (left @ right).T
        num = torch.linalg.norm((w - w_hat) * s[None, :])
        den = torch.linalg.norm(w * s[None, :])
        return float(num / den) if den > 0 else float(num)
    num2 = den2 = 0.0
    for r0 in range(0, rows, step):
        d = w[r0 : r0 + step] - w_hat[r0 : r0 + step]
        if left is not None:
            d -= (left @ right[:, r0 : r0 + step]).T
        num2 += float(d.mul_(s[None, :]).double().square().sum())
        den2 += float((w[r0 : r0 + step] * s[None, :]).double().square().sum())
    return math.sqrt(num2 / den2) if den2 > 0 else math.sqrt(num2)
