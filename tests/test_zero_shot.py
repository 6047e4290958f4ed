"""The offline zero-shot task ``slim_continuation``: examples, config validation, lm-eval run."""

from __future__ import annotations

import json
import os
import re

import pytest
from conftest import compose_config

from slim_lightning.compress.plan import build_plan
from slim_lightning.data.text import embedded_parts
from slim_lightning.data.zeroshot_task import N_CHOICES, TASK, continuation_examples, write_examples
from slim_lightning.errors import ConfigError


def _norm(text: str) -> str:
    """The task's text normalisation: hyphenated line breaks joined, whitespace collapsed."""
    return " ".join(re.sub(r"-\n(?=[a-z])", "-", text).split())


def test_examples_are_deterministic_and_well_formed():
    ex = continuation_examples()
    assert ex == continuation_examples()
    assert 100 <= len(ex) <= 200
    evals = {k: _norm(v) for k, v in embedded_parts()["eval"].items()}
    labels = set()
    for e in ex:
        choices = e["choices"]
        assert len(choices) == N_CHOICES and len(set(choices)) == N_CHOICES
        assert 0 <= e["label"] < N_CHOICES
        labels.add(e["label"])
        truth = choices[e["label"]]
        # exactly one choice continues the context in the source text: the labelled one
        text = evals[e["topic"]]
        assert [f"{e['context']} {c}" in text for c in choices] == [c == truth for c in choices]
        assert all(len(c) >= 40 and c.endswith((".", "!", "?")) for c in choices)
    assert labels == set(range(N_CHOICES))  # the answer position varies
    assert len({e["context"] for e in ex}) == len({e["choices"][e["label"]] for e in ex}) == len(ex)


def test_examples_come_from_evaluation_text_only():
    parts = embedded_parts()
    calib = " ".join(" ".join(t.split()) for t in parts["calib"].values())
    evals = " ".join(_norm(t) for t in parts["eval"].values())
    for e in continuation_examples():
        assert e["topic"] in parts["eval"] and e["topic"] not in parts["calib"]
        for piece in (e["context"], *e["choices"]):
            assert piece not in calib
            assert piece in evals


def test_jsonl_file_is_cached_by_content(tmp_path):
    a = write_examples(tmp_path)
    assert a == write_examples(tmp_path) and a.parent == tmp_path / "zero_shot"
    rows = [json.loads(line) for line in a.read_text(encoding="utf-8").splitlines()]
    assert rows == continuation_examples()


def test_config_accepts_local_task_and_names_a_bad_one():
    pytest.importorskip("lm_eval", reason="eval.zero_shot needs lm-eval (slim-lightning[eval])")
    plan = build_plan(compose_config("compress", ["debug=default", f"eval.zero_shot=[{TASK}]"]))
    assert plan.eval.zero_shot == (TASK,)
    with pytest.raises(ConfigError, match="eval.zero_shot") as e:
        build_plan(compose_config("compress", ["debug=default", "eval.zero_shot=[nonsense]"]))
    assert "nonsense" in str(e.value) and TASK in str(e.value)


@pytest.fixture(scope="module")
def compressed():
    """The tiny random LLaMA with every block linear SLiM-compressed (4-bit, 2:4, quantised
    adapters; random activation statistics instead of calibration: seconds)."""
    import torch
    from torch import nn

    from slim_lightning.core.compress import compress_linear
    from slim_lightning.core.types import CompressSpec, LayerStats, LowRankSpec, QuantSpec
    from slim_lightning.models.tiny import tiny_model
    from slim_lightning.nn.linear import SLiMLinear

    model, tok = tiny_model()
    spec = CompressSpec(quant=QuantSpec(group_size=16), lowrank=LowRankSpec(quant_group_size=16))
    g = torch.Generator().manual_seed(0)
    for name, mod in list(model.named_modules()):
        if isinstance(mod, nn.Linear) and name != "lm_head":
            x = torch.randn(64, mod.in_features, generator=g)
            stats = LayerStats(sq_sum=(x**2).sum(0), abs_sum=x.abs().sum(0), n_tokens=64)
            c = compress_linear(mod.weight.detach().float(), stats, spec)
            model.set_submodule(name, SLiMLinear.from_compressed(c, mod.bias))
    return model, tok


def test_zero_shot_runs_offline_on_a_compressed_model(compressed, tmp_path, monkeypatch):
    pytest.importorskip(
        "lm_eval", reason="zero-shot evaluation needs lm-eval (slim-lightning[eval])"
    )
    from slim_lightning.data.evaluation import zero_shot
    from slim_lightning.nn.backend import set_dense_cache
    from slim_lightning.nn.linear import SLiMLinear

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))  # nothing cached before
    model, tok = compressed
    assert any(isinstance(m, SLiMLinear) for m in model.modules())
    set_dense_cache(model, True)
    res = zero_shot(model, tok, [TASK], limit=8, batch_size=8, device="cpu", cache_dir=tmp_path)
    assert set(res) >= {"acc", "acc_norm", "n", "mean_acc", "lm_eval_version", "limit"}
    assert set(res["acc"]) == {TASK} and res["n"] == {TASK: 8}
    for v in (res["acc"][TASK], res["acc_norm"][TASK], res["mean_acc"]):
        assert 0.0 <= v <= 1.0 and (v * 8) == int(v * 8)  # a fraction of 8 examples
    assert os.listdir(tmp_path / "zero_shot")
