"""Quantised embeddings + LM head on a packed checkpoint: perplexity cost vs checkpoint size.

    python benchmarks/embeddings_bench.py runs/default_smollm2/packed --max-windows 40

For ``embeddings.bits`` in (none, 8, 4) it loads the packed checkpoint, quantises the input
embedding and LM head exactly as ``compress.py embeddings.bits=B`` does after the blocks
(round-to-nearest groupwise AbsMax; a tied head shares the codes), writes the checkpoint to a
temporary directory, and reports perplexity on the embedded evaluation windows and the written
sizes. Results: ``benchmarks/results/embeddings_<name>.json``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> dict:
    from slim_lightning.checkpoint import load_compressed, read_meta, save_compressed
    from slim_lightning.data.config import EvalConfig
    from slim_lightning.data.evaluation import make_eval_windows, perplexity
    from slim_lightning.nn.backend import set_dense_cache
    from slim_lightning.nn.embedding import quantize_embeddings

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("packed")
    ap.add_argument("--max-windows", type=int, default=40)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    rows = []
    windows = None
    for bits in (None, 8, 4):
        model, tok, meta = load_compressed(a.packed)
        if windows is None:
            windows = make_eval_windows(tok, EvalConfig(max_windows=a.max_windows))
        rep = quantize_embeddings(model, bits, a.group_size) if bits else {}
        with tempfile.TemporaryDirectory() as d:
            save_compressed(model, tok, Path(d) / "ck", dtype=meta["dtype"])
            size = read_meta(Path(d) / "ck")["size"]
        set_dense_cache(model, True)  # speed only: the same values as the lean path
        t0 = time.perf_counter()
        ppl = perplexity(model, windows, progress=False)["ppl"]
        rows.append(
            {
                "embeddings_bits": bits,
                "ppl": ppl,
                "eval_s": time.perf_counter() - t0,
                "checkpoint_mib": size["checkpoint_bytes"] / 2**20,
                "checkpoint_ratio_vs_fp16": size["checkpoint_ratio_vs_fp16"],
                "rest_mib": size["rest_bytes"] / 2**20,
                "linears_ratio_vs_fp16": size["linears_ratio_vs_fp16"],
                **{k: v for k, v in rep.items() if k.endswith("rel_err")},
            }
        )
        print(json.dumps(rows[-1]))
        del model
    out = {
        "packed": str(a.packed),
        "windows": list(windows.shape),
        "group_size": a.group_size,
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "rows": rows,
    }
    name = Path(a.packed).resolve().parent.name
    path = Path(a.out or Path(__file__).parent / "results" / f"embeddings_{name}.json")
    path.write_text(json.dumps(out, indent=2))
    print(
        f"| embeddings | ppl ({windows.shape[0]} x {windows.shape[1]}) | checkpoint MiB | x fp16 |"
    )
    print("|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['embeddings_bits'] or 'fp16'} | {r['ppl']:.2f} | {r['checkpoint_mib']:.1f} | "
            f"{r['checkpoint_ratio_vs_fp16']:.3f} |"
        )
    return out


if __name__ == "__main__":
    main()
