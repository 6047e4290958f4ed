"""Runs tell the truth about themselves (issue 22): no success report survives a failed re-run,
no stale output of an earlier run survives the next, oversubscribed budgets are said or refused
before any weights load, and the resume fingerprint covers transformers."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from conftest import compose_config

from slim_lightning.app.compress_run import run_compress
from slim_lightning.app.train_run import run_train
from slim_lightning.errors import ConfigError

BASE = ["debug=default"]


def _report(run_dir):
    return json.loads((run_dir / "report.json").read_text())


def test_config_refused_on_rerun_moves_the_success_report_aside(tmp_path):
    run_dir = tmp_path / "run"
    run_compress(compose_config("compress", BASE), run_dir)
    assert _report(run_dir)["status"] == "done"
    bad = compose_config("compress", [*BASE, "sparsity.m=5"])  # 5 divides no width here
    with pytest.raises(ConfigError):
        run_compress(bad, run_dir)
    rep = _report(run_dir)
    assert rep["status"] == "failed" and "sparsity.m" in rep["error"]
    assert rep["previous_report"] == "report.previous.json"
    assert json.loads((run_dir / "report.previous.json").read_text())["status"] == "done"
    assert (run_dir / "packed" / "slim.json").is_file()  # a typo never deletes a good checkpoint
    # the next good run starts clean: no previous report left beside its own
    run_compress(compose_config("compress", BASE), run_dir)
    assert _report(run_dir)["status"] == "done"
    assert not (run_dir / "report.previous.json").exists()


def test_train_config_refused_marks_the_directory_failed(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "report.json").write_text(json.dumps({"status": "done", "kind": "train"}))
    with pytest.raises(ConfigError, match="data.batch_size"):
        run_train(compose_config("train", [*BASE, "+peft=true", "data.batch_size=0"]), run_dir)
    assert _report(run_dir)["status"] == "failed"


def test_rerun_clears_an_earlier_runs_servable_and_offload_scratch(tmp_path):
    run_dir = tmp_path / "run"
    for name in ("servable", "offloaded"):
        (run_dir / name).mkdir(parents=True)
        (run_dir / name / "model.safetensors").write_bytes(b"old")
    (run_dir / "offloaded" / ".block_0001.safetensors.x.tmp").write_bytes(b"half")
    rep = run_compress(compose_config("compress", BASE), run_dir)
    assert not (run_dir / "servable").exists() and not (run_dir / "offloaded").exists()
    assert {"servable", "offloaded"} <= set(rep["removed"])


def test_oversubscribed_calibration_warns_naming_the_keys(tmp_path, caplog):
    from slim_lightning.data.config import CalibConfig
    from slim_lightning.data.text import calibration_windows
    from slim_lightning.models.tiny import byte_tokenizer

    text = tmp_path / "small.txt"
    text.write_text("a small calibration text. " * 20)  # ~520 byte tokens
    cfg = CalibConfig(source="text", path=str(text), nsamples=64, seqlen=32)
    with caplog.at_level(logging.WARNING):
        ids = calibration_windows(byte_tokenizer(), cfg)
    assert ids.shape == (64, 32)
    msg = " ".join(r.getMessage() for r in caplog.records)
    assert "calib.nsamples=64" in msg and "calib.seqlen=32" in msg and "overlap" in msg
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        calibration_windows(
            byte_tokenizer(), CalibConfig(source="text", path=str(text), nsamples=4, seqlen=32)
        )
    assert not caplog.records


def test_batch_beyond_the_blocks_is_refused_before_weights_load(tmp_path, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("weights were loaded before the bad batch size was refused")

    monkeypatch.setattr("slim_lightning.models.load.load_model", refuse)
    cfg = compose_config("train", [*BASE, "+peft=true", "data.batch_size=100000"])
    with pytest.raises(ConfigError, match=r"data\.batch_size.*training blocks"):
        run_train(cfg, tmp_path / "run")


def test_step_larger_than_budget_and_repeated_text_warn(caplog):
    from slim_lightning.data.config import TrainDataConfig
    from slim_lightning.data.datamodule import check_budget

    cfg = TrainDataConfig(seqlen=32, batch_size=8, train_tokens=100)
    with caplog.at_level(logging.WARNING):
        check_budget(cfg, n_train=50, world_size=1)
    msg = " ".join(r.getMessage() for r in caplog.records)
    assert "data.batch_size=8" in msg and "exceeds data.train_tokens=100" in msg
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        check_budget(TrainDataConfig(seqlen=32, train_tokens=10_000), n_train=10, world_size=1)
    assert "repeats the text" in " ".join(r.getMessage() for r in caplog.records)
    with pytest.raises(ConfigError, match="data.batch_size"):
        check_budget(TrainDataConfig(seqlen=32, batch_size=4), n_train=7, world_size=2)


def test_resume_fingerprint_covers_transformers(monkeypatch):
    import transformers

    from slim_lightning.compress.pipeline import plan_fingerprint
    from slim_lightning.compress.plan import build_plan

    plan = build_plan(compose_config("compress", BASE))
    ids = torch.zeros(2, 8, dtype=torch.long)
    a = plan_fingerprint(plan, ids, "w")
    monkeypatch.setattr(transformers, "__version__", "5.999.0")
    assert plan_fingerprint(plan, ids, "w") != a


@pytest.mark.parametrize("key", ["train.embeddings", "train.lm_head"])
def test_training_quantised_tables_is_refused_before_compressing(tmp_path, monkeypatch, key):
    def refuse(*a, **k):
        raise AssertionError("weights were loaded before the conflict was refused")

    monkeypatch.setattr("slim_lightning.models.load.load_model", refuse)
    cfg = compose_config("train", [*BASE, "+peft=true", f"{key}=true", "embeddings.bits=8"])
    with pytest.raises(ConfigError, match=rf"{key}: got True.*embeddings\.bits=8"):
        run_train(cfg, tmp_path / "run")
