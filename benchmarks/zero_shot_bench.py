"""Zero-shot accuracy of a packed checkpoint and of its dense parent on the offline task.

    pip install -e '.[eval]'
    python benchmarks/zero_shot_bench.py RUN/packed --json benchmarks/results/zero_shot_smollm2.json

``RUN/packed`` is a ``compress.py`` run of the embedded SmolLM2 (the dense parent is loaded from
``slim.json``'s recorded ``model`` settings). The task is ``slim_continuation`` (four-choice
next-sentence, built from the evaluation half of the embedded text; chance 0.25), through
lm-eval-harness on the model objects.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("packed")
    ap.add_argument("--tasks", default="slim_continuation")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    import torch
    from hydra import compose, initialize_config_dir

    from slim_lightning import load_compressed
    from slim_lightning.compress.plan import build_plan
    from slim_lightning.data.evaluation import zero_shot
    from slim_lightning.models.load import load_model

    tasks = a.tasks.split(",")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="compress")  # the embedded SmolLM2, as compress.py loads it
    plan = build_plan(cfg)
    rows = {}
    t0 = time.perf_counter()
    dense, tok = load_model(plan.model)
    rows["dense"] = zero_shot(dense, tok, tasks=tasks)
    del dense
    model, ctok, meta = load_compressed(a.packed)
    rows["compressed"] = zero_shot(model, ctok, tasks=tasks)
    out = {
        "command": " ".join(["python", "benchmarks/zero_shot_bench.py", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, CPU only",
        "threads": torch.get_num_threads(),
        "packed_method": (meta.get("plan") or {}).get("method"),
        "packed_ppl": (meta.get("results") or {}).get("ppl"),
        "chance": 0.25,
        "wall_s": time.perf_counter() - t0,
        "rows": rows,
    }
    print(json.dumps(out, indent=1, default=str))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
