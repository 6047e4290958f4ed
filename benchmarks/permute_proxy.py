"""Layer-wise screen of ``lowrank.permute``: the output error of ``down_proj`` and ``o_proj``
compressed with and without the free input-channel permutation (``compress.permute``), from the
statistics ``benchmarks/layer_proxy.py`` caches (run it first with the same common overrides).

    python benchmarks/layer_proxy.py calib.nsamples=32 -- method=slim_q_fast
    OMP_NUM_THREADS=1 python benchmarks/permute_proxy.py calib.nsamples=32 method=slim_q_fast

Prints, per block and linear, the share of Wanda importance the 2:4 pattern keeps and the
calibration outputs' relative error ``tr(dW H dW^T) / tr(W H W^T)``, identity vs permuted.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    from layer_proxy import _cfg, _load_cache

    from slim_lightning.compress.permute import retained, round_robin
    from slim_lightning.compress.plan import build_plan
    from slim_lightning.core.compress import compress_linear
    from slim_lightning.core.types import LayerStats
    from slim_lightning.io import cache_root

    overrides = sys.argv[1:]
    common = [o for o in overrides if not o.startswith("method=")]
    key = hashlib.sha256("\x00".join(common).encode()).hexdigest()[:24]
    weights, stats = _load_cache(cache_root() / "layer_proxy" / f"{key}.safetensors")
    spec = build_plan(_cfg(overrides)).spec
    n, m = spec.sparsity.n, spec.sparsity.m

    def err(w: torch.Tensor, st: LayerStats) -> float:
        h = st.hessian / st.n_tokens
        dw = w - compress_linear(w, st, spec).effective_weight()
        return float(torch.einsum("ij,jk,ik->", dw, h, dw) / torch.einsum("ij,jk,ik->", w, h, w))

    print("| linear | retained id | retained perm | out err id | out err perm |")
    tot = {"id": 0.0, "perm": 0.0}
    for k in sorted(weights, key=lambda s: (int(s.split(".")[0]), s)):
        if not k.endswith(("mlp.down_proj", "self_attn.o_proj")):
            continue
        w, st = weights[k], stats[k]
        rms = (st.sq_sum / st.n_tokens).sqrt()
        imp = (w.abs() * rms[None, :]).sum(0)
        if k.endswith("o_proj"):  # SmolLM2: 9 query heads over 3 key-value heads of 64
            hd, nq, nkv = 64, w.shape[1] // 64, 3
            per = imp.reshape(nkv, nq // nkv, hd).sum(1)
            p = torch.cat([h * hd + round_robin(per[h // (nq // nkv)], m) for h in range(nq)])
        else:
            p = round_robin(imp, m)
        sp = LayerStats(st.sq_sum[p], st.abs_sum[p], st.n_tokens, st.hessian[p][:, p])
        e0, e1 = err(w, st), err(w[:, p], sp)
        r0, r1 = retained(w, rms, n, m), retained(w[:, p], rms[p], n, m)
        tot["id"] += e0
        tot["perm"] += e1
        print(f"| {k} | {r0:.1f} | {r1:.1f} | {e0:.5f} | {e1:.5f} |", flush=True)
    print(f"sum of relative errors: identity {tot['id']:.4f}, permuted {tot['perm']:.4f}")


if __name__ == "__main__":
    main()
