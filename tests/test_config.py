"""Every option of every config group composes and validates; bad values fail with key and value."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from slim_lightning.compress.plan import build_plan, spec_from_cfg
from slim_lightning.errors import ConfigError

CONF = Path(__file__).resolve().parents[1] / "conf"
GROUPS = [
    "model",
    "calib",
    "eval",
    "quant",
    "sparsity",
    "pruner",
    "lowrank",
    "export",
    "method",
    "experiment",
    "debug",
]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def make_cfg(overrides: list[str], name: str = "compress"):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


def test_option_names_never_parse_as_numbers_or_booleans():
    for g in GROUPS:
        for opt in options(g):
            assert opt.lower() not in ("true", "false", "null", "yes", "no", "on", "off", "~"), (
                g,
                opt,
            )
            with pytest.raises(ValueError):
                float(opt)
            # what Hydra's override grammar would make of `group=option`
            assert isinstance(OmegaConf.create(f"x: {opt}").x, str), (g, opt)


@pytest.mark.parametrize(
    "group,option", [(g, o) for g in GROUPS for o in options(g)], ids=lambda v: str(v)
)
def test_every_option_composes_and_validates(group, option, tmp_path):
    overrides = [f"{group}={option}"]
    if group in ("calib", "eval") and option == "text":
        f = tmp_path / "t.txt"
        f.write_text("hello world " * 50)
        overrides.append(f"{group}.path={f}")
    if group == "experiment" and "llama2" in option:
        overrides.append("device=auto")
    if group == "quant" and option != "absmax":
        # the default pruner runs OPTQ on an AbsMax grid; other quantisers pair with Wanda
        overrides.append("pruner=wanda")
    cfg = make_cfg(overrides)
    spec = spec_from_cfg(cfg)
    assert spec is not None
    if group in ("model", "calib", "eval", "experiment") and option not in ("llama2_13b_slim_q",):
        plan = build_plan(cfg)
        assert plan.model is not None


def test_default_is_slim_q_2of4_on_embedded_model():
    cfg = make_cfg([])
    plan = build_plan(cfg)
    assert plan.method_name == "slim_q"
    assert plan.spec.sparsity.pattern == "nm" and (plan.spec.sparsity.n, plan.spec.sparsity.m) == (
        2,
        4,
    )
    # measured default (README, quality benchmark): SLiM-LoRA on a SparseGPT + joint OPTQ base,
    # 4-bit adapters quantised in the activation-scaled domain, quantised before the re-fit
    assert plan.spec.pruner.method == "sparsegpt" and plan.spec.pruner.joint_quant
    assert plan.spec.quant.method == "absmax" and plan.spec.lowrank.method == "slim"
    assert plan.spec.lowrank.quant_bits == 4
    assert plan.spec.lowrank.quant_in_scale and plan.spec.lowrank.quant_before_refit


def test_faithful_slim_preset_is_the_papers_pipeline():
    spec = build_plan(make_cfg(["method=slim"])).spec
    assert (spec.pruner.method, spec.quant.method) == ("wanda", "slim_quant")
    assert spec.lowrank.quant_bits is None and not spec.lowrank.quant_in_scale


def test_other_quantiser_with_optq_pruner_is_a_clear_error():
    with pytest.raises(ConfigError) as e:
        build_plan(make_cfg(["quant=slim_quant"]))
    assert e.value.key == "quant.method" and "absmax" in str(e.value)


def test_command_line_group_beats_method_preset():
    cfg = make_cfg(["method=slim_q", "quant=absmax"])
    assert spec_from_cfg(cfg).quant.method == "absmax"


@pytest.mark.parametrize(
    "override,key",
    [
        ("lowrank.rank_ratio=1.5", "lowrank.rank_ratio"),
        ("quant.bits=9", "quant.bits"),
        ("sparsity.n=4", "sparsity.n"),
        ("lowrank.svd=fast", "lowrank.svd"),
        ("quant.error_model=exactish", "quant.error_model"),
        ("engine.batch_size=0", "engine.batch_size"),
        ("device=tpu", "device"),
        ("pruner=wanda pruner.joint_quant=true", "pruner.joint_quant"),
        ("lowrank.quant_in_scale=maybe", "lowrank.quant_in_scale"),
        ("lowrank.alternate=-1", "lowrank.alternate"),
    ],
)
def test_bad_values_name_key_value_and_allowed(override, key):
    cfg = make_cfg(override.split())
    with pytest.raises(ConfigError) as e:
        build_plan(cfg)
    assert e.value.key == key
    assert str(override.split()[-1].split("=")[1]).lower() in str(e.value).lower()
    assert "allowed" in str(e.value)


def test_unknown_sparsity_option_is_rejected_with_the_choices():
    with pytest.raises(ConfigCompositionException) as e:
        make_cfg(["sparsity=3of4"])
    msg = str(e.value)
    assert "3of4" in msg and "2of4" in msg


def test_missing_model_path_fails_at_start(tmp_path):
    cfg = make_cfg([f"model.path={tmp_path / 'nope'}"])
    with pytest.raises(ConfigError) as e:
        build_plan(cfg)
    assert e.value.key == "model.path"


@pytest.mark.parametrize("bad", [0, -1, "two", 1.5, True])
def test_solver_threads_bad_values_name_the_key(compose_cfg, bad):
    from slim_lightning.compress.plan import build_plan

    cfg = compose_cfg("compress", ["debug=default", f"engine.solver_threads={bad}"])
    with pytest.raises(ConfigError, match="engine.solver_threads"):
        build_plan(cfg)


def test_solvers_run_with_the_configured_threads(compose_cfg, tmp_path, monkeypatch):
    """engine.solver_threads=auto runs every per-linear solve with 1 thread on CPU and gives
    the others back afterwards; null (the default) leaves torch's setting."""
    import torch

    import slim_lightning.core.compress as core
    from slim_lightning.app.compress_run import run_compress

    seen = []
    real = core.compress_linear_rows

    def spy(*a, **k):
        seen.append(torch.get_num_threads())
        return real(*a, **k)

    monkeypatch.setattr(core, "compress_linear_rows", spy)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        run_compress(
            compose_cfg("compress", ["debug=default", "engine.solver_threads=auto"]), tmp_path / "a"
        )
        assert seen and set(seen) == {1}
        assert torch.get_num_threads() == 2
        seen.clear()
        run_compress(compose_cfg("compress", ["debug=default"]), tmp_path / "b")
        assert seen and set(seen) == {2}
    finally:
        torch.set_num_threads(before)
