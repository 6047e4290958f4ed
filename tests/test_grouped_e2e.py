"""SpQR and SliM-LLM checkpoints end to end on the tiny debug model: compress.py, every loader
(``load_compressed``, ``from_pretrained``, the HF dense export), generation, the loaders'
verification, the Triton backend, resume, and ``train.py +peft=true`` on top."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from slim_lightning import load_compressed
from slim_lightning.app.compress_run import run_compress
from slim_lightning.compress.plan import build_plan
from slim_lightning.data.evaluation import make_eval_windows, perplexity
from slim_lightning.errors import CheckpointError
from slim_lightning.nn.backend import set_backend
from slim_lightning.nn.linear import SLiMLinear

ROOT = Path(__file__).resolve().parents[1]
RUNS = {
    # SpQR's under-4-bit regime with adapters on top; outliers and act-order kept
    "spqr": ["method=spqr", "quant.bits=3", "quant.tau=0.1", "lowrank=slim"],
    # mixed widths under the 2:4 mask, adapters, block reconstruction (widths stay fixed)
    "slim_llm_2of4": [
        "method=slim_llm",
        "quant.bits=3",
        "sparsity=2of4",
        "lowrank=slim",
        "reconstruct=block",
        "reconstruct.epochs=1",
    ],
}


def _cfg(config: str, overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name=config, overrides=overrides)


@pytest.fixture(scope="module", params=list(RUNS))
def grouped_run(request, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp(request.param)
    cfg = _cfg("compress", ["debug=default", "export.hf=true", *RUNS[request.param]])
    return request.param, cfg, run_dir, run_compress(cfg, run_dir)


def test_packed_checkpoint_loads_everywhere_with_the_same_model(grouped_run):
    name, cfg, run_dir, report = grouped_run
    model, tok, meta = load_compressed(run_dir / "packed")
    lins = [m for n, m in model.named_modules() if ".layers." in n and isinstance(m, SLiMLinear)]
    assert len(lins) == 14 and all(m.format == "grouped" for m in lins)
    assert all(m.rank > 0 for m in lins)
    w = lins[0].meta()["weight"]
    if name == "spqr":
        assert w["bits"] == 3 and w["stat_bits"] == 3 and w["has_perm"]
        assert sum(m.meta()["weight"]["n_outliers"] for m in lins) > 0
    else:
        assert w["layout"] == "nm" and w["mixed"]
    windows = make_eval_windows(tok, build_plan(cfg).eval)
    ppl = perplexity(model, windows, progress=False)["ppl"]
    assert ppl == pytest.approx(report["ppl"]["embedded"], rel=1e-5)
    ids = tok("def f(x):", return_tensors="pt").input_ids
    with torch.no_grad():
        ref = model(ids).logits
        hf = AutoModelForCausalLM.from_pretrained(run_dir / "packed")
        assert torch.equal(hf(ids).logits, ref)
        dense = AutoModelForCausalLM.from_pretrained(run_dir / "hf", dtype=torch.float32)
        torch.testing.assert_close(dense(ids).logits, ref, rtol=1e-4, atol=1e-4)
        # the grouped decode kernel (interpreter on CPU); the 8-bit head stays on reference
        assert set_backend(model, "triton", strict=False) >= 14
        torch.testing.assert_close(model(ids).logits, ref, rtol=1e-5, atol=1e-5)
    set_backend(model, "reference")
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 4)


def test_bits_per_weight_count_every_byte_beside_the_formula(grouped_run):
    name, _, run_dir, report = grouped_run
    model, _, _ = load_compressed(run_dir / "packed")
    mods = dict(model.named_modules())
    for lay in report["layers"]:
        m = mods[lay["name"]]
        stored = sum(t.numel() * t.element_size() for n, t in m.named_buffers() if n != "bias")
        assert lay["bits_per_weight"] * lay["d_in"] * lay["d_out"] / 8 == pytest.approx(stored)
        if name == "spqr":
            # the paper's count (statistics, second level, 32 bits per outlier) is below the
            # file's, which also holds the permutation, the CSR row offsets and the adapters
            assert 3.625 <= lay["bits_formula"] < lay["bits_per_weight"]


def test_a_tampered_grouped_checkpoint_is_refused(grouped_run, tmp_path):
    _, _, run_dir, _ = grouped_run
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in (run_dir / "packed").iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    sd = load_file(str(bad / "model.safetensors"))
    key = next(k for k in sd if k.endswith("weight_codes"))
    sd[key] = sd[key][:, :-1].contiguous()  # one byte short per row
    save_file(sd, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError):
        load_compressed(bad)
    with pytest.raises((CheckpointError, ValueError, OSError)):
        AutoModelForCausalLM.from_pretrained(bad)


def test_resumed_run_writes_the_same_checkpoint(grouped_run, tmp_path):
    name, cfg, run_dir, report = grouped_run
    again = run_compress(cfg, run_dir)  # every block resumed from calib_state
    assert again["block_seconds"] == [] and again["ppl"] == report["ppl"]


def test_peft_fine_tunes_adapters_over_a_grouped_base(tmp_path):
    from slim_lightning.app.train_run import run_train

    over = [
        "debug=train",
        "logger=none",
        "engine.progress=false",
        "+peft=true",
        "method=spqr",
        "lowrank=slim",
        "trainer.max_steps=2",
        "train.val_every_n_steps=0",
    ]
    rep = run_train(_cfg("train", over), tmp_path)
    assert rep["train"]["steps"] == 2
    before = load_file(str(tmp_path / "compressed" / "model.safetensors"))
    after = load_file(str(tmp_path / "packed" / "model.safetensors"))
    assert any(k.endswith("weight_codes") for k in after)
    for k, v in before.items():
        if ".lora_" not in k and "adapter_" not in k:
            assert torch.equal(v, after[k]), k  # the grouped base is untouched
    assert any(not torch.equal(before[k], after[k]) for k in before if "adapter_" in k)
    assert json.loads((tmp_path / "report.json").read_text())["status"] == "done"


def test_slim_llm_with_several_processes_is_refused_before_loading(tmp_path):
    from types import SimpleNamespace

    from slim_lightning.app.compress_run import _run_distributed
    from slim_lightning.errors import ConfigError

    plan = build_plan(_cfg("compress", ["debug=default", "method=slim_llm"]))
    with pytest.raises(ConfigError, match="quant.method.*one process"):
        _run_distributed(SimpleNamespace(world_size=2), plan, {}, tmp_path)
