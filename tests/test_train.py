"""train.py: config, setup idempotence, what trains, STE gradients, resume, DDP, wandb files.

Everything runs the tiny random LLaMA (``debug=train``); the end-to-end fine-tune of the embedded
SmolLM2 is marked slow.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

from slim_lightning.errors import ConfigError
from slim_lightning.train.plan import build_train_plan

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
DEBUG = ["debug=train", "logger=none", "engine.progress=false"]


def make_cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def run_cli(args: list[str], run_dir: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("WANDB_API_KEY", None)
    cmd = [sys.executable, str(ROOT / "train.py"), *args, f"hydra.run.dir={run_dir}"]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    return out


def lora_tensors(packed_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    sd = load_file(str(packed_dir / "model.safetensors"))
    return {k: v for k, v in sd.items() if ".lora_" in k or ".adapter_" in k}


def base_tensors(packed_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    sd = load_file(str(packed_dir / "model.safetensors"))
    return {k: v for k, v in sd.items() if ".weight_" in k}


# -- config -----------------------------------------------------------------------------------
def test_peft_flag_composes_only_with_plus():
    assert make_cfg([]).get("peft", False) is False
    cfg = make_cfg(["+peft=true"])
    assert cfg.get("peft") is True
    tp = build_train_plan(cfg)
    assert tp.peft and tp.data is not None and tp.optimizer is not None
    assert not build_train_plan(make_cfg([])).peft
    with pytest.raises(ConfigCompositionException):
        make_cfg(["peft=true"])  # declared nowhere: only `+peft=true` composes


@pytest.mark.parametrize("group", ["optimizer", "trainer", "logger", "data", "callbacks"])
def test_every_training_option_composes(group, tmp_path):
    for opt in sorted(p.stem for p in (CONF / group).glob("*.yaml")):
        over = [f"{group}={opt}", "+peft=true"]
        if group == "data" and opt == "text":
            f = tmp_path / "t.txt"
            f.write_text("hello world " * 50)
            over.append(f"data.path={f}")
        tp = build_train_plan(make_cfg(over))
        assert tp.peft, (group, opt)


@pytest.mark.parametrize(
    "override,key",
    [
        ("optimizer.lr=-1", "optimizer.lr"),
        ("optimizer._target_=torch.optim.NoSuchOpt", "optimizer._target_"),
        ("optimizer.weight_decay=-0.5", "optimizer.weight_decay"),
        ("trainer.strategy=horovod", "trainer.strategy"),
        ("trainer.precision=fp8", "trainer.precision"),
        ("trainer.accumulate_grad_batches=0", "trainer.accumulate_grad_batches"),
        ("data.train_tokens=0", "data.train_tokens"),
        ("train.schedule=exp", "train.schedule"),
        ("+logger.kind=slack", "logger.kind"),
        ("compressed.path=/nonexistent", "compressed.path"),
        ("export.packed=false", "export.packed"),
        ("data.split=eval", "data.split"),
    ],
)
def test_bad_training_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        build_train_plan(make_cfg([*DEBUG, "+peft=true", override]))
    assert e.value.key == key
    assert "allowed" in str(e.value)


def test_peft_without_adapters_fails_at_start():
    with pytest.raises(ConfigError) as e:
        build_train_plan(make_cfg([*DEBUG, "+peft=true", "method=wanda_absmax"]))
    assert e.value.key == "lowrank.method"


def test_optimizer_presets_instantiate_and_step():
    p = torch.nn.Parameter(torch.randn(8, 8))
    for opt in ("adamw", "adafactor", "adamw8bit"):
        factory = build_train_plan(make_cfg([*DEBUG, "+peft=true", f"optimizer={opt}"])).optimizer
        o = factory([p])
        p.grad = torch.randn_like(p)
        o.step()
        assert torch.isfinite(p).all(), opt


def test_lr_schedule_warmup_then_linear_decay():
    from slim_lightning.train.plan import lr_lambda

    f = lr_lambda(warmup=4, total=10, schedule="linear")
    assert [f(s) for s in range(4)] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert f(4) == pytest.approx(1.0) and f(7) == pytest.approx(0.5) and f(10) == 0.0


# -- module -----------------------------------------------------------------------------------
def tiny_module(tmp_path, extra: list[str] = ()):
    from slim_lightning.train.module import SLiMModule
    from slim_lightning.train.plan import build_train_plan

    tp = build_train_plan(make_cfg([*DEBUG, "+peft=true", *extra]))
    return SLiMModule(tp.plan, str(tmp_path), train=tp)


def test_setup_is_idempotent_and_trains_only_adapters(tmp_path):
    from slim_lightning.nn.linear import SLiMLinear

    m = tiny_module(tmp_path)
    for stage in ("validate", "fit", "fit", "validate"):
        m.setup(stage)
    assert m.compress_calls == 1
    assert (tmp_path / "compressed" / "slim.json").is_file()
    lin = [x for x in m.model.modules() if isinstance(x, SLiMLinear) and x.rank]
    assert len(lin) == 14  # the blocks' linears (the 8-bit LM head has no adapters)
    assert all(n.endswith((".lora_l", ".lora_r")) for n in m.trainable_names)
    assert len(m.trainable_names) == 2 * len(lin)
    expect = sum(x.lora_l.numel() + x.lora_r.numel() for x in lin)
    assert m.n_trainable == expect
    assert all(not b.requires_grad for b in m.model.buffers())

    normed = tiny_module(tmp_path / "n", ["train.norms=true"])
    normed.setup("fit")
    extra = [n for n in normed.trainable_names if "lora" not in n]
    assert extra and all("norm" in n for n in extra)
    assert normed.n_trainable == expect + sum(
        p.numel() for n, p in normed.model.named_parameters() if n in extra
    )


def test_ste_gradient_equals_gradient_at_the_quantised_adapters():
    from slim_lightning.core.quant import absmax_quant
    from slim_lightning.core.types import CompressedLinear
    from slim_lightning.nn.linear import SLiMLinear

    g = torch.Generator().manual_seed(0)
    d_out, d_in, r = 16, 32, 4
    w = torch.randn(d_out, d_in, generator=g)
    l_, r_ = torch.randn(d_in, r, generator=g), torch.randn(r, d_out, generator=g)
    lq, rq = absmax_quant(l_.t(), 4, 16), absmax_quant(r_.t(), 4, 4)
    c = CompressedLinear(
        weight=w, lora_l=lq.dequantize().t(), lora_r=rq.dequantize().t(), lora_l_q=lq, lora_r_q=rq
    )
    lin = SLiMLinear.from_compressed(c)
    with torch.no_grad():  # move the parameters off the grid: the STE forward re-quantises them
        lin.lora_l.add_(0.05 * torch.randn(d_in, r, generator=g))
        lin.lora_r.add_(0.05 * torch.randn(r, d_out, generator=g))
    x = torch.randn(5, d_in, generator=g)
    up = torch.randn(5, d_out, generator=g)
    (lin(x) * up).sum().backward()

    lq_val, rq_val = (t.detach().clone().requires_grad_(True) for t in lin.adapters())
    assert not torch.equal(lq_val, lin.lora_l.detach())  # the forward really fake-quantises
    y = x @ lin.dense_weight().T + (x @ lq_val) @ rq_val
    (y * up).sum().backward()
    torch.testing.assert_close(lin.lora_l.grad, lq_val.grad)
    torch.testing.assert_close(lin.lora_r.grad, rq_val.grad)


# -- runs -------------------------------------------------------------------------------------
def test_resume_from_checkpoint_matches_an_uninterrupted_run(tmp_path):
    """4 steps straight == 2 steps + resume to 4 (epochs of 2 steps: resume at an epoch end)."""
    from slim_lightning.app.train_run import run_train

    text = tmp_path / "train.txt"
    text.write_text(("The quick brown fox jumps over the lazy dog. " * 3)[:100])  # 3 blocks
    common = [
        *DEBUG,
        "+peft=true",
        "data=text",
        f"data.path={text}",
        "data.seqlen=32",
        "data.val_blocks=1",
        "eval.max_windows=2",
        "train.eval_before=false",
        "train.val_every_n_steps=0",
        "callbacks.model_checkpoint.every_n_train_steps=2",
    ]
    a = tmp_path / "a"
    rep = run_train(make_cfg([*common, "trainer.max_steps=4"]), a)
    assert rep["train"]["steps"] == 4 and rep["train"]["train_blocks"] == 2
    packed = a / "compressed"
    b = tmp_path / "b"
    run_train(make_cfg([*common, "trainer.max_steps=2", f"compressed.path={packed}"]), b)
    ckpt = b / "checkpoints" / "step000002.ckpt"
    sd = torch.load(ckpt, weights_only=False)
    assert sd["state_dict"] and all(".lora_" in k for k in sd["state_dict"])  # adapters only
    assert sd["optimizer_states"]
    c = tmp_path / "c"
    run_train(
        make_cfg(
            [*common, "trainer.max_steps=4", f"compressed.path={packed}", f"ckpt_path={ckpt}"]
        ),
        c,
    )
    ta, tc = lora_tensors(a / "packed"), lora_tensors(c / "packed")
    assert ta.keys() == tc.keys()
    for k in ta:
        torch.testing.assert_close(ta[k], tc[k], rtol=0, atol=1e-6, msg=k)
    # the compressed base is untouched by fine-tuning; the adapters moved
    for k, v in base_tensors(packed).items():
        assert torch.equal(v, base_tensors(a / "packed")[k]), k
    assert any(not torch.equal(v, lora_tensors(packed)[k]) for k, v in ta.items())


def test_cli_peft_debug_writes_report_checkpoint_and_wandb_offline(tmp_path):
    run = tmp_path / "run"
    run_cli(["debug=train", "+peft=true", "engine.progress=false"], run)
    rep = json.loads((run / "report.json").read_text())
    assert rep["peft"] is True and rep["train"]["steps"] == 8
    assert set(rep["ppl_before"]) == set(rep["ppl_after"]) == {"embedded"}
    assert rep["trainable_params"] > 0
    from slim_lightning.checkpoint import load_compressed

    model, tok, meta = load_compressed(run / "packed")
    assert meta["results"]["ppl_after"] == rep["ppl_after"]
    files = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1
    blob = files[0].read_bytes()
    for key in (
        "train/loss",
        "val/loss",
        "val/ppl",
        "eval/ppl",
        "train/lr",
        "train/tokens_per_s",
        "train/trainable_params",
        "compress/sparsity",
        "eval/ppl_before/embedded",
        "eval/ppl_after/embedded",
        "method_name",  # the resolved config
    ):
        assert key.encode() in blob, key


def test_two_process_ddp_on_cpu_keeps_ranks_identical(tmp_path):
    run = tmp_path / "ddp"
    run_cli(
        [
            "debug=train",
            "+peft=true",
            "trainer=ddp",
            "trainer.accelerator=cpu",
            "trainer.devices=2",
            "train.rank_hashes=true",
            "logger=csv",
            "engine.progress=false",
        ],
        run,
    )
    h = {p.stem: json.loads(p.read_text()) for p in sorted((run / "rank_hashes").glob("*.json"))}
    assert set(h) == {"setup_rank0", "setup_rank1", "fit_end_rank0", "fit_end_rank1"}
    # rank 1 loaded rank 0's packed checkpoint: the same compressed weights and adapters
    assert h["setup_rank0"]["base"] == h["setup_rank1"]["base"]
    assert h["setup_rank0"]["adapters"] == h["setup_rank1"]["adapters"]
    # after the steps: adapters still in sync, trained, and the base untouched
    assert h["fit_end_rank0"]["adapters"] == h["fit_end_rank1"]["adapters"]
    assert h["fit_end_rank0"]["adapters"] != h["setup_rank0"]["adapters"]
    assert h["fit_end_rank0"]["base"] == h["setup_rank0"]["base"]
    rep = json.loads((run / "report.json").read_text())
    assert rep["world_size"] == 2 and rep["train"]["tokens_per_step"] == 64
    assert (run / "csv" / "metrics.csv").is_file()


# -- end to end (slow) --------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_peft_lowers_heldout_perplexity(tmp_path):
    """SmolLM2-135M slim_q 2:4, 100 steps of 512 tokens on the calibration-side text."""
    run = tmp_path / "smol"
    run_cli(
        [
            "+peft=true",
            "logger=csv",
            "engine.progress=false",
            "trainer.enable_progress_bar=false",
            "data.train_tokens=51200",
            "eval.max_windows=40",
            "optimizer.lr=2e-4",
        ],
        run,
        timeout=3600,
    )
    rep = json.loads((run / "report.json").read_text())
    before, after = rep["ppl_before"]["embedded"], rep["ppl_after"]["embedded"]
    assert after < 0.97 * before, (before, after)
