"""The whole GPU path in one prepared run, recorded in one JSON (``bash scripts/gpu_check.sh``).

Steps (each runs even when an earlier one failed; each has its own timeout, so the script never
hangs; each records status, seconds, return code, the tail of its output and the peak device
memory seen by ``nvidia-smi`` while it ran):

1. ``tests``: ``python -m pytest -m gpu`` (kernels, bf16 SLiMLinear end to end, triton backward);
2. ``compress``: ``compress.py`` of the embedded SmolLM2 on CUDA with the default method; its
   perplexity against the CPU run's recorded one (``--reference``; agreement within 1%);
3. ``train``: ``train.py +peft=true compressed.path=<that run> trainer=gpu`` for ``--train-steps``
   steps, tokens/s and peak memory; ``qlora_and_dense_generate``: ``benchmarks/finetune_bench.py
   --device cuda`` with peft QLoRA (bitsandbytes NF4, the packed run's adapter ranks) for the same
   steps, sequence length and batch, and the dense fp16 model's ``generate`` (128 new tokens);
4. ``generate``: ``python -m slim_lightning.generate`` with the packed kernels (tokens/s, batch 1);
5. ``kernels``: the kernel benchmark table (``kernels/results/<gpu>-<date>.json``).

``--dry-run`` runs the same steps on CPU with tiny shapes (the tiny random LLaMA, a few steps,
the Triton interpreter, plain LoRA instead of QLoRA), so the script is known to work before it
first meets a GPU (``tests/test_gpu_check.py``).

    python scripts/gpu_check.py                 # on a CUDA machine (under 8 minutes on an H100)
    python scripts/gpu_check.py --dry-run --out /tmp/gpu_dry
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
PROMPT = "Explain in two sentences why the sky is blue."


class DeviceMemory:
    """Peak used device memory (MiB) from ``nvidia-smi`` sampled every 0.2 s (None on CPU)."""

    def __init__(self) -> None:
        self.peak: float | None = None
        self._stop = threading.Event()
        self._ok = shutil.which("nvidia-smi") is not None
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                out = subprocess.run(
                    ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                    capture_output=True,
                    text=True,
                    timeout=5,
                ).stdout
                v = max(float(x) for x in out.split())
                self.peak = v if self.peak is None else max(self.peak, v)
            except Exception:  # noqa: BLE001 - a sample lost is not an error of the step
                pass
            self._stop.wait(0.2)

    def __enter__(self) -> DeviceMemory:
        if self._ok:
            self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._ok:
            self._t.join(timeout=10)


def run_step(name: str, cmd: list[str], timeout: int, env: dict, log_dir: Path) -> dict:
    """Runs one step in its own process group; a timeout kills the whole group."""
    t0 = time.perf_counter()
    rec: dict = {"name": name, "cmd": " ".join(cmd), "timeout_s": timeout}
    with DeviceMemory() as mem:
        p = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        try:
            out, _ = p.communicate(timeout=timeout)
            rec["status"] = "ok" if p.returncode == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, 9)
            out, _ = p.communicate()
            rec["status"] = "timeout"
    rec["returncode"] = p.returncode
    rec["seconds"] = round(time.perf_counter() - t0, 2)
    rec["device_peak_mib"] = mem.peak
    rec["output_tail"] = out[-3000:]
    (log_dir / f"{name}.log").write_text(out)
    print(f"[gpu_check] {name}: {rec['status']} in {rec['seconds']} s", flush=True)
    return rec


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def compare_ppl(ppl: float | None, reference: float | None, tol: float = 0.01) -> dict:
    """Agreement of a perplexity with its reference (relative difference <= ``tol``)."""
    if ppl is None or reference is None:
        return {"agrees": None, "why": "missing perplexity or reference"}
    rel = abs(ppl - reference) / reference
    return {"ppl": ppl, "reference": reference, "rel_diff": rel, "agrees": rel <= tol}


def tok_per_s(text: str) -> float | None:
    m = re.findall(r"([0-9.]+) tok/s", text)
    return float(m[-1]) if m else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, interpreter")
    ap.add_argument("--out", default=None, help="results directory (default benchmarks/results)")
    ap.add_argument("--train-steps", type=int, default=None)
    ap.add_argument(
        "--reference",
        default=str(ROOT / "benchmarks/results/cpu_reference_smollm2.json"),
        help="JSON with the CPU run's perplexity ({'ppl': ...})",
    )
    ap.add_argument("--step-timeout", type=int, default=None, help="seconds per step")
    a = ap.parse_args(argv)
    dry = a.dry_run
    steps = a.train_steps or (3 if dry else 50)
    out_dir = Path(a.out) if a.out else ROOT / "benchmarks" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    work = out_dir / ("gpu_check_dry_work" if dry else "gpu_check_work")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1", WANDB_MODE="offline", HF_HUB_OFFLINE="1")
    env["TOKENIZERS_PARALLELISM"] = "false"
    if dry:
        env.update(TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    else:
        env["SLIM_KERNEL_FIXED"] = "1"  # one compile per kernel path (no autotune sweep)
    t_limit = a.step_timeout or (300 if dry else 150)
    import torch

    gpu = "cpu-dry-run" if dry else torch.cuda.get_device_name().replace(" ", "_")
    date = time.strftime("%Y-%m-%d", time.gmtime())
    record: dict = {
        "gpu": gpu,
        "date": date,
        "dry_run": dry,
        "python": platform.python_version(),
        "versions": _versions(),
        "steps": [],
    }
    small = ["debug=default"] if dry else []
    device = "cpu" if dry else "cuda"
    run_dir = work / "compress"

    def step(name: str, cmd: list[str], timeout: int = t_limit) -> dict:
        rec = run_step(name, cmd, timeout, env, work)
        record["steps"].append(rec)
        return rec

    # 1. the GPU tests (dry: the same selection collected on CPU)
    if dry:
        step(
            "tests",
            [PY, "-m", "pytest", "-q", "--co", "-m", "gpu or not gpu", "tests/test_kernels.py"],
        )
    else:
        step("tests", [PY, "-m", "pytest", "-m", "gpu", "-q", "-x", "--no-header", "-rfE"])
    # 2. compression on the device, perplexity against the CPU reference
    rec = step(
        "compress",
        [
            PY,
            "compress.py",
            *small,
            f"device={device}",
            "engine.progress=false",
            f"hydra.run.dir={run_dir}",
        ],
    )
    rep = read_json(run_dir / "report.json") or {}
    ppl = next(iter(rep.get("ppl", {}).values()), None)
    ref = read_json(Path(a.reference)) or {}
    rec["ppl"] = ppl
    rec["compress_s"] = rep.get("timings", {}).get("compress_s")
    rec["vs_cpu"] = compare_ppl(ppl, ref.get("ppl")) if not dry else compare_ppl(ppl, ppl)
    # 3. fine-tuning through the packed layers vs peft QLoRA, same budget
    packed = run_dir / "packed"
    train_small = ["debug=train"] if dry else ["trainer=gpu"]
    rec = step(
        "train",
        [
            PY,
            "train.py",
            "+peft=true",
            *train_small,
            f"compressed.path={packed}",
            f"trainer.max_steps={steps}",
            "logger=csv",
            "engine.progress=false",
            f"hydra.run.dir={work / 'train'}",
        ],
    )
    trep = read_json(work / "train" / "report.json") or {}
    rec["train"] = trep.get("train")
    # peft QLoRA (dry: plain LoRA on CPU) and the dense fp16 model's generate, same budget
    ft_json = work / "finetune_bench.json"
    rec = step(
        "qlora_and_dense_generate",
        [
            PY,
            "benchmarks/finetune_bench.py",
            "--packed",
            str(packed),
            "--model",
            "tiny" if dry else "embedded:smollm2",
            "--configs",
            _ft_configs(dry),
            "--device",
            device,
            "--steps",
            str(steps),
            "--warmup",
            "1" if dry else "3",
            "--rounds",
            "1",
            "--seqlen",
            "32" if dry else "512",
            "--new-tokens",
            "8" if dry else "128",
            "--gen-steps",
            "1" if dry else "3",
            "--json",
            str(ft_json),
        ],
        timeout=2 * t_limit,
    )
    rec["table"] = (read_json(ft_json) or {}).get("table")
    # 4. generation through the packed kernels
    rec = step(
        "generate",
        [
            PY,
            "-m",
            "slim_lightning.generate",
            str(packed),
            "--prompt",
            PROMPT,
            "--max-new-tokens",
            "8" if dry else "128",
            "--device",
            device,
            "--seed",
            "0",
        ],
    )
    rec["tok_per_s"] = tok_per_s(rec["output_tail"])
    # 5. the kernel benchmark table
    kjson = (work if dry else ROOT / "kernels" / "results") / f"{gpu}-{date}.json"
    kjson.parent.mkdir(parents=True, exist_ok=True)
    kargs = (
        ["--smoke"] if dry else ["--shapes", "4096x11008,11008x4096,4096x4096", "--batches", "1,16"]
    )
    step("kernels", [PY, "-m", "slim_lightning.kernels.benchmark", *kargs, "--json", str(kjson)])
    record["ok"] = all(s["status"] == "ok" for s in record["steps"])
    dest = out_dir / f"gpu_check-{gpu}-{date}.json"
    dest.write_text(json.dumps(record, indent=1) + "\n")
    print(f"[gpu_check] wrote {dest}", flush=True)
    if os.environ.get("OUT"):
        shutil.copy(dest, os.environ["OUT"])
    return 0 if record["ok"] else 1


def _ft_configs(dry: bool) -> str:
    """QLoRA + dense generate on a GPU; dry: plain LoRA on CPU when peft is installed (the
    ``bench`` extra), else the dense generate alone (recorded in the step's command)."""
    if not dry:
        return "qlora,gen_dense"
    import importlib.util

    return "lora,gen_dense" if importlib.util.find_spec("peft") else "gen_dense"


def _versions() -> dict:
    out = {}
    for mod in ("torch", "triton", "transformers", "lightning", "peft", "bitsandbytes"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - recorded as missing
            out[mod] = None
    return out


if __name__ == "__main__":
    sys.exit(main())
