"""Cross-check of ``method=sparsegpt_optq`` against llm-compressor's SparseGPT + GPTQ / RTN.

Step 1 (project Python) dumps the model as a plain HF folder plus the exact calibration and
evaluation windows of a compress.py configuration; step 2 (a venv with llmcompressor) compresses
the same model on the same windows and prints perplexities on the same evaluation windows.

    python benchmarks/llmc_compare.py dump /tmp/llmc_cmp experiment=smollm2_2of4_quality \
        calib.nsamples=16 eval.max_windows=16
    /tmp/llmc/bin/python benchmarks/llmc_compare.py run /tmp/llmc_cmp
    # ours, same windows:
    python compress.py experiment=smollm2_2of4_quality calib.nsamples=16 eval.max_windows=16 \
        export.packed=false method=sparsegpt_optq quant.group_size=64
    python compress.py ... method=sparsegpt_optq quant=none pruner.joint_quant=false

The venv: ``python -m venv --system-site-packages /tmp/llmc && /tmp/llmc/bin/pip install
llmcompressor torch==2.13.0`` (it brings its own transformers). llm-compressor refuses int4 groups
that do not divide d_in (SmolLM2: 576 % 128 = 64), so both sides use groups of 64 here.

llm-compressor >= 0.14 removed GPTQ's sparsity preservation (vllm-project/llm-compressor#2860),
so SparseGPT followed by GPTQ refills the pruned weights: that model is reported as is (not 2:4),
and also with the 2:4 mask re-applied after GPTQ; SparseGPT + RTN (int4, zeros stay zero) is the
variant that stays 2:4 by construction.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch


def dump(out: Path, overrides: list[str]) -> None:
    from hydra import compose, initialize_config_dir

    from slim_lightning.compress.plan import build_plan
    from slim_lightning.data.text import calibration_windows, eval_tokens, eval_windows
    from slim_lightning.models.load import load_model

    conf = str(Path(__file__).resolve().parents[1] / "conf")
    with initialize_config_dir(conf, version_base="1.3"):
        plan = build_plan(compose("compress", overrides=overrides))
    model, tok = load_model(plan.model)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out / "model", safe_serialization=True)
    tok.save_pretrained(out / "model")
    calib = calibration_windows(tok, plan.calib)
    ev = eval_windows(eval_tokens(tok, plan.eval), plan.eval.seqlen, plan.eval.max_windows)
    torch.save({"calib": calib, "eval": ev, "overrides": overrides}, out / "windows.pt")
    print(f"calib {tuple(calib.shape)} eval {tuple(ev.shape)} -> {out}")


@torch.no_grad()
def ppl(model, windows: torch.Tensor) -> float:
    nll, n = 0.0, 0
    for w in windows.split(1):
        logits = model(input_ids=w, use_cache=False).logits[:, :-1].float()
        nll += torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1), reduction="sum"
        ).item()
        n += w.shape[1] - 1
    return math.exp(nll / n)


def run(out: Path) -> None:
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from transformers import AutoModelForCausalLM

    data = torch.load(out / "windows.pt")
    calib, ev = data["calib"], data["eval"]
    ds = Dataset.from_dict(
        {"input_ids": calib.tolist(), "attention_mask": [[1] * calib.shape[1]] * calib.shape[0]}
    )
    kw = dict(
        dataset=ds,
        num_calibration_samples=calib.shape[0],
        max_seq_length=calib.shape[1],
        shuffle_calibration_samples=False,
    )
    blocks = r"re:model.layers.\d+$"  # SparseGPT: the decoder layers whose linears are pruned
    results = {}
    # W4A16 (symmetric int4, group 128) but with groups of 64: llm-compressor refuses groups that do
    # not divide d_in (SmolLM2: 576 % 128 = 64); compare with compress.py quant.group_size=64
    w4g64 = {
        "group_0": QuantizationScheme(
            targets=["Linear"],
            weights=QuantizationArgs(
                num_bits=4, type="int", strategy="group", group_size=64, symmetric=True
            ),
        )
    }

    def load():
        m = AutoModelForCausalLM.from_pretrained(out / "model", torch_dtype=torch.float32)
        m.config.use_cache = False
        return m.eval()

    def masks(m):
        return {n: (p != 0) for n, p in m.named_parameters() if "proj" in n and "layers" in n}

    def sparsity(m):
        z = t = 0
        for n, p in m.named_parameters():
            if "proj" in n and "layers" in n:
                z += int((p == 0).sum())
                t += p.numel()
        return z / t

    cached = out / "sparsegpt_state.pt"  # reruns skip the SparseGPT pass
    if cached.exists():
        sparse_sd, results["sparsegpt_2of4_fp"] = torch.load(cached)
        t_sgpt = results["sparsegpt_2of4_fp"]["s"]
        model = load()
        model.load_state_dict(sparse_sd)
    else:
        t0 = time.perf_counter()
        model = load()
        oneshot(
            model=model,
            recipe=[
                SparseGPTModifier(
                    sparsity=0.5,
                    mask_structure="2:4",
                    dampening_frac=0.01,
                    block_size=128,
                    targets=[blocks],
                )
            ],
            **kw,
        )
        t_sgpt = time.perf_counter() - t0
        sparse_sd = {k: v.clone() for k, v in model.state_dict().items()}
        results["sparsegpt_2of4_fp"] = {
            "ppl": ppl(model, ev),
            "sparsity": sparsity(model),
            "s": t_sgpt,
        }
        torch.save((sparse_sd, results["sparsegpt_2of4_fp"]), cached)
    mk = masks(model)
    print(results, flush=True)

    # SparseGPT then RTN int4 (symmetric, group 64): zeros stay zero
    model = load()
    model.load_state_dict(sparse_sd)
    oneshot(
        model=model,
        recipe=[QuantizationModifier(config_groups=w4g64, ignore=["lm_head"])],
        **kw,
    )
    results["sparsegpt_rtn_w4g64"] = {"ppl": ppl(model, ev), "sparsity": sparsity(model)}
    print(results, flush=True)

    # SparseGPT then GPTQ int4 g64: GPTQ no longer preserves the mask in llm-compressor >= 0.14
    model = load()
    model.load_state_dict(sparse_sd)
    t0 = time.perf_counter()
    oneshot(
        model=model,
        recipe=[
            GPTQModifier(
                config_groups=w4g64,
                ignore=["lm_head"],
                dampening_frac=0.01,
                block_size=128,
            )
        ],
        **kw,
    )
    results["sparsegpt_gptq_w4g64_as_is"] = {
        "ppl": ppl(model, ev),
        "sparsity": sparsity(model),
        "s": t_sgpt + time.perf_counter() - t0,
    }
    print(results, flush=True)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in mk:
                p.mul_(mk[n])
    results["sparsegpt_gptq_w4g64_remasked"] = {"ppl": ppl(model, ev), "sparsity": sparsity(model)}
    print(json.dumps(results, indent=1))
    (out / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    mode, path = sys.argv[1], Path(sys.argv[2])
    dump(path, sys.argv[3:]) if mode == "dump" else run(path)
