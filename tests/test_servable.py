"""export.servable: a compressed-tensors int4 base + a PEFT LoRA adapter that plain transformers
and peft load with the SLiM model's perplexity (tiny debug LLaMA, seconds)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

pytest.importorskip("compressed_tensors")
pytest.importorskip("peft")

from slim_lightning import load_compressed  # noqa: E402
from slim_lightning.app.compress_run import run_compress  # noqa: E402
from slim_lightning.compress.plan import build_plan  # noqa: E402
from slim_lightning.data.evaluation import make_eval_windows  # noqa: E402
from slim_lightning.deploy.servable import write_servable  # noqa: E402
from slim_lightning.errors import ConfigError  # noqa: E402
from slim_lightning.nn.linear import SLiMLinear  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]


def _cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="compress", overrides=["debug=default", *overrides])


@pytest.fixture(scope="module", params=["slim_q", "slim"])  # default (4-bit adapters); fp adapters
def served(request, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp(request.param)
    # vocabulary tables in fp16 here; packed ones: test_packed_vocab_tables_are_written_dense
    overrides = [f"method={request.param}", "eval_dense=false", "export.servable=true"]
    cfg = _cfg([*overrides, "embeddings.bits=null"])
    report = run_compress(cfg, run_dir)
    model, tok, _ = load_compressed(run_dir / "packed")
    windows = make_eval_windows(tok, build_plan(cfg).eval)
    return report, run_dir, model, tok, windows


def _nll(model, windows: torch.Tensor) -> tuple[float, torch.Tensor]:
    with torch.no_grad():
        logits = model(input_ids=windows).logits.float()
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1)
    )
    return nll.item(), logits


def test_run_writes_exact_pack_quantized_base(served):
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from safetensors.torch import load_file

    report, run_dir, model, _, _ = served
    out = run_dir / "servable"
    assert report["servable_dir"] == str(out)
    summary = json.loads((out / "servable.json").read_text())
    assert summary == json.loads(json.dumps(report["servable"]))
    assert summary["exact"] and not summary["requantized_layers"]  # both grids map exactly
    assert not summary["scale_fp16_rounded_layers"]
    qc = json.loads((out / "base" / "config.json").read_text())["quantization_config"]
    assert "sparsity_config" not in qc
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert qc["ignore"] == ["lm_head"] and qc["quantization_status"] == "compressed"
    group = qc["config_groups"]["group_0"]
    assert group["targets"] == ["Linear"]
    w = group["weights"]
    g = w["group_size"]
    assert (w["num_bits"], w["type"], w["symmetric"], w["strategy"]) == (4, "int", True, "group")
    assert g == summary["group_size"]
    tensors = load_file(str(out / "base" / "model.safetensors"))
    layers = {n: m for n, m in model.named_modules() if isinstance(m, SLiMLinear)}
    assert len(layers) == 14
    for name, m in layers.items():
        rows, cols = m.out_features, m.in_features
        assert cols % g == 0
        packed = tensors[f"{name}.weight_packed"]
        assert packed.dtype == torch.int32 and packed.shape == (rows, cols * 4 // 32)
        scale = tensors[f"{name}.weight_scale"]
        assert scale.dtype == torch.float16 and scale.shape == (rows, cols // g)
        assert tensors[f"{name}.weight_shape"].tolist() == [rows, cols]
        assert f"{name}.weight" not in tensors
        codes = unpack_from_int32(packed, 4, torch.Size([rows, cols]))
        assert torch.equal(codes, m.packed_weight().codes_and_mask()[0].to(torch.int8))
        deq = codes.float() * scale.float().repeat_interleave(g, 1)
        assert torch.equal(deq, m.dense_weight())  # lossless: the model's codes and scales
    for k, v in tensors.items():
        if not k.endswith(("weight_packed", "weight_shape")):
            assert v.dtype == torch.float16, k


def test_transformers_and_peft_reproduce_the_model(served):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    report, run_dir, model, _, windows = served
    out = run_dir / "servable"
    adapter_cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    r = report["servable"]["adapter"]["rank"]
    assert (
        adapter_cfg["r"]
        == adapter_cfg["lora_alpha"]
        == r
        == max(m.rank for m in model.modules() if isinstance(m, SLiMLinear))
    )
    assert not adapter_cfg["rank_pattern"] and not adapter_cfg["alpha_pattern"]
    ours, ours_logits = _nll(model, windows)
    # peft wraps nn.Linear weights: dequantise at load (CPU; vLLM runs the packed int4 kernels)
    base = AutoModelForCausalLM.from_pretrained(
        out / "base",
        dtype=torch.float32,
        quantization_config=CompressedTensorsConfig(dequantize=True),
    )
    served_model = PeftModel.from_pretrained(base, out / "adapter").eval()
    theirs, their_logits = _nll(served_model, windows)
    assert abs(theirs / ours - 1) < 0.01
    assert abs(torch.exp(torch.tensor(theirs - ours)).item() - 1) < 0.01  # perplexity ratio
    spread = ours_logits.abs().max()
    assert (their_logits - ours_logits).abs().max() < 0.01 * spread
    # the served base weight is the model's sparse int4 weight: q * scale, rounded once to fp16
    # here (dequantize=True dequantises in the stored fp16 scale dtype)
    dense = dict(served_model.get_base_model().named_modules())
    for name, m in model.named_modules():
        if isinstance(m, SLiMLinear):
            w = dense[name].base_layer.weight
            assert torch.equal(w, m.dense_weight().half().float()), name


def test_plain_from_pretrained_runs_compressed(served):
    """The default transformers load (no dequantize flag) keeps the packed weights and
    decompresses on the first forward."""
    from transformers import AutoModelForCausalLM

    _, run_dir, model, _, windows = served
    base = AutoModelForCausalLM.from_pretrained(run_dir / "servable" / "base", dtype=torch.float32)
    nll, _ = _nll(base, windows[:1])
    assert 0 < nll < 20
    q = base.model.layers[0].self_attn.q_proj.weight
    ref = model.model.layers[0].self_attn.q_proj.dense_weight()
    assert torch.equal(q, ref)  # the scales were loaded into fp32 parameters: bit-exact


def test_forced_group_size_requantizes_and_reports(served, tmp_path):
    report, _, model, tok, _ = served
    g = report["servable"]["group_size"]
    forced = 32 if g != 32 else 16
    summary = write_servable(model, tok, tmp_path / "sv", group_size=forced)
    on_disk = json.loads((tmp_path / "sv" / "servable.json").read_text())
    assert on_disk["group_size"] == forced
    if report["method"] == "slim":  # one scale per tensor: exact for any group size
        assert summary["exact"]
        return
    assert not summary["exact"] and summary["requantized_layers"]
    for rec in summary["requantized_layers"].values():
        assert 0 < rec["rel_error"] < 0.3
    with pytest.raises(ValueError, match="group_size"):
        write_servable(model, tok, tmp_path / "bad", group_size=48)


def _hide(monkeypatch, *names: str) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a, **k: None if n in names else real(n, *a, **k)
    )


@pytest.mark.parametrize("missing", ["compressed_tensors", "peft"])
def test_missing_packages_fail_before_any_work(monkeypatch, compose_cfg, missing, tmp_path):
    _hide(monkeypatch, missing)
    cfg = compose_cfg("compress", ["debug=default", "export.servable=true"])
    with pytest.raises(ConfigError, match=missing) as e:
        build_plan(cfg)
    assert e.value.key == "export.servable"
    build_plan(compose_cfg("compress", ["debug=default"]))  # off: not needed
    with pytest.raises(ImportError, match=missing):
        write_servable(torch.nn.Linear(2, 2), None, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_servable_needs_packed_layers(compose_cfg, tmp_path):
    cfg = compose_cfg("compress", ["debug=default", "export.servable=true", "export.packed=false"])
    with pytest.raises(ConfigError) as e:
        build_plan(cfg)
    assert e.value.key == "export.servable"
    cfg = compose_cfg("compress", ["debug=default", "method=dense", "export.servable=true"])
    with pytest.raises(ConfigError) as e:
        run_compress(cfg, tmp_path)
    assert e.value.key == "export.servable"
    with pytest.raises(ValueError, match="no compressed"):
        write_servable(torch.nn.Sequential(torch.nn.Linear(2, 2)), None, tmp_path / "x")


@pytest.mark.parametrize("tied", [False, True])
def test_packed_vocab_tables_are_written_dense(served, tmp_path, tied):
    """embeddings.bits: the packed input embedding / LM head are written as fp16 tables."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    from slim_lightning.nn.embedding import quantize_embeddings

    report, run_dir, _, _, windows = served
    if report["method"] != "slim_q":
        pytest.skip("one method is enough")
    model, tok, _ = load_compressed(run_dir / "packed")
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
        model.config.tie_word_embeddings = True
    info = quantize_embeddings(model, 8, 16)
    assert info["tied"] == tied
    summary = write_servable(model, tok, tmp_path / "sv")
    assert summary["exact"] and summary["layers"] == 14
    assert summary["tie_word_embeddings"] == tied
    want = ["model.embed_tokens.weight"] + ([] if tied else ["lm_head.weight"])
    assert summary["vocab_tables_dequantized"] == sorted(want)
    config = json.loads((tmp_path / "sv" / "base" / "config.json").read_text())
    assert config["tie_word_embeddings"] == tied
    base = AutoModelForCausalLM.from_pretrained(
        tmp_path / "sv" / "base",
        dtype=torch.float32,
        quantization_config=CompressedTensorsConfig(dequantize=True),
    )
    served_model = PeftModel.from_pretrained(base, tmp_path / "sv" / "adapter").eval()
    ours, ours_logits = _nll(model, windows)
    theirs, their_logits = _nll(served_model, windows)
    assert abs(theirs / ours - 1) < 0.01
    assert (their_logits - ours_logits).abs().max() < 0.01 * ours_logits.abs().max()
