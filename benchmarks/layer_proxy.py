"""Fast screening of compression options on real layers, without the block-by-block pipeline.

Collects every linear's input statistics (incl. the Hessian ``sum x x^T``) from ONE forward pass of
the dense model over the calibration windows, then compresses each linear independently with the
specs given as Hydra override lists and prints the output-space error
``sum_l tr(dW_l H_l dW_l^T) / sum_l tr(W_l H_l W_l^T)`` (the calibration outputs' squared error).
It ignores error propagation between blocks: use it to rank options, confirm winners by perplexity.

    python benchmarks/layer_proxy.py calib.nsamples=16 -- "method=slim" "method=slim_q" \
        "method=slim_q lowrank.quant_in_scale=true"

The statistics are cached as safetensors under the project cache (``$SLIM_LIGHTNING_CACHE`` or
``~/.cache/slim_lightning``/layer_proxy, keyed by a hash of the common overrides before ``--``):
no pickles, no predictable names in a shared /tmp.
"""

from __future__ import annotations

import hashlib
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

CONF = str(Path(__file__).resolve().parents[1] / "conf")


def _cfg(overrides: list[str]):
    with initialize_config_dir(CONF, version_base="1.3"):
        return compose("compress", overrides=overrides)


@torch.no_grad()
def collect(common: list[str]) -> tuple[dict, dict]:
    from slim_lightning.compress.plan import build_plan
    from slim_lightning.core.types import LayerStats
    from slim_lightning.data.text import calibration_windows
    from slim_lightning.models.arch import block_linears, get_arch, get_blocks
    from slim_lightning.models.load import load_model

    plan = build_plan(_cfg(common))
    model, tok = load_model(plan.model)
    ids = calibration_windows(tok, plan.calib)
    arch = get_arch(model)
    acc, weights, hooks = {}, {}, []
    for i, block in enumerate(get_blocks(model, arch)):
        for name, lin in block_linears(block, arch).items():
            key = f"{i}.{name}"
            weights[key] = lin.weight.detach().float().clone()
            d = lin.in_features
            acc[key] = [torch.zeros(d), torch.zeros(d), torch.zeros(d, d), 0]

            def hook(_m, inp, _o, a=acc[key]):
                x = inp[0].detach().float().reshape(-1, inp[0].shape[-1])  # (tokens, d_in)
                a[0] += (x * x).sum(0)
                a[1] += x.abs().sum(0)
                a[2] += x.T @ x
                a[3] += x.shape[0]

            hooks.append(lin.register_forward_hook(hook))
    for b in range(0, ids.shape[0], 4):
        model(ids[b : b + 4])
    for h in hooks:
        h.remove()
    stats = {k: LayerStats(a[0], a[1], a[3], a[2]) for k, a in acc.items()}
    return weights, stats


def evaluate(weights: dict, stats: dict, overrides: list[str]) -> dict[str, float]:
    from slim_lightning.compress.plan import build_plan
    from slim_lightning.core.compress import compress_linear

    spec = build_plan(_cfg(overrides)).spec
    num = den = bits = numel = 0.0
    t0 = time.perf_counter()
    for k, w in weights.items():
        st = stats[k]
        h = st.hessian / st.n_tokens
        c = compress_linear(w, st, spec)
        dw = w - c.effective_weight()
        num += float(torch.einsum("ij,jk,ik->", dw, h, dw))
        den += float(torch.einsum("ij,jk,ik->", w, h, w))
        bits += c.metrics["bits_per_weight"] * w.numel()
        numel += w.numel()
    return {"out_err": num / den, "bits": bits / numel, "s": time.perf_counter() - t0}


def _save_cache(path: Path, weights: dict, stats: dict) -> None:
    from slim_lightning.io import atomic_save_tensors

    flat = {}
    for k, w in weights.items():
        st = stats[k]
        flat[f"{k}|w"] = w
        flat[f"{k}|sq"], flat[f"{k}|abs"], flat[f"{k}|h"] = st.sq_sum, st.abs_sum, st.hessian
        flat[f"{k}|n"] = torch.tensor([st.n_tokens], dtype=torch.int64)
    atomic_save_tensors(flat, path)


def _load_cache(path: Path) -> tuple[dict, dict]:
    from slim_lightning.core.types import LayerStats
    from slim_lightning.io import load_tensors

    flat = load_tensors(path)
    keys = sorted({k.rsplit("|", 1)[0] for k in flat})
    weights = {k: flat[f"{k}|w"] for k in keys}
    stats = {
        k: LayerStats(flat[f"{k}|sq"], flat[f"{k}|abs"], int(flat[f"{k}|n"][0]), flat[f"{k}|h"])
        for k in keys
    }
    return weights, stats


def main() -> None:
    argv = sys.argv[1:]
    sep = argv.index("--") if "--" in argv else len(argv)
    common, variants = argv[:sep], argv[sep + 1 :]
    torch.manual_seed(0)
    from slim_lightning.io import cache_root

    key = hashlib.sha256("\x00".join(common).encode()).hexdigest()[:24]
    cache = cache_root() / "layer_proxy" / f"{key}.safetensors"
    if cache.exists():  # statistics depend only on the model and calibration overrides
        weights, stats = _load_cache(cache)
    else:
        weights, stats = collect(common)
        _save_cache(cache, weights, stats)
    for v in variants:
        r = evaluate(weights, stats, common + v.split())
        print(f"| {v} | {r['out_err']:.5f} | {r['bits']:.3f} | {r['s']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
