"""Model loading: registry, local HF directories, GGUF files, bad-input errors."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from slim_lightning.errors import ConfigError
from slim_lightning.models.arch import block_linears, get_arch, get_blocks
from slim_lightning.models.load import load_model
from slim_lightning.models.source import ModelConfig, embedded_smollm2_path
from slim_lightning.models.tiny import tiny_model


@pytest.mark.parametrize("kind", ["llama", "opt"])
def test_registry_finds_blocks_and_linears(kind):
    model, _ = tiny_model(kind)
    arch = get_arch(model)
    blocks = get_blocks(model, arch)
    assert len(blocks) == model.config.num_hidden_layers
    lins = block_linears(blocks[0], arch)
    assert set(lins) == set(arch.linear_names)
    assert all(isinstance(m, nn.Linear) for m in lins.values())
    # every nn.Linear of a block is compressed (nothing silently skipped)
    all_lin = {n for n, m in blocks[0].named_modules() if isinstance(m, nn.Linear)}
    assert all_lin == set(arch.linear_names)


def test_local_hf_directory_round_trip(tmp_path):
    model, tok = tiny_model("llama", seed=3)
    model.save_pretrained(tmp_path, safe_serialization=True)
    tok.save_pretrained(tmp_path)
    loaded, tok2 = load_model(ModelConfig(name="t", path=str(tmp_path)))
    ids = torch.randint(0, 200, (2, 16))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        got = loaded(input_ids=ids).logits
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    assert tok2("abc")["input_ids"] == tok("abc")["input_ids"]
    assert not loaded.training and loaded.config.use_cache is False


def test_dtype_is_applied(tmp_path):
    model, tok = tiny_model("llama")
    model.save_pretrained(tmp_path, safe_serialization=True)
    tok.save_pretrained(tmp_path)
    loaded, _ = load_model(ModelConfig(path=str(tmp_path), dtype="bfloat16"))
    assert next(loaded.parameters()).dtype == torch.bfloat16


def test_embedded_gguf_loads_and_caches(tmp_path, caplog):
    """The embedded SmolLM2 GGUF loads as a plain (save_pretrained-able) LLaMA and is cached."""
    path = embedded_smollm2_path()
    assert path.suffix == ".gguf" and path.stat().st_size > 50e6
    cfg = ModelConfig(name="smollm2", path=str(path), cache_dir=str(tmp_path))
    model, tok = load_model(cfg)
    assert get_arch(model).model_type == "llama"
    assert model.config.hidden_size == 576 and model.config.num_hidden_layers == 30
    cached = list((tmp_path / "gguf").iterdir())
    assert len(cached) == 1 and (cached[0] / "model.safetensors").is_file()
    ids = tok("The quick brown fox jumps over the lazy dog.", return_tensors="pt").input_ids
    with torch.no_grad():
        a = model(input_ids=ids).logits
    again, _ = load_model(cfg)  # second load comes from the cache, same weights
    with torch.no_grad():
        b = again(input_ids=ids).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    # a real LM: the continuation is far better than uniform over the vocabulary
    nll = torch.nn.functional.cross_entropy(a[0, :-1], ids[0, 1:])
    assert float(nll) < 0.5 * torch.log(torch.tensor(float(a.shape[-1])))
    # a changed byte in the cache (still a valid file, finite values) is found by its digest
    # and the entry rebuilt from the GGUF: the same model, never a silently different one
    weights = cached[0] / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1000] ^= 0x40
    weights.write_bytes(bytes(data))
    with caplog.at_level("WARNING"):
        healed, _ = load_model(cfg)
    assert "rebuilding the damaged GGUF conversion cache" in caplog.text
    assert "differs from its recorded sha256" in caplog.text
    with torch.no_grad():
        c = healed(input_ids=ids).logits
    torch.testing.assert_close(a, c, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"path": ""}, "model.path"),
        ({"path": "/no/such/dir"}, "model.path"),
        ({"path": "missing.gguf"}, "model.path"),
        ({"path": "embedded:nope"}, "model.path"),
        ({"path": "org/name", "dtype": "float8"}, "model.dtype"),
        ({"path": "org/name", "arch": "gpt5"}, "model.arch"),
        ({"random_init": True, "tiny": {"kind": "mamba"}}, "model.tiny.kind"),
    ],
)
def test_bad_model_config_names_the_key(kwargs, key):
    with pytest.raises(ConfigError) as e:
        ModelConfig(**kwargs)
    assert str(e.value).startswith(key)


def test_gguf_file_missing_in_directory(tmp_path):
    with pytest.raises(ConfigError, match="model.gguf_file"):
        ModelConfig(path=str(tmp_path), gguf_file="x.gguf")


def test_remote_code_is_off_by_default():
    assert ModelConfig(path="org/name").trust_remote_code is False


@pytest.mark.parametrize(
    ("failure", "needle"),
    [
        ("404", "an existing hub repository with config.json (HTTP 404)"),
        ("401", "gated or private"),
        ("403", "gated or private"),
        ("unreachable", "cannot be reached"),
        ("offline", "HF_HUB_OFFLINE is set"),
    ],
)
def test_hub_errors_name_model_path(monkeypatch, failure, needle):
    """A hub id that cannot be used fails in seconds naming model.path (no download tried)."""
    import types
    import urllib.error
    import urllib.request

    import huggingface_hub
    from huggingface_hub import constants

    from slim_lightning.models.source import _probe_hub

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", failure == "offline")

    def urlopen(req, timeout=None):
        if failure == "unreachable":
            raise urllib.error.URLError("no route to host")
        raise urllib.error.HTTPError(req.full_url, int(failure), "x", {}, None)

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    cfg = types.SimpleNamespace(path="some-org/some-model", revision=None)
    with pytest.raises(ConfigError, match="model.path") as err:
        _probe_hub(cfg)
    assert needle in str(err.value) and "some-org/some-model" in str(err.value)


@pytest.mark.parametrize("kind", ["llama", "opt"])
def test_dense_checkpoint_missing_a_tensor_is_refused(tmp_path, kind):
    """transformers would fill a missing tensor with random values and only log it: refused,
    naming model.path and the tensor; the intact (tied, for OPT) checkpoint loads."""
    from safetensors.torch import load_file, save_file

    from slim_lightning.models.tiny import tiny_model

    model, tok = tiny_model(kind=kind)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    cfg = ModelConfig(name="t", path=str(tmp_path))
    load_model(cfg)
    sd = load_file(tmp_path / "model.safetensors")
    key = next(k for k in sd if "layers.1." in k and k.endswith("weight"))
    del sd[key]
    save_file(sd, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"model\.path=.*missing tensors \['{re.escape(key)}'\]"):
        load_model(cfg)
