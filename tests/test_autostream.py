"""engine.streaming=auto (issue 25): decided before any weights load, said in one line and in
report.json, refused when the model fits neither way."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import compose_config

from slim_lightning.app.compress_run import run_compress
from slim_lightning.errors import ConfigError

GIB = 2**30


def _ckpt(tmp_path):
    from slim_lightning.models.tiny import tiny_model

    model, tok = tiny_model(kind="llama", seed=0)
    d = tmp_path / "ckpt"
    model.to(torch.float16).save_pretrained(d, safe_serialization=True)
    tok.save_pretrained(d)
    return d


def _cfg(path, *extra):
    return compose_config(
        "compress",
        [
            "debug=default",
            f"+model.path={path}",
            "model.random_init=false",
            "eval_dense=false",
            *extra,
        ],
    )


def test_default_is_auto_and_a_model_that_fits_runs_whole(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="slim_lightning.app.autostream"):
        rep = run_compress(_cfg(_ckpt(tmp_path)), tmp_path / "run")
    assert rep["streaming"]["mode"] == "auto" and rep["streaming"]["streaming"] is False
    assert "the whole model fits" in rep["streaming"]["reason"]
    assert "engine.streaming=auto: whole model" in caplog.text


def test_auto_streams_when_the_whole_model_would_not_fit(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr("slim_lightning.app.autostream.available_memory", lambda: int(0.85 * GIB))
    ckpt = _ckpt(tmp_path)
    with caplog.at_level(logging.INFO, logger="slim_lightning.app.autostream"):
        rep = run_compress(_cfg(ckpt), tmp_path / "auto")
    assert rep["streaming"]["streaming"] is True, rep["streaming"]
    assert "engine.streaming=auto: streaming" in caplog.text
    ref = run_compress(_cfg(ckpt, "engine.streaming=false"), tmp_path / "whole")
    assert rep["ppl"] == ref["ppl"]  # the same model either way


@pytest.mark.parametrize("tiny", [False, True], ids=["checkpoint", "random_tiny"])
def test_fits_neither_way_is_refused_before_weights_load(tmp_path, monkeypatch, tiny):
    monkeypatch.setattr("slim_lightning.app.autostream.available_memory", lambda: 2**20)

    def refuse(*a, **k):
        raise AssertionError("weights were loaded before the run was refused")

    monkeypatch.setattr("slim_lightning.models.load.load_model", refuse)
    monkeypatch.setattr("slim_lightning.compress.pipeline.load_base", refuse)
    cfg = compose_config("compress", ["debug=default"]) if tiny else _cfg(_ckpt(tmp_path))
    with pytest.raises(ConfigError, match=r"engine\.streaming.*GiB.*available") as err:
        run_compress(cfg, tmp_path / "run")
    assert ("cannot stream" in str(err.value)) == tiny


@pytest.mark.parametrize("bad", ["maybe", 1, 0, "yes"])
def test_bad_streaming_values_name_the_key(bad):
    from slim_lightning.compress.plan import build_plan

    with pytest.raises(ConfigError, match="engine.streaming"):
        build_plan(compose_config("compress", ["debug=default", f"engine.streaming={bad}"]))


def test_available_memory_reads_the_machine():
    from slim_lightning.app.autostream import available_memory

    avail = available_memory()
    assert avail is None or avail > 64 * 2**20


def test_the_estimate_counts_the_methods_block_work():
    """One block's compression work enters both estimates: none beyond row blocks for a
    row-separable method, the X^T X (one per group of linears fed one input) and the largest
    linear's work for SparseGPT + adapters, the trainable state for the block reconstruction."""
    from transformers import LlamaConfig

    from slim_lightning.app.autostream import ROW_WORK, estimate
    from slim_lightning.compress.plan import build_plan

    config = LlamaConfig(
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        vocab_size=1000,
    )
    est = {
        m: estimate(config, 4, build_plan(compose_config("compress", [f"method={m}"])))
        for m in ("wanda_absmax", "slim_q_fast", "slim_q")
    }
    block = 4 * 256**2 + 3 * 256 * 688  # its packed results count too (< 1 byte per weight)
    assert est["wanda_absmax"]["block_work"] < ROW_WORK * 256 * 688 + block
    hess = 4 * (256**2 * 3 + 688**2)  # q/k/v share one, o alone, gate/up share one, down
    assert est["slim_q_fast"]["block_work"] > hess
    assert est["slim_q"]["block_work"] > est["slim_q_fast"]["block_work"]
    for key in ("whole", "streaming"):
        assert est["wanda_absmax"][key] < est["slim_q_fast"][key] < est["slim_q"][key]


def test_a_block_too_large_to_reconstruct_is_refused_naming_the_leaner_option(
    tmp_path, monkeypatch
):
    """Memory for the one-shot method streaming but not for the default's reconstruction state:
    refused before loading, with the numbers and the option that fits; the one-shot preset then
    streams."""
    from slim_lightning.app import autostream

    ckpt = _ckpt(tmp_path)
    cfg = _cfg(ckpt, "method=slim_q")
    from transformers import AutoConfig

    from slim_lightning.compress.plan import build_plan

    config = AutoConfig.from_pretrained(ckpt)
    need = {
        m: autostream.estimate(config, 4, build_plan(_cfg(ckpt, *m.split())))["streaming"]
        for m in ("method=slim_q", "method=slim_q_fast", "reconstruct.optimizer=adam8bit")
    }
    assert need["method=slim_q_fast"] < need["reconstruct.optimizer=adam8bit"]
    assert need["reconstruct.optimizer=adam8bit"] < need["method=slim_q"]
    # below even the 8-bit memory plan's need
    avail = (need["method=slim_q_fast"] + need["reconstruct.optimizer=adam8bit"]) // 2
    monkeypatch.setattr(autostream, "available_memory", lambda: avail)
    with pytest.raises(ConfigError, match=r"reconstruct=none") as err:
        run_compress(cfg, tmp_path / "refused")
    assert "one block's compression work" in str(err.value)
    rep = run_compress(_cfg(ckpt, "method=slim_q_fast"), tmp_path / "fast")
    assert rep["streaming"]["streaming"] is True


def test_auto_chooses_the_8bit_memory_plan_when_only_it_fits(tmp_path, monkeypatch, caplog):
    """Streaming with Adam's fp32 moments over the budget, with 8-bit moments within it: the
    run streams with reconstruct.optimizer=adam8bit, says so in the log and in report.json."""
    from transformers import AutoConfig

    from slim_lightning.app import autostream
    from slim_lightning.compress.plan import build_plan

    ckpt = _ckpt(tmp_path)
    config = AutoConfig.from_pretrained(ckpt)
    need = {
        o: autostream.estimate(config, 4, build_plan(_cfg(ckpt, f"reconstruct.optimizer={o}")))
        for o in ("adam", "adam8bit")
    }
    share = 0.8  # engine.streaming_share's default
    avail = int((need["adam8bit"]["streaming"] + need["adam"]["streaming"]) / 2 / share)
    assert need["adam8bit"]["whole"] > share * avail  # (the whole model does not fit either)
    monkeypatch.setattr(autostream, "available_memory", lambda: avail)
    used = []
    real = autostream.estimate
    monkeypatch.setattr(
        autostream,
        "estimate",
        lambda c, b, plan=None: (
            used.append(plan and plan.reconstruct.optimizer) or real(c, b, plan)
        ),
    )
    from slim_lightning.compress import reconstruct

    kinds, adam = [], reconstruct._adam
    monkeypatch.setattr(
        reconstruct, "_adam", lambda g, kind, **kw: kinds.append(kind) or adam(g, kind, **kw)
    )
    with caplog.at_level(logging.INFO, logger="slim_lightning.app.autostream"):
        rep = run_compress(_cfg(ckpt), tmp_path / "lean")
    assert kinds and set(kinds) == {"adam8bit"}  # the blocks trained with the plan chosen
    assert rep["streaming"]["streaming"] is True
    plan = rep["streaming"]["memory_plan"]
    assert plan["reconstruct.optimizer"] == "adam8bit" and plan["changes_results"] is True
    assert "memory plan reconstruct.optimizer=adam8bit" in caplog.text
    assert used[-1] == "adam8bit"


def test_the_export_estimate_counts_the_adapters_the_packed_model_holds(tmp_path):
    """The whole packed model the export writes keeps every adapter as fp32 ``L`` / ``R``
    parameters (1.03 GB of the 8-block synthetic's 2.51 GiB export under slim_q): the
    estimate's adapter term is exactly their bytes, and 0 for a method without adapters."""
    from slim_lightning import load_compressed
    from slim_lightning.app.autostream import adapter_bytes
    from slim_lightning.compress.plan import build_plan
    from slim_lightning.models.arch import get_arch, get_blocks

    cfg = compose_config(
        "compress", ["debug=default", "eval_dense=false", "calib.nsamples=4", "eval.max_windows=1"]
    )
    run_compress(cfg, tmp_path)
    plan = build_plan(cfg)
    model, _, _ = load_compressed(tmp_path / "packed")
    arch = get_arch(model, plan.model.arch)
    blocks = get_blocks(model, arch)
    lins = {n: blocks[0].get_submodule(n) for n in arch.linear_names}
    shapes = {n: (m.out_features, m.in_features) for n, m in lins.items()}
    held = sum(
        4 * p.numel()
        for n, p in model.named_parameters()
        if n.rpartition(".")[2] in ("lora_l", "lora_r") and p.dtype == torch.float32
    )
    assert held > 0
    assert adapter_bytes(shapes, plan.spec) * len(blocks) == held
    wanda = build_plan(compose_config("compress", ["method=wanda_absmax"]))
    assert adapter_bytes(shapes, wanda.spec) == 0


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_available_memory_reads_the_process_own_cgroup(tmp_path, version):
    """The budget is the tightest memory cgroup above the process (its own group read from
    /proc/self/cgroup, as a SLURM job's, not the hierarchy's root), less the group's usage
    without its reclaimable page cache, plus what the process already holds (anonymous)."""
    from slim_lightning.app.autostream import available_memory

    proc, root = tmp_path / "proc", tmp_path / "cgroup"
    (proc / "self").mkdir(parents=True)
    (proc / "meminfo").write_text(f"MemTotal: 1 kB\nMemAvailable: {8 * 2**20} kB\n")
    (proc / "self" / "status").write_text(f"VmRSS:\t{GIB // 1024} kB\nRssAnon:\t{GIB // 4096} kB\n")
    files = {
        "v1": ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"),
        "v2": ("memory.max", "memory.current", "inactive_file"),
    }[version]
    top = root / "memory" if version == "v1" else root
    (proc / "self" / "cgroup").write_text(
        "4:memory:/slurm/job1\n0::/\n" if version == "v1" else "0::/slurm/job1\n"
    )

    def group(d, limit, usage, cache):
        d.mkdir(parents=True, exist_ok=True)
        (d / files[0]).write_text(f"{limit}\n")
        (d / files[1]).write_text(f"{usage}\n")
        (d / "memory.stat").write_text(f"cache 1\n{files[2]} {cache}\n")

    unlimited = "max" if version == "v2" else str(2**63 - 4096)
    group(top, unlimited, 5 * GIB, 0)
    group(top / "slurm", 4 * GIB, GIB, 0)  # 3 GiB left
    group(top / "slurm" / "job1", 2 * GIB, 3 * GIB // 2, GIB // 2)  # 1 GiB left
    assert available_memory(proc, root) == GIB + GIB // 4
    group(top / "slurm" / "job1", unlimited, 3 * GIB // 2, 0)  # the parent's limit then
    assert available_memory(proc, root) == 3 * GIB + GIB // 4
    (proc / "self" / "cgroup").unlink()  # nothing known: MemAvailable, roots as mounted
    assert available_memory(proc, root) == 8 * GIB + GIB // 4
