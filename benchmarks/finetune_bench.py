"""Adapter fine-tuning and generation: memory and speed of the compressed model vs the peers.

Fine-tuning configurations (same model, sequence length, batch, optimiser, loss and adapter
budget: LoRA ranks equal to each SLiM layer's adapter rank on the same seven linears):

* ``lean``        ours: packed base dequantised just in time (the default runtime)
* ``dense_cache`` ours with ``dense_cache=true`` (a dense copy of every layer kept: CPU speed)
* ``lora``        peft LoRA on the dense fp32 model
* ``qlora``       peft LoRA on the model quantised to bitsandbytes NF4 (the QLoRA anchor)
* ``train_py``    ours through ``train.py +peft=true compressed.path=...`` itself (the Lightning
                  loop users run; not in the default list): its logged per-step tokens/s

Generation configurations: ``gen_lean`` (ours, packed only), ``gen_cache`` (ours with the dense
cache) and ``gen_dense`` (the uncompressed model), greedy decoding with the KV cache.

Every configuration runs in a fresh process (its peak RSS is its own), warm-up steps are not
timed, the order alternates between rounds (A B C D, then D C B A), and the table gives the
median tokens/s over all timed steps with the min-max spread and the largest peak RSS.

    pip install -e '.[bench]'
    python benchmarks/finetune_bench.py --packed runs/<compress run>/packed \
        --steps 10 --rounds 2 --json benchmarks/results/finetune-cpu.json

``--packed`` is a ``compress.py`` run's packed checkpoint of the embedded SmolLM2 (the default
method); the dense model is ``--model`` (default: the embedded SmolLM2).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

TRAIN = ("lean", "dense_cache", "lora", "qlora")
GEN = ("gen_lean", "gen_cache", "gen_dense")
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def held_bytes(model) -> int:
    from slim_lightning.nn.backend import held_bytes as _held

    return _held(model)


def _ranks(packed: str) -> dict[str, int]:
    from slim_lightning.checkpoint import read_meta

    return {name: int(m["rank"]) for name, m in read_meta(packed)["layers"].items()}


def _dense(model_path: str):
    from slim_lightning.models.load import load_model
    from slim_lightning.models.source import ModelConfig

    if model_path == "tiny":  # the tiny random LLaMA of debug runs (gpu_check --dry-run)
        cfg = ModelConfig(name="tiny_llama", random_init=True, tiny={"kind": "llama", "seed": 0})
    else:
        cfg = ModelConfig(name="bench", path=model_path)
    model, tok = load_model(cfg)
    return model, tok


def _with_lora(model, ranks: dict[str, int]):
    from peft import LoraConfig, get_peft_model

    pattern = {name: r for name, r in ranks.items()}
    first = next(iter(ranks.values()))
    cfg = LoraConfig(
        r=first,
        lora_alpha=first,
        target_modules=list(LINEARS),
        rank_pattern=pattern,
        alpha_pattern=pattern,
        lora_dropout=0.0,
        bias="none",
    )
    return get_peft_model(model, cfg)


def _qlora_model(model_path: str, device: str = "cpu"):
    """The dense model with every block linear replaced by a bitsandbytes NF4 Linear4bit
    (bf16 compute on a GPU, fp32 on CPU)."""
    import bitsandbytes as bnb
    import torch

    from slim_lightning.models.arch import block_linears, get_arch, get_blocks

    model, tok = _dense(model_path)
    arch = get_arch(model)
    for block in get_blocks(model, arch):
        for name, lin in block_linears(block, arch).items():
            q = bnb.nn.Linear4bit(
                lin.in_features,
                lin.out_features,
                bias=lin.bias is not None,
                compute_dtype=torch.bfloat16 if device.startswith("cuda") else torch.float32,
                quant_type="nf4",
                device="meta",
            )
            q.weight = bnb.nn.Params4bit(
                lin.weight.data.contiguous(), requires_grad=False, quant_type="nf4"
            )._quantize(device)
            if lin.bias is not None:
                q.bias = torch.nn.Parameter(lin.bias.data, requires_grad=False)
            block.set_submodule(name, q)
    return model, tok


def _windows(tok, n: int, seqlen: int):
    from slim_lightning.data.config import CalibConfig
    from slim_lightning.data.text import calibration_windows

    return calibration_windows(tok, CalibConfig(nsamples=n, seqlen=seqlen, seed=1))


def _train_py(a: argparse.Namespace) -> dict:
    """``train.py +peft=true compressed.path=PACKED`` itself (Lightning loop, clipping, logging,
    scheduler) in a child process with ``a.threads`` threads: the per-step tokens/s it logs
    (``train/tokens_per_s``, forward + backward + optimiser step), and the child's own peak RSS
    (``os.wait4``; it includes the final evaluation and export)."""
    import csv
    import tempfile

    root = Path(__file__).resolve().parents[1]
    run = Path(tempfile.mkdtemp(prefix="train_py_bench_"))
    steps = a.warmup + a.steps
    cmd = [
        sys.executable,
        str(root / "train.py"),
        "+peft=true",
        f"compressed.path={Path(a.packed).resolve()}",
        f"data.seqlen={a.seqlen}",
        f"data.batch_size={a.batch}",
        f"data.train_tokens={steps * a.seqlen * a.batch}",
        "logger=csv",
        "train.eval_before=false",
        "train.val_every_n_steps=0",
        "eval.max_windows=1",
        "trainer.enable_progress_bar=false",
        "engine.progress=false",
        f"hydra.run.dir={run}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads)}
    t0 = time.perf_counter()
    with open(run.parent / f"{run.name}.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"train.py failed; log: {run.parent / f'{run.name}.log'}")
    rows = list(csv.DictReader(open(next(run.glob("csv/**/metrics.csv")))))
    tps = [float(r["train/tokens_per_s"]) for r in rows if r.get("train/tokens_per_s")]
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    report = json.loads((run / "report.json").read_text())
    tokens = a.seqlen * a.batch
    return {
        "config": "train_py",
        "run_s": time.perf_counter() - t0,
        "held_after_load_bytes": 0,
        "trainable_params": 0,
        "losses": losses,
        "logged_steps": len(tps),
        "step_s": [tokens / t for t in tps[a.warmup :]],
        "tokens_per_step": tokens,
        "peak_rss_mib": usage.ru_maxrss / 1024,
        "threads_report": report.get("threads"),
    }


def worker(a: argparse.Namespace) -> dict:
    import torch

    if a.worker == "train_py":
        return _train_py(a)

    torch.manual_seed(0)
    torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    cuda = dev.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    from slim_lightning.data.evaluation import training_nll

    t0 = time.perf_counter()
    out: dict = {"config": a.worker}
    ranks = _ranks(a.packed)
    if a.worker in ("lean", "dense_cache", "gen_lean", "gen_cache"):
        from slim_lightning import load_compressed
        from slim_lightning.nn.adapters import mark_trainable
        from slim_lightning.nn.backend import set_dense_cache

        model, tok, _ = load_compressed(a.packed, verify=False)
        set_dense_cache(model, a.worker in ("dense_cache", "gen_cache"))
        if a.worker in TRAIN:
            mark_trainable(model)
    elif a.worker in ("lora", "gen_dense"):
        model, tok = _dense(a.model)
        if a.worker == "lora":
            model = _with_lora(model, ranks)
    elif a.worker == "qlora":
        model, tok = _qlora_model(a.model, a.device)
        model = _with_lora(model, ranks)
    else:
        raise SystemExit(f"unknown config {a.worker}")
    if a.worker == "gen_dense" and cuda:
        model.half()  # the dense fp16 model
    model.to(dev)
    out["load_s"] = time.perf_counter() - t0
    hf = model.base_model.model if hasattr(model, "peft_config") else model
    out["held_after_load_bytes"] = held_bytes(hf)
    params = [p for p in model.parameters() if p.requires_grad]
    out["trainable_params"] = sum(p.numel() for p in params)
    times = []
    if a.worker in TRAIN:
        model.train()
        opt = torch.optim.AdamW(params, lr=1e-5)
        data = _windows(tok, a.warmup + a.steps, a.seqlen)
        out["losses"] = []
        for i in range(a.warmup + a.steps):
            ids = data[i : i + 1].repeat(a.batch, 1).to(dev)
            sync()
            t = time.perf_counter()
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda):
                nll, n = training_nll(hf, ids)
            (nll / n).backward()
            out["losses"].append(float(nll / n))
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync()
            if i >= a.warmup:
                times.append(time.perf_counter() - t)
            if i == 0:
                out["held_after_step_bytes"] = held_bytes(hf)
        out["tokens_per_step"] = a.batch * a.seqlen
    else:
        model.eval()
        hf.config.use_cache = True  # every side decodes with its KV cache
        if getattr(hf, "generation_config", None) is not None:
            hf.generation_config.use_cache = True
        prompt = _windows(tok, 1, 64).to(dev)
        with torch.no_grad():
            for i in range(a.gen_warmup + a.gen_steps):
                sync()
                t = time.perf_counter()
                gen = hf.generate(
                    prompt,
                    max_new_tokens=a.new_tokens,
                    do_sample=False,
                    min_new_tokens=a.new_tokens,
                    use_cache=True,
                )
                sync()
                if i >= a.gen_warmup:
                    times.append(time.perf_counter() - t)
                if i == 0:
                    out["held_after_step_bytes"] = held_bytes(hf)
        out["tokens_per_step"] = int(gen.shape[1] - prompt.shape[1])
    out["step_s"] = times
    out["peak_rss_mib"] = _rss_mib()
    if cuda:
        out["device_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def _summary(results: dict[str, list[dict]], dense_fp32_bytes: int) -> str:
    lines = [
        "| config | tokens/s median (min-max) | peak RSS MiB | held after load MiB (x dense fp32) "
        "| held after a step MiB (x dense fp32) | trainable params | timed steps |",
        "|---|---|---|---|---|---|---|",
    ]
    for cfg, runs in results.items():
        tps = [r["tokens_per_step"] / s for r in runs for s in r["step_s"]]
        rss = max(r["peak_rss_mib"] for r in runs)
        hl = runs[0]["held_after_load_bytes"]
        hs = runs[0].get("held_after_step_bytes", 0)
        lines.append(
            f"| {cfg} | {statistics.median(tps):.1f} ({min(tps):.1f}-{max(tps):.1f}) | {rss:.0f} | "
            f"{hl / 2**20:.0f} ({hl / dense_fp32_bytes:.2f}) | {hs / 2**20:.0f} "
            f"({hs / dense_fp32_bytes:.2f}) | {runs[0]['trainable_params'] / 1e6:.2f}M | "
            f"{len(tps)} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--packed", required=True, help="a compress.py run's packed checkpoint")
    ap.add_argument(
        "--model",
        default="embedded:smollm2",
        help="the dense model (model.path), or 'tiny': the tiny random LLaMA of debug runs",
    )
    ap.add_argument("--configs", default=",".join(TRAIN + GEN))
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per process")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2, help="processes per config, order alternated")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--gen-steps", type=int, default=3, help="timed generate() calls per process")
    ap.add_argument("--gen-warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 1)))
    ap.add_argument("--json", default=None)
    ap.add_argument("--device", default="cpu", help="cpu | cuda (bf16 autocast, NF4 on the GPU)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print("RESULT " + json.dumps(worker(a)), flush=True)
        return
    configs = a.configs.split(",")
    results: dict[str, list[dict]] = {c: [] for c in configs}
    for rnd in range(a.rounds):
        for cfg in configs if rnd % 2 == 0 else list(reversed(configs)):
            cmd = [sys.executable, __file__, *sys.argv[1:], "--worker", cfg]
            p = subprocess.run(cmd, capture_output=True, text=True)
            line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
            if p.returncode != 0 or line is None:
                print(p.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"{cfg} failed (exit {p.returncode})")
            results[cfg].append(json.loads(line[len("RESULT ") :]))
            r = results[cfg][-1]
            print(
                f"round {rnd} {cfg}: median step {statistics.median(r['step_s']):.2f} s, "
                f"peak RSS {r['peak_rss_mib']:.0f} MiB",
                flush=True,
            )
    dense_fp32 = 0
    if any(c in results for c in ("lora", "gen_dense")):
        src = results.get("gen_dense") or results.get("lora")
        dense_fp32 = src[0]["held_after_load_bytes"] if "gen_dense" in results else 0
    if not dense_fp32:
        from slim_lightning.models.load import load_model
        from slim_lightning.models.source import ModelConfig

        dense_fp32 = held_bytes(load_model(ModelConfig(name="d", path=a.model))[0])
    table = _summary(results, dense_fp32)
    if "lean" in results and "dense_cache" in results:
        la, lb = results["lean"][0]["losses"], results["dense_cache"][0]["losses"]
        diff = max(abs(x - y) for x, y in zip(la, lb, strict=True))
        table += (
            f"\n\nlean vs dense_cache, same data and seed: max |loss difference| over "
            f"{len(la)} steps = {diff:.2e} (losses {la[0]:.4f} ... {la[-1]:.4f})"
        )
    import datetime

    import torch

    header = (
        f"{datetime.date.today().isoformat()}, {torch.__version__}, {a.threads} threads, "
        f"seqlen {a.seqlen}, batch {a.batch}, {a.steps} timed steps x {a.rounds} processes per "
        f"config after {a.warmup} warm-up steps each; dense fp32 model {dense_fp32 / 2**20:.0f} MiB"
    )
    print(header)
    print(table)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(
            json.dumps({"header": header, "table": table, "runs": results}, indent=1) + "\n"
        )


if __name__ == "__main__":
    main()
