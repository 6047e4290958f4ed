"""train.loss=kd|kd_squarehead: distillation from the dense parent (slim_lightning.train.distill)."""

from __future__ import annotations

import copy
import csv
import json

import pytest
import torch
from test_train import DEBUG, make_cfg, run_cli

from slim_lightning.errors import ConfigError
from slim_lightning.models.tiny import tiny_model
from slim_lightning.train.distill import distill_loss
from slim_lightning.train.plan import build_train_plan


@pytest.mark.parametrize("kind", ["kd", "kd_squarehead"])
def test_student_as_its_own_teacher_gives_zero_loss(kind):
    model, _ = tiny_model("llama")
    ids = torch.randint(0, 259, (2, 16), generator=torch.Generator().manual_seed(0))
    loss, parts = distill_loss(model, model, ids, kind=kind, temperature=2.0)
    assert abs(float(loss.detach())) < 1e-7, parts
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.model.layers[0].mlp.down_proj.weight.mul_(5.0)
    loss2, parts2 = distill_loss(other, model, ids, kind=kind)
    assert float(loss2.detach()) > 1e-5, parts2
    loss2.backward()
    assert other.model.layers[0].mlp.down_proj.weight.grad.abs().sum() > 0
    assert model.model.layers[0].mlp.down_proj.weight.grad is None  # the teacher is frozen


def test_chunked_kd_equals_full_logits():
    model, _ = tiny_model("llama")
    teacher, _ = tiny_model("llama", seed=1)
    ids = torch.randint(0, 259, (2, 16), generator=torch.Generator().manual_seed(0))
    loss, _ = distill_loss(model, teacher, ids, temperature=1.5, chunk_tokens=5)
    ls = torch.log_softmax(model(ids).logits.float() / 1.5, -1)
    lt = torch.log_softmax(teacher(ids).logits.float() / 1.5, -1)
    want = (lt.exp() * (lt - ls)).sum(-1).mean() * 1.5**2
    torch.testing.assert_close(loss, want, rtol=1e-4, atol=1e-5)


def test_label_loss_mixed_in_from_the_same_forward():
    """lm_weight: kd + w * the mean next-token NLL, equal to the separate LM loss's value, with
    the gradient of both terms."""
    from slim_lightning.data.evaluation import training_nll

    model, _ = tiny_model("llama")
    teacher, _ = tiny_model("llama", seed=1)
    ids = torch.randint(0, 259, (2, 16), generator=torch.Generator().manual_seed(0))
    kd, _ = distill_loss(model, teacher, ids, temperature=2.0, chunk_tokens=7)
    mixed, parts = distill_loss(model, teacher, ids, temperature=2.0, lm_weight=0.5, chunk_tokens=7)
    nll, n = training_nll(model, ids)
    torch.testing.assert_close(parts["lm"], float(nll.detach() / n), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mixed, kd + 0.5 * nll / n, rtol=1e-5, atol=1e-6)
    mixed.backward()
    g_mixed = model.model.layers[0].mlp.up_proj.weight.grad.clone()
    model.zero_grad()
    (distill_loss(model, teacher, ids, temperature=2.0)[0] + 0.5 * nll / n).backward()
    torch.testing.assert_close(model.model.layers[0].mlp.up_proj.weight.grad, g_mixed)


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.loss=mse", "train.loss"),
        ("train.kd_temperature=0", "train.kd_temperature"),
        ("train.lm_weight=-1", "train.lm_weight"),
        ("train.teacher_dtype=int8", "train.teacher_dtype"),
    ],
)
def test_bad_distillation_options_name_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        build_train_plan(make_cfg([*DEBUG, "+peft=true", override]))
    assert e.value.key == key


def test_cli_kd_squarehead_trains_and_logs(tmp_path):
    run = tmp_path / "run"
    run_cli(
        [
            "debug=train",
            "+peft=true",
            "engine.progress=false",
            "logger=csv",
            "train.loss=kd_squarehead",
            "train.lm_weight=0.5",
        ],
        run,
    )
    rep = json.loads((run / "report.json").read_text())
    assert rep["train"]["steps"] == 8
    rows = list(csv.DictReader((run / "csv" / "metrics.csv").open()))
    kd = [float(r["train/kd"]) for r in rows if r.get("train/kd")]
    sq = [float(r["train/squarehead"]) for r in rows if r.get("train/squarehead")]
    assert kd and sq and all(v >= 0 for v in kd + sq)


def test_teacher_must_be_the_recorded_dense_parent(tmp_path):
    """slim.json records the dense parent's weights digest (one-shot and fine-tuned checkpoints);
    distilling a compressed checkpoint from another model= is refused naming `model`, the
    parent itself trains."""
    from slim_lightning.app.train_run import run_train

    common = [*DEBUG, "+peft=true", "train.eval_before=false", "train.val_every_n_steps=0"]
    a = tmp_path / "a"
    run_train(make_cfg([*common, "trainer.max_steps=1"]), a)
    src = [
        json.loads((a / d / "slim.json").read_text())["source_sha256"]
        for d in ("compressed", "packed")
    ]
    assert src[0] and src[0] == src[1]
    kd = [*common, "trainer.max_steps=2", "train.loss=kd", f"compressed.path={a / 'compressed'}"]
    with pytest.raises(ConfigError) as e:
        run_train(make_cfg([*kd, "model.tiny.seed=1"]), tmp_path / "b")
    assert e.value.key == "model" and src[0][:12] in str(e.value)
    rep = run_train(make_cfg(kd), tmp_path / "c")
    assert rep["train"]["steps"] == 2
    assert (
        json.loads((tmp_path / "c" / "packed" / "slim.json").read_text())["source_sha256"] == src[0]
    )


def test_teacher_parent_checked_before_loading_for_local_weights(tmp_path):
    """A local model directory is hashed (not loaded) before anything runs: a checkpoint that
    records another parent is refused up front, its own parent passes."""
    from types import SimpleNamespace

    from slim_lightning.app.train_run import _check_teacher_early
    from slim_lightning.models import ModelConfig
    from slim_lightning.models.load import weights_digest

    model, _ = tiny_model("llama")
    model.save_pretrained(tmp_path / "m")
    plan = SimpleNamespace(model=ModelConfig(name="m", path=str(tmp_path / "m")))
    digest = weights_digest(plan.model)
    _check_teacher_early(plan, {"source_sha256": digest})
    _check_teacher_early(plan, {})  # a checkpoint from before the record: nothing to compare
    with pytest.raises(ConfigError) as e:
        _check_teacher_early(plan, {"source_sha256": "0" * 64})
    assert e.value.key == "model" and str(tmp_path / "m") in str(e.value)
