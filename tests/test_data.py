"""Calibration / evaluation text: disjoint embedded parts, windows, cache, errors."""

from __future__ import annotations

import pytest
import torch

from slim_lightning.data.config import CalibConfig, EvalConfig
from slim_lightning.data.text import (
    calibration_windows,
    embedded_parts,
    eval_tokens,
    eval_windows,
    load_text,
    tokenize_text,
)
from slim_lightning.errors import ConfigError
from slim_lightning.models.tiny import byte_tokenizer


def test_embedded_calibration_and_evaluation_are_disjoint():
    parts = embedded_parts()
    assert parts["calib"] and parts["eval"]
    assert not set(parts["calib"]) & set(parts["eval"])
    # no paragraph of evaluation text appears in the calibration text
    calib = "\n\n".join(parts["calib"].values())
    paras = [p for t in parts["eval"].values() for p in t.split("\n\n") if len(p) > 200]
    assert len(paras) > 50
    assert not [p for p in paras if p in calib]


def test_default_splits_resolve_per_role():
    assert CalibConfig().resolved_split == "calib"
    assert EvalConfig().resolved_split == "eval"
    assert load_text(CalibConfig()) != load_text(EvalConfig())


def test_calibration_windows_are_deterministic_slices(tmp_path):
    tok = byte_tokenizer()
    text = tmp_path / "c.txt"
    text.write_text("".join(chr(97 + i % 26) for i in range(3000)))
    cfg = CalibConfig(
        source="text", path=str(text), nsamples=5, seqlen=64, seed=1, cache_dir=str(tmp_path)
    )
    a = calibration_windows(tok, cfg)
    assert a.shape == (5, 64) and a.dtype == torch.int64
    torch.testing.assert_close(a, calibration_windows(tok, cfg))
    b = calibration_windows(tok, CalibConfig(**{**cfg.__dict__, "seed": 2}))
    assert not torch.equal(a, b)
    full = tokenize_text(tok, text.read_text(), str(tmp_path))
    # every window is a contiguous slice of the token stream
    for w in a:
        starts = [i for i in range(full.numel() - 63) if torch.equal(full[i : i + 64], w)]
        assert starts


def test_tokenisation_cache_is_reused_and_atomic(tmp_path):
    tok = byte_tokenizer()
    ids = tokenize_text(tok, "hello world", str(tmp_path))
    files = list((tmp_path / "tokens").iterdir())
    assert len(files) == 1 and files[0].suffix == ".safetensors"
    assert not [f for f in files if f.name.startswith(".")]  # no temp file left behind
    torch.testing.assert_close(tokenize_text(tok, "hello world", str(tmp_path)), ids)


def test_eval_windows_hand_case():
    toks = torch.arange(10)
    w = eval_windows(toks, 3)
    assert w.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]  # remainder dropped
    assert eval_windows(toks, 3, max_windows=2).tolist() == [[0, 1, 2], [3, 4, 5]]
    with pytest.raises(ConfigError, match="eval.seqlen"):
        eval_windows(toks, 11)


def test_eval_text_file(tmp_path):
    tok = byte_tokenizer()
    f = tmp_path / "e.txt"
    f.write_text("x" * 100)
    t = eval_tokens(tok, EvalConfig(source="text", path=str(f), seqlen=10, cache_dir=str(tmp_path)))
    assert t.shape[0] == 1 and t.shape[1] >= 100


def test_seqlen_longer_than_text_is_a_config_error(tmp_path):
    f = tmp_path / "short.txt"
    f.write_text("tiny")
    cfg = CalibConfig(source="text", path=str(f), nsamples=1, seqlen=512, cache_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="calib.seqlen"):
        calibration_windows(byte_tokenizer(), cfg)


@pytest.mark.parametrize(
    ("cls", "kwargs", "key"),
    [
        (CalibConfig, {"source": "pile"}, "calib.source"),
        (CalibConfig, {"nsamples": 0}, "calib.nsamples"),
        (CalibConfig, {"seqlen": -1}, "calib.seqlen"),
        (CalibConfig, {"source": "text", "path": "/no/such/file"}, "calib.path"),
        (CalibConfig, {"source": "wikitext2", "split": "dev"}, "calib.split"),
        (EvalConfig, {"max_windows": 0}, "eval.max_windows"),
        (EvalConfig, {"source": "text"}, "eval.path"),
    ],
)
def test_bad_data_config(cls, kwargs, key):
    with pytest.raises(ConfigError) as e:
        cls(**kwargs)
    assert str(e.value).startswith(key)


def test_hub_sources_fail_clearly_offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="wikitext"):
        load_text(EvalConfig(source="wikitext2"))


def test_zero_shot_tasks_are_validated():
    with pytest.raises(ConfigError, match="eval.zero_shot"):
        EvalConfig(zero_shot=["hellaswag_v9"])
    assert EvalConfig(zero_shot=[]).zero_shot == ()
