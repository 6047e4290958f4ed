"""Quantised input embeddings and LM head (``embeddings.bits``): modules, tying, checkpoints."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import slim_lightning  # noqa: F401 - registers the transformers quantizer
from slim_lightning.checkpoint import load_compressed, read_meta, save_compressed
from slim_lightning.compress.plan import EmbeddingConfig
from slim_lightning.errors import ConfigError
from slim_lightning.nn.adapters import merge_to_dense
from slim_lightning.nn.embedding import PackedEmbedding, quantize_embeddings
from slim_lightning.nn.linear import SLiMLinear


def _tiny(tied: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=300,
        hidden_size=48,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
    )
    model = LlamaForCausalLM(cfg).eval()
    if tied:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("step", [1, 7, 300, None])
def test_row_steps_pack_the_whole_tables_codes(step):
    """pack_rows in any row step (last step short included) = one whole-table pack, and the
    error measured in steps = the whole-table error."""
    from slim_lightning.formats import pack_absmax
    from slim_lightning.nn.embedding import _rel_err, pack_rows

    w = torch.randn(300, 48, generator=torch.Generator().manual_seed(1)).to(torch.float16)
    whole, steps = pack_absmax(w, 8, 16), pack_rows(w, 8, 16, step)
    assert steps.shape == whole.shape and steps.nnz == whole.nnz
    assert steps.tensors.keys() == whole.tensors.keys()
    for k, v in whole.tensors.items():
        assert torch.equal(steps.tensors[k], v), k
    want = float((whole.to_dense() - w.float()).norm() / w.float().norm())
    assert math.isclose(_rel_err(steps, w, step), want, rel_tol=1e-5)


@pytest.mark.parametrize("bits", [8, 4])
def test_packed_embedding_matches_its_dequantised_table(bits):
    model = _tiny(tied=False)
    w = model.model.embed_tokens.weight.detach().clone()
    rep = quantize_embeddings(model, bits, 16)
    emb = model.get_input_embeddings()
    assert isinstance(emb, PackedEmbedding) and isinstance(model.lm_head, SLiMLinear)
    table = emb.packed_weight().to_dense()
    ids = torch.tensor([[0, 5, 299, 5], [7, 7, 1, 2]])
    assert torch.equal(emb(ids), table[ids])
    # AbsMax error bound: half a step of each row group's scale
    step = (w.abs().reshape(300, 3, 16).amax(-1) / (2 ** (bits - 1) - 1)).repeat_interleave(16, 1)
    assert bool(((table - w).abs() <= step / 2 + 1e-6).all())
    assert 0 < rep["embedding_rel_err"] < (0.02 if bits == 8 else 0.2)
    assert emb.to(torch.float16)(ids).dtype == torch.float16  # a float cast reaches the output


@pytest.mark.parametrize("tied", [True, False])
def test_checkpoint_round_trip_stores_a_tied_table_once(tied, tmp_path):
    model = _tiny(tied)
    assert all(k.startswith(("model.", "lm_head.")) for k in model.state_dict())
    quantize_embeddings(model, 4, 16)
    if tied:
        assert model.lm_head.weight_values is model.model.embed_tokens.weight_values
    ids = torch.randint(0, 300, (2, 9))
    ref = _logits(model, ids)
    save_compressed(model, None, tmp_path / "ck")
    meta = read_meta(tmp_path / "ck")
    with safe_open(str(tmp_path / "ck" / "model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
        stored = sum(
            math.prod(f.get_slice(k).get_shape()) * f.get_tensor(k).element_size() for k in keys
        )
    head_keys = [k for k in keys if k.startswith("lm_head.")]
    assert (not head_keys) == tied
    assert set(meta["tied_to"]) == (
        {f"lm_head.weight_{k}" for k in ("values", "scale")} if tied else set()
    )
    size = meta["size"]
    assert size["linears_bytes"] + size["rest_bytes"] == stored
    # the 16-bit reference counts the vocabulary table once when tied, twice when not
    others = sum(2 * v.numel() for k, v in model.state_dict().items() if v.is_floating_point())
    assert size["rest_fp16_bytes"] == 2 * 300 * 48 * (1 if tied else 2) + others
    loaded, _, _ = load_compressed(tmp_path / "ck")
    assert torch.equal(_logits(loaded, ids), ref)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "ck")
    assert torch.equal(_logits(hf, ids), ref)
    if tied:
        assert loaded.lm_head.weight_values is loaded.model.embed_tokens.weight_values
        assert hf.lm_head.weight_values is hf.model.embed_tokens.weight_values
    hf.save_pretrained(tmp_path / "again")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again")
    assert torch.equal(_logits(again, ids), ref)


def test_dense_export_dequantises_and_reties(tmp_path):
    model = _tiny(tied=True)
    quantize_embeddings(model, 8, 16)
    ids = torch.randint(0, 300, (1, 7))
    ref = _logits(model, ids)
    merge_to_dense(model)
    assert isinstance(model.get_input_embeddings(), torch.nn.Embedding)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.allclose(_logits(model, ids), ref, atol=1e-5)
    model.save_pretrained(tmp_path / "hf")
    assert "quantization_config" not in json.loads((tmp_path / "hf" / "config.json").read_text())


def test_embedding_config_is_validated(compose_cfg):
    from slim_lightning.compress.plan import build_plan

    assert EmbeddingConfig().bits is None
    with pytest.raises(ConfigError, match="embeddings.bits"):
        build_plan(compose_cfg("compress", ["debug=default", "embeddings.bits=3"]))
    with pytest.raises(ConfigError, match="embeddings.group_size"):
        build_plan(compose_cfg("compress", ["debug=default", "embeddings.group_size=0"]))
    plan = build_plan(compose_cfg("compress", ["debug=default", "embeddings.bits=8"]))
    assert plan.embeddings.bits == 8
