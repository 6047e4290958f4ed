"""compress.py end to end on the tiny debug model: report, packed checkpoint, HF export, resume."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from slim_lightning import load_compressed
from slim_lightning.app.compress_run import run_compress
from slim_lightning.compress.plan import build_plan
from slim_lightning.data.evaluation import make_eval_windows, perplexity
from slim_lightning.nn.embedding import PackedEmbedding
from slim_lightning.nn.linear import SLiMLinear

ROOT = Path(__file__).resolve().parents[1]
METHODS = sorted(p.stem for p in (ROOT / "conf" / "method").glob("*.yaml"))


def make_cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="compress", overrides=["debug=default", *overrides])


@pytest.fixture(scope="module")
def slim_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    cfg = make_cfg(["export.hf=true"])
    report = run_compress(cfg, run_dir)
    return cfg, run_dir, report


def test_report_holds_ppl_layers_and_size(slim_run):
    cfg, run_dir, report = slim_run
    on_disk = json.loads((run_dir / "report.json").read_text())
    assert on_disk["ppl"] == report["ppl"] and set(report["ppl"]) == {"embedded"}
    assert report["ppl_dense"]["embedded"] > 1
    n_linear = 2 * 7  # tiny LLaMA: 2 blocks x 7 linears
    assert len(report["layers"]) == n_linear
    assert report["size"]["ratio_vs_fp16"] < 0.35
    for key in ("config", "versions", "seed", "timings", "memory", "spec"):
        assert key in on_disk
    assert (run_dir / "layers.png").stat().st_size > 1000


def test_packed_checkpoint_reproduces_perplexity(slim_run):
    cfg, run_dir, report = slim_run
    model, tok, meta = load_compressed(run_dir / "packed")
    blocks = [m for n, m in model.named_modules() if ".layers." in n]
    assert sum(isinstance(m, SLiMLinear) for m in blocks) == 14
    # embeddings.bits=8 (the default): the vocabulary tables are packed too
    assert isinstance(model.get_input_embeddings(), PackedEmbedding)
    assert isinstance(model.get_output_embeddings(), SLiMLinear)
    assert meta["plan"]["method"] == "slim_q" and meta["results"]["ppl"] == report["ppl"]
    windows = make_eval_windows(tok, build_plan(cfg).eval)
    ppl = perplexity(model, windows, progress=False)["ppl"]
    assert ppl == pytest.approx(report["ppl"]["embedded"], rel=1e-5)
    # generation works from the loaded compressed model (reference backend, CPU)
    ids = tok("def f(x):", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 5)


def test_hf_export_loads_without_slim_lightning(slim_run):
    """DIR/hf is a plain HF model: a fresh interpreter that never imports slim_lightning
    loads it and gets the compressed model's perplexity."""
    cfg, run_dir, report = slim_run
    windows = make_eval_windows(load_compressed(run_dir / "packed")[1], build_plan(cfg).eval)
    torch.save(windows, run_dir / "w.pt")
    code = f"""
import math, sys, torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({str(run_dir / "hf")!r}).eval()
w = torch.load({str(run_dir / "w.pt")!r}, weights_only=True)
tot = 0.0
with torch.no_grad():
    for x in w:
        lg = m(input_ids=x[None]).logits[0, :-1]
        tot += torch.nn.functional.cross_entropy(lg, x[1:], reduction="sum").item()
assert "slim_lightning" not in sys.modules
print(math.exp(tot / (w.shape[0] * (w.shape[1] - 1))))
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/"
    )
    assert float(out.stdout.strip().splitlines()[-1]) == pytest.approx(
        report["ppl"]["embedded"], rel=1e-4
    )


def test_rerun_resumes_from_saved_blocks(slim_run):
    cfg, run_dir, report = slim_run
    again = run_compress(cfg, run_dir)
    assert again["resumed_blocks"] == 2
    assert again["ppl"] == report["ppl"]
    # wall seconds of each block compressed by the run (none when all were resumed)
    assert len(report["block_seconds"]) == 2 and min(report["block_seconds"]) > 0
    assert again["block_seconds"] == []


@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs(method, tmp_path):
    report = run_compress(make_cfg([f"method={method}"]), tmp_path)
    ppl = report["ppl"]["embedded"]
    assert 1 < ppl < 1e4
    if method == "dense":
        assert ppl == pytest.approx(report["ppl_dense"]["embedded"], rel=1e-6)
    else:
        assert ppl != report["ppl_dense"]["embedded"]
        assert (tmp_path / "packed" / "slim.json").is_file()
        # bits per weight are the packed bytes: every stored byte of every format counted
        model, _, _ = load_compressed(tmp_path / "packed")
        mods = dict(model.named_modules())
        assert len(report["layers"]) == 14
        for lay in report["layers"]:
            m = mods[lay["name"]]
            assert isinstance(m, SLiMLinear)
            stored = sum(t.numel() * t.element_size() for n, t in m.named_buffers() if n != "bias")
            if m.adapter_bits is None and m.rank:
                stored += 4 * (m.lora_l.numel() + m.lora_r.numel())
            assert lay["bits_per_weight"] * lay["d_in"] * lay["d_out"] / 8 == pytest.approx(
                stored, rel=1e-12
            ), lay["name"]
        assert_sizes_match_file(report, tmp_path / "packed")


def assert_sizes_match_file(report: dict, packed: Path) -> None:
    """report.json's and slim.json's sizes are the written file's bytes."""
    from safetensors import safe_open

    size = report["size"]
    assert size == json.loads((packed / "slim.json").read_text())["size"]
    assert size["checkpoint_bytes"] == (packed / "model.safetensors").stat().st_size
    layers = {lay["name"] for lay in report["layers"]}
    lin = rest = 0
    with safe_open(str(packed / "model.safetensors"), framework="pt") as f:
        for k in f.keys():
            n = f.get_tensor(k).numel() * f.get_tensor(k).element_size()
            if k.rpartition(".")[0] in layers:
                lin += n
            else:
                rest += n
    assert (size["linears_bytes"], size["rest_bytes"]) == (lin, rest)
    assert size["checkpoint_bytes"] > lin + rest  # plus the JSON header, nothing else


@pytest.mark.parametrize("sparsity", ["2of4", "4of8", "unstructured50", "dense"])
def test_16bit_export_stores_each_thing_once_and_reloads_exactly(sparsity, tmp_path):
    """fp adapters and uncompressed tensors in bf16, 4-bit adapters as codes only; the loaded
    checkpoint computes exactly what the run evaluated."""
    from safetensors import safe_open

    for method in ("slim", "slim_q"):
        run = tmp_path / method
        cfg = make_cfg([f"method={method}", f"sparsity={sparsity}", "export.dtype=bfloat16"])
        report = run_compress(cfg, run)
        assert_sizes_match_file(report, run / "packed")
        with safe_open(str(run / "packed" / "model.safetensors"), framework="pt") as f:
            dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
        assert all(v == "BF16" for k, v in dtypes.items() if k.endswith(("weight", "bias")))
        loras = {k: v for k, v in dtypes.items() if ".lora_" in k}
        if method == "slim":  # fp adapters: stored once, in 16 bits
            assert loras and set(loras.values()) == {"BF16"}
        else:  # 4-bit adapters: only their codes and scales are stored
            assert not loras and any(".adapter_l_values" in k for k in dtypes)
        model, tok, meta = load_compressed(run / "packed")
        assert meta["dtype"] == "bfloat16" and next(model.parameters()).dtype == torch.float32
        windows = make_eval_windows(tok, build_plan(cfg).eval)
        assert perplexity(model, windows, progress=False)["ppl"] == report["ppl"]["embedded"]


def test_cli_entry_point_and_run_dir(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "compress.py",
            "debug=default",
            "sparsity=4of8",
            f"hydra.run.dir={tmp_path}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "perplexity" in out.stdout
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["spec"]["sparsity"]["m"] == 8


def test_cli_bad_value_fails_before_work(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "compress.py",
            "debug=default",
            "lowrank.rank_ratio=1.5",
            f"hydra.run.dir={tmp_path}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode != 0
    assert "lowrank.rank_ratio" in out.stderr and "1.5" in out.stderr
    # the directory says the run failed, at the config, and holds no output of it
    rep = json.loads((tmp_path / "report.json").read_text())
    assert rep["status"] == "failed" and rep["stage"] == "config"
    assert "lowrank.rank_ratio" in rep["error"]
    assert not (tmp_path / "packed").exists() and not (tmp_path / "calib_state").exists()
