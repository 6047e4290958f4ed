"""Where a fine-tuning step's time goes: torch.profiler over two training steps of the lean
runtime (packed base dequantised just in time, quantised adapters through their STE), after two
warm-up steps; prints forward / backward / optimiser seconds per step and the op table.
``--side qlora`` profiles the QLoRA anchor of ``finetune_bench.py`` instead (bitsandbytes NF4 +
peft LoRA with the same ranks), for a like-for-like split.

    python benchmarks/finetune_profile.py RUN/packed [THREADS] [--side lean|qlora] > profile.txt

RUN/packed: a compress.py run's packed checkpoint of the embedded SmolLM2 (any method).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function


def main() -> None:
    from slim_lightning import load_compressed
    from slim_lightning.data.config import CalibConfig
    from slim_lightning.data.evaluation import training_nll
    from slim_lightning.data.text import calibration_windows
    from slim_lightning.nn.adapters import mark_trainable
    from slim_lightning.nn.backend import set_dense_cache

    ap = argparse.ArgumentParser()
    ap.add_argument("packed")
    ap.add_argument("threads", nargs="?", type=int, default=1)
    ap.add_argument("--side", choices=("lean", "qlora"), default="lean")
    ap.add_argument("--model", default="embedded:smollm2", help="the dense model (qlora side)")
    a = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(a.threads)
    if a.side == "lean":
        model, tok, _ = load_compressed(a.packed, verify=False)
        set_dense_cache(model, False)
        mark_trainable(model)
    else:
        sys.path.insert(0, str(Path(__file__).parent))
        from finetune_bench import _qlora_model, _ranks, _with_lora

        peft_model, tok = _qlora_model(a.model)
        peft_model = _with_lora(peft_model, _ranks(a.packed))
        model = peft_model.base_model.model
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    data = calibration_windows(tok, CalibConfig(nsamples=6, seqlen=512, seed=1))

    def step(i: int) -> tuple[float, float, float]:
        t0 = time.perf_counter()
        with record_function("FWD"):
            nll, n = training_nll(model, data[i : i + 1])
        t1 = time.perf_counter()
        with record_function("BWD"):
            (nll / n).backward()
        t2 = time.perf_counter()
        with record_function("OPT"):
            opt.step()
            opt.zero_grad(set_to_none=True)
        return t1 - t0, t2 - t1, time.perf_counter() - t2

    for i in range(2):
        print("warm", step(i))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(2, 4):
            print("prof", step(i))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
    for i in range(4, 6):
        print("plain", step(i))


if __name__ == "__main__":
    main()
