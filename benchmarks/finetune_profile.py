"""Where a fine-tuning step's time goes: torch.profiler over two training steps of the lean
runtime (packed base dequantised just in time, quantised adapters through their STE), after two
warm-up steps; prints forward / backward / optimiser seconds per step and the op table.

    python benchmarks/finetune_profile.py RUN/packed [THREADS] > profile.txt

RUN/packed: a compress.py run's packed checkpoint of the embedded SmolLM2 (any method).
"""

from __future__ import annotations

import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile, record_function


def main() -> None:
    from slim_lightning import load_compressed
    from slim_lightning.data.config import CalibConfig
    from slim_lightning.data.evaluation import training_nll
    from slim_lightning.data.text import calibration_windows
    from slim_lightning.nn.adapters import mark_trainable
    from slim_lightning.nn.backend import set_dense_cache

    torch.manual_seed(0)
    torch.set_num_threads(int(sys.argv[2]) if len(sys.argv) > 2 else 1)
    model, tok, _ = load_compressed(sys.argv[1], verify=False)
    set_dense_cache(model, False)
    mark_trainable(model)
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
