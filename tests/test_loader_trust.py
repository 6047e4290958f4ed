"""Every loader of a packed directory returns the exact model or refuses (issue 22).

Tampered copies of one packed run go through ``AutoModelForCausalLM.from_pretrained`` and
``load_compressed``; both must raise ``CheckpointError`` naming the reason, with and without the
sha256 check (``SLIM_LIGHTNING_VERIFY=0`` / ``verify=False``) where the damage is structural.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import compose_config
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import slim_lightning  # noqa: F401 - registers the quantizer
from slim_lightning import load_compressed
from slim_lightning.app.compress_run import run_compress
from slim_lightning.errors import CheckpointError


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("trustrun")
    # tiny OPT: ties its head to the input embedding; 8-bit tables are packed with fp16 scales
    cfg = compose_config("compress", ["debug=default", "model=tiny_opt", "embeddings.bits=8"])
    run_compress(cfg, run_dir)
    return run_dir / "packed"


def _copy(packed, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(packed, out)
    return out


def _edit_json(path, fn):
    obj = json.loads(path.read_text())
    fn(obj)
    path.write_text(json.dumps(obj))


def _loaders(path, verify):
    """Both doors, each with the sha256 check on or off."""

    def hf():
        old = os.environ.get("SLIM_LIGHTNING_VERIFY")
        os.environ["SLIM_LIGHTNING_VERIFY"] = "1" if verify else "0"
        try:
            return AutoModelForCausalLM.from_pretrained(path)
        finally:
            if old is None:
                del os.environ["SLIM_LIGHTNING_VERIFY"]
            else:
                os.environ["SLIM_LIGHTNING_VERIFY"] = old

    return {"from_pretrained": hf, "load_compressed": lambda: load_compressed(path, verify=verify)}


def _refused(path, match, verify):
    for name, load in _loaders(path, verify).items():
        with pytest.raises(CheckpointError, match=match):
            load()
            pytest.fail(f"{name} loaded a tampered directory")


def test_untampered_loads_the_same_through_both_doors(packed):
    a = AutoModelForCausalLM.from_pretrained(packed)
    b, _, meta = load_compressed(packed)
    assert meta["tied_to"], "the test model must tie its head (the tied_to checks need it)"
    ids = torch.randint(0, a.config.vocab_size, (1, 9))
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)


def test_flipped_byte_in_the_codes_is_refused(packed, tmp_path):
    d = _copy(packed, tmp_path)
    w = d / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-7] ^= 0x01  # inside the last tensor's bytes: a valid file with one different code
    w.write_bytes(bytes(data))
    _refused(d, "model.safetensors: sha256 differs", verify=True)


def test_missing_slim_json_is_refused(packed, tmp_path):
    d = _copy(packed, tmp_path)
    (d / "slim.json").unlink()
    _refused(d, "no slim.json", verify=True)
    _refused(d, "no slim.json", verify=False)


def test_edited_config_is_refused_with_and_without_digests(packed, tmp_path):
    d = _copy(packed, tmp_path)
    _edit_json(d / "config.json", lambda c: c["quantization_config"]["tied_to"].clear())
    _refused(d, "config.json: sha256 differs", verify=True)
    _refused(d, "tied_to", verify=False)


def test_layer_dropped_from_both_lists_is_refused(packed, tmp_path):
    """Without digests, a consistent edit of both lists must still not yield a fresh layer."""
    d = _copy(packed, tmp_path)
    name = next(iter(json.loads((d / "slim.json").read_text())["layers"]))
    _edit_json(d / "config.json", lambda c: c["quantization_config"]["layers"].pop(name))
    _edit_json(d / "slim.json", lambda m: m["layers"].pop(name))
    _refused(d, rf"missing tensors \['{name}\.weight'\]", verify=False)


def test_emptied_ties_in_both_files_are_refused(packed, tmp_path):
    d = _copy(packed, tmp_path)
    _edit_json(d / "config.json", lambda c: c["quantization_config"]["tied_to"].clear())

    def untie(m):
        m["tied_to"].clear()
        m["tied"].clear()

    _edit_json(d / "slim.json", untie)
    _refused(d, "missing tensors", verify=False)


@pytest.mark.parametrize("kind", ["norm", "embedding_scale"])
def test_non_finite_stored_tensor_is_refused(packed, tmp_path, kind):
    d = _copy(packed, tmp_path)
    sd = load_file(str(d / "model.safetensors"))
    if kind == "norm":
        key = next(k for k in sd if k.endswith("norm.weight"))
        sd[key] = sd[key].clone()
        sd[key].view(-1)[0] = float("nan")
    else:  # fp16 scales are stored as their int16 bits: write a NaN's bits
        key = next(k for k in sd if "embed_tokens.weight_scale" in k)
        sd[key] = sd[key].clone()
        sd[key].view(torch.float16).view(-1)[0] = float("nan")
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "slim-lightning"})
    _refused(d, "NaN/Inf", verify=False)


def test_save_pretrained_copy_verifies_like_the_original(packed, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(packed)
    out = tmp_path / "saved"
    model.save_pretrained(out)
    again, _, _ = load_compressed(out)  # verified against the fresh digests
    ids = torch.randint(0, model.config.vocab_size, (1, 7))
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)
    w = out / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-3] ^= 0x01
    w.write_bytes(bytes(data))
    _refused(out, "sha256 differs", verify=True)


@pytest.mark.parametrize("which", ["from_pretrained", "load_compressed"])
def test_generate_uses_the_kv_cache(packed, which):
    model = (
        AutoModelForCausalLM.from_pretrained(packed)
        if which == "from_pretrained"
        else load_compressed(packed)[0]
    )
    lengths = []
    emb = model.get_input_embeddings()
    handle = emb.register_forward_hook(lambda m, args, out: lengths.append(args[0].shape[-1]))
    ids = torch.randint(0, model.config.vocab_size, (1, 6))
    try:
        model.generate(ids, max_new_tokens=4, do_sample=False)
    finally:
        handle.remove()
    assert lengths == [6, 1, 1, 1], lengths  # the prompt once, then one new token per step


_UNSUPPORTED = """
import sys, transformers
{setup}
import slim_lightning
from transformers import AutoModelForCausalLM
try:
    AutoModelForCausalLM.from_pretrained(sys.argv[1])
except Exception as e:
    print("REFUSED", type(e).__name__, e)
else:
    print("LOADED")
"""


@pytest.mark.parametrize(
    "setup, reason",
    [
        ("transformers.__version__ = '4.50.0'", "4.50.0 is outside the range"),
        ("transformers.__version__ = '6.0.0'", "6.0.0 is outside the range"),
        (
            "import transformers.quantizers.auto as a\n"
            "def boom(name):\n"
            "    raise TypeError('registry changed')\n"
            "a.register_quantizer = boom",
            "registering the slim quantizer failed \\(TypeError: registry changed\\)",
        ),
    ],
    ids=["too_old", "too_new", "registration_raises"],
)
def test_unregistered_quantizer_refuses_instead_of_random_weights(packed, setup, reason):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", _UNSUPPORTED.format(setup=setup), str(packed)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "REFUSED RuntimeError" in out.stdout, out.stdout + out.stderr[-2000:]
    assert __import__("re").search(reason, out.stdout), out.stdout
    assert ">=5.0,<6.0" in out.stdout and "load_compressed" in out.stdout
