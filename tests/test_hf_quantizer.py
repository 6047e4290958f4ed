"""Native transformers loading of packed checkpoints (``quant_method: slim``, hf_quantizer.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import slim_lightning  # noqa: F401 - registers the quantizer
from slim_lightning import load_compressed
from slim_lightning.app.compress_run import run_compress
from slim_lightning.compress.plan import build_plan
from slim_lightning.data.evaluation import make_eval_windows, perplexity
from slim_lightning.errors import CheckpointError
from slim_lightning.nn.backend import held_bytes
from slim_lightning.nn.linear import SLiMLinear

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def packed_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("hfrun")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="compress", overrides=["debug=default", "export.hf=true"])
    report = run_compress(cfg, run_dir)
    return cfg, run_dir, report


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_from_pretrained_equals_load_compressed(packed_run):
    cfg, run_dir, report = packed_run
    model = AutoModelForCausalLM.from_pretrained(run_dir / "packed")
    ref, tok, _ = load_compressed(run_dir / "packed")
    slim = [m for n, m in model.named_modules() if isinstance(m, SLiMLinear) and ".layers." in n]
    assert len(slim) == 14 and not any(hasattr(m, "weight") for m in slim)
    assert not hasattr(model.get_input_embeddings(), "weight")  # embeddings.bits=8: packed
    assert model.config.quantization_config.quant_method == "slim"
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    assert torch.equal(_logits(model, ids), _logits(ref, ids))
    windows = make_eval_windows(tok, build_plan(cfg).eval)
    ppl = perplexity(model, windows, progress=False)["ppl"]
    assert ppl == pytest.approx(report["ppl"]["embedded"], rel=1e-6)
    # packed buffers are the file's bytes, untouched by loading
    with safe_open(str(run_dir / "packed" / "model.safetensors"), framework="pt") as f:
        for k, v in model.state_dict().items():
            if ".weight_" in k or ".adapter_" in k:
                assert torch.equal(v, f.get_tensor(k)), k
    # the dense export is a plain HF model: no quantization_config leaks into it
    assert "quantization_config" not in json.loads((run_dir / "hf" / "config.json").read_text())


def test_dtype_device_map_and_generation(packed_run):
    _, run_dir, _ = packed_run
    model = AutoModelForCausalLM.from_pretrained(
        run_dir / "packed", dtype=torch.float16, device_map="cpu"
    )
    ids = torch.randint(0, model.config.vocab_size, (1, 6))
    assert model.get_input_embeddings()(ids).dtype == torch.float16
    assert model.model.norm.weight.dtype == torch.float16
    q = model.model.layers[0].self_attn.q_proj
    assert q.weight_values.dtype == torch.uint8  # codes are never cast
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 10)
    ref = AutoModelForCausalLM.from_pretrained(run_dir / "packed")
    with torch.no_grad():
        half = model(ids).logits.float()
    assert torch.allclose(half, _logits(ref, ids), atol=5e-2, rtol=5e-2)


def test_lean_model_holds_packed_bytes_only(packed_run):
    _, run_dir, _ = packed_run
    model = AutoModelForCausalLM.from_pretrained(run_dir / "packed")
    dense = AutoModelForCausalLM.from_pretrained(run_dir / "hf", dtype=torch.float32)
    ids = torch.randint(0, model.config.vocab_size, (1, 8))
    _logits(model, ids)  # caches, if any, exist after a forward
    packed_lin = sum(held_bytes(m) for m in model.modules() if isinstance(m, SLiMLinear))
    dense_lin = sum(
        m.weight.numel() * 4
        for n, m in dense.named_modules()
        if isinstance(m, torch.nn.Linear) and "lm_head" not in n
    )
    # packed 2:4 codes + metadata + scales + 4-bit adapter codes + their fp32 masters (a
    # fine-tuning copy): well under the dense fp32 weights
    assert packed_lin < 0.45 * dense_lin


def test_save_pretrained_round_trips(packed_run, tmp_path):
    _, run_dir, _ = packed_run
    model = AutoModelForCausalLM.from_pretrained(run_dir / "packed")
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "slim"
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    assert not [k for k in keys if k.endswith(("lora_l", "lora_r"))]  # stored as 4-bit codes
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = torch.randint(0, model.config.vocab_size, (1, 8))
    assert torch.equal(_logits(again, ids), _logits(model, ids))


def test_peft_lora_on_top_trains_only_its_own_weights(packed_run, tmp_path):
    peft = pytest.importorskip("peft")
    from slim_lightning.deploy.hf_quantizer import peft_lora_config

    _, run_dir, _ = packed_run
    model = AutoModelForCausalLM.from_pretrained(run_dir / "packed")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pm = peft.get_peft_model(model, peft_lora_config(r=4, target_modules=["q_proj", "v_proj"]))
    trainable = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.5)
    ids = torch.randint(0, model.config.vocab_size, (2, 10))
    for _ in range(2):
        loss = pm(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    after = pm.get_base_model().state_dict()
    for k, v in before.items():
        k2 = k.replace(".q_proj.", ".q_proj.base_layer.").replace(".v_proj.", ".v_proj.base_layer.")
        assert torch.equal(after[k2], v), k  # packed base and SLiM adapters untouched
    tuned = _logits(pm, ids)
    pm.save_pretrained(tmp_path / "adapter")
    base = AutoModelForCausalLM.from_pretrained(run_dir / "packed")
    cfg = peft_lora_config(r=4, target_modules=["q_proj", "v_proj"])
    re = peft.PeftModel.from_pretrained(base, tmp_path / "adapter", config=cfg)
    assert torch.allclose(_logits(re, ids), tuned, atol=1e-5)


def test_bad_quantization_config_names_the_layer(packed_run, tmp_path, monkeypatch):
    _, run_dir, _ = packed_run
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in (run_dir / "packed").iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((bad / "config.json").read_text())
    name = next(iter(cfg["quantization_config"]["layers"]))
    cfg["quantization_config"]["layers"][name]["weight"]["shape"] = [3, 5]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="config.json: sha256 differs"):
        AutoModelForCausalLM.from_pretrained(bad)
    with monkeypatch.context() as m:  # without the digests: the edit is still found, by layer
        m.setenv("SLIM_LIGHTNING_VERIFY", "0")
        with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
            AutoModelForCausalLM.from_pretrained(bad)


def test_registration_is_lazy_and_works_in_a_fresh_process(packed_run):
    """``import slim_lightning`` does not import transformers; a later from_pretrained works."""
    _, run_dir, _ = packed_run
    script = (
        "import sys, slim_lightning\n"
        "assert 'transformers' not in sys.modules\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(run_dir / 'packed')!r})\n"
        "print(type(m.model.layers[0].mlp.up_proj).__name__)\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "SLiMLinear"
