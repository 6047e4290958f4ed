"""Faults and hostile inputs: every case refuses clearly (naming the key or file) or ends
byte-identical to an uninterrupted run; nothing half-written, stale or silently different remains.

Kills are real SIGKILLs at the write boundaries ``slim_lightning.io.fault_point`` marks (the
``SLIM_FAULT`` hook), delivered in a forked child so each run costs ~1 s instead of an
interpreter start. The boundaries are not listed by hand: an uninterrupted run records every
label it reaches (``SLIM_FAULT_TRACE``) and the tests kill at each of them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch
from conftest import ROOT, compose_config

from slim_lightning import load_compressed
from slim_lightning.app.compress_run import run_compress
from slim_lightning.app.rundir import RunDirBusy, acquire
from slim_lightning.compress.plan import build_plan
from slim_lightning.errors import CheckpointError, ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")

BASE = ["debug=default", "eval_dense=false", "+model.tiny.num_hidden_layers=3"]


def cfg_of(*overrides: str):
    return compose_config("compress", [*BASE, *overrides])


def forked(fn, env: dict[str, str] | None = None) -> int:
    """Runs ``fn()`` in a forked child with ``env`` set; returns its exit code (-9: killed)."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # child
        code = 0
        try:
            os.environ.update(env or {})
            torch.set_num_threads(1)
            fn()
        except BaseException:  # noqa: BLE001
            traceback.print_exc()
            code = 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def leftovers(run_dir: Path) -> list[str]:
    """Temp files/dirs a writer left anywhere under the run dir."""
    out = []
    for p in run_dir.rglob(".*"):
        if p.name in (".lock", ".hydra"):
            continue
        out.append(str(p.relative_to(run_dir)))
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run, with the list of write boundaries it crossed."""
    run_dir = tmp_path_factory.mktemp("ref") / "run"  # same dir name as the kill runs' dirs
    trace = run_dir.parent / "trace.txt"
    cfg = cfg_of()
    code = forked(lambda: run_compress(cfg, run_dir), {"SLIM_FAULT_TRACE": str(trace)})
    assert code == 0
    labels = trace.read_text().splitlines()
    return run_dir, sha(run_dir / "packed" / "model.safetensors"), labels


def _boundaries(labels: list[str], every: bool) -> list[tuple[str, int]]:
    """(label, occurrence) pairs to kill at.

    Every boundary with ``every``; by default the first commit (rename) of each kind of file
    (block files, inputs, progress record, packed dir, report, plot), so the default suite
    stays fast while the slow test covers all of them.
    """
    seen: dict[str, int] = {}
    kinds: set[str] = set()
    out = []
    for lab in labels:
        seen[lab] = seen.get(lab, 0) + 1
        if "tokens/" in lab or "digests.json" in lab:
            continue  # shared caches outside the run dir (tested separately)
        kind = re.sub(r"\d+", "N", lab)
        if every or (lab.startswith("rename ") and kind not in kinds):
            kinds.add(kind)
            out.append((lab, seen[lab]))
    return out


def _kill_and_rerun(tmp_path, reference, label: str, nth: int) -> None:
    ref_dir, ref_sha, _ = reference
    run_dir = tmp_path / "run"
    cfg = cfg_of()
    code = forked(lambda: run_compress(cfg, run_dir), {"SLIM_FAULT": f"kill:{label}:{nth}"})
    assert code == -9, f"the fault point {label!r} #{nth} was not reached"
    report = run_dir / "report.json"
    if report.exists():  # a killed run never claims success
        assert json.loads(report.read_text())["status"] != "done" or "report.json" in label
    assert forked(lambda: run_compress(cfg, run_dir)) == 0
    assert sha(run_dir / "packed" / "model.safetensors") == ref_sha, label
    assert json.loads(report.read_text())["status"] == "done"
    assert leftovers(run_dir) == [], label


def test_trace_covers_the_engine_and_the_final_save(reference):
    _, _, labels = reference
    for want in (
        "rename calib_state/progress.json",
        "rename calib_state/block_0001.safetensors",
        "rename calib_state/inputs_0002.safetensors",
        "rename run/packed/",
        "write packed/model.safetensors",
        "rename run/report.json",
    ):
        assert want in labels, (want, labels)


def test_kill_at_every_commit_point_then_rerun_is_byte_identical(tmp_path, reference):
    points = _boundaries(reference[2], every=False)
    assert len(points) >= 6, points
    for i, (label, nth) in enumerate(points):
        _kill_and_rerun(tmp_path / str(i), reference, label, nth)


@pytest.mark.slow
def test_kill_at_every_write_boundary_then_rerun_is_byte_identical(tmp_path, reference):
    for i, (label, nth) in enumerate(_boundaries(reference[2], every=True)):
        _kill_and_rerun(tmp_path / str(i), reference, label, nth)


def test_kill_between_inputs_and_progress_commit_is_not_reused(tmp_path, reference):
    # the issue's reproduction: die when block 1's progress record is about to be written, i.e.
    # after the next block's inputs are on disk; the re-run must recompute block 1 from its
    # own inputs, not from its outputs
    _kill_and_rerun(tmp_path, reference, "rename calib_state/progress.json", 2)


def test_enospc_fails_cleanly_and_rerun_is_identical(tmp_path, reference):
    run_dir = tmp_path / "run"
    cfg = cfg_of()
    code = forked(
        lambda: run_compress(cfg, run_dir),
        {"SLIM_FAULT": "enospc:write calib_state/block_0001.safetensors"},
    )
    assert code == 1
    rep = json.loads((run_dir / "report.json").read_text())
    assert rep["status"] == "failed" and "No space left" in rep["error"]
    assert leftovers(run_dir) == []
    assert forked(lambda: run_compress(cfg, run_dir)) == 0
    assert sha(run_dir / "packed" / "model.safetensors") == reference[1]


def test_corrupt_resume_state_is_discarded_loudly(tmp_path, reference):
    run_dir = tmp_path / "run"
    cfg = cfg_of()
    forked(lambda: run_compress(cfg, run_dir), {"SLIM_FAULT": "kill:rename run/report.json:2"})
    state = run_dir / "calib_state" / "block_0001.safetensors"
    data = bytearray(state.read_bytes())
    data[-3] ^= 0xFF
    state.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="corrupt"):
        report = run_compress(cfg, run_dir)
    assert report["resume"]["resumed_blocks"] == 0
    assert "block_0001.safetensors" in report["resume"]["discarded_state"]
    assert sha(run_dir / "packed" / "model.safetensors") == reference[1]


@pytest.mark.parametrize(
    "change",
    [
        "model.tiny.seed=1",  # other weights at the same model path
        "engine.batch_size=3",  # other batching of the statistics
        "calib.seed=5",  # other calibration windows
        "lowrank.rank_ratio=0.25",  # other method options
    ],
)
def test_changed_inputs_never_reuse_resume_state(tmp_path, reference, change):
    ref_dir = reference[0]
    run_dir = tmp_path / "run"
    # start from a copy of the reference's finished resume state
    shutil.copytree(ref_dir / "calib_state", run_dir / "calib_state")
    with pytest.warns(UserWarning, match="different run"):
        changed = run_compress(cfg_of(change), run_dir)
    assert changed["resume"]["resumed_blocks"] == 0
    fresh = run_compress(cfg_of(change), tmp_path / "fresh")
    assert sha(run_dir / "packed" / "model.safetensors") == sha(
        tmp_path / "fresh" / "packed" / "model.safetensors"
    )
    assert fresh["resume"]["resumed_blocks"] == 0


def test_second_run_into_a_busy_dir_fails_at_once(tmp_path):
    run_dir = tmp_path / "run"
    fd = acquire(run_dir)  # another live run holds the directory
    try:
        (run_dir / "report.json").write_text('{"status": "running", "owner": "first"}')
        t0 = time.perf_counter()
        with pytest.raises(RunDirBusy, match="hydra.run.dir.*in use by another run"):
            run_compress(cfg_of(), run_dir)
        assert time.perf_counter() - t0 < 5
        assert json.loads((run_dir / "report.json").read_text())["owner"] == "first"
    finally:
        os.close(fd)
    # the lock dies with its holder: a killed run never blocks the next one
    assert forked(lambda: acquire(run_dir) and os.kill(os.getpid(), 9)) == -9
    assert run_compress(cfg_of(), run_dir)["status"] == "done"


def test_failed_rerun_leaves_no_success_report_and_no_stale_outputs(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    run_compress(cfg_of(), run_dir)
    assert (run_dir / "packed").is_dir()
    (run_dir / ".packed.leftover").mkdir()  # a killed save's temp dir
    (run_dir / ".report.json.x.tmp").write_text("half")

    def boom(*a, **k):
        raise RuntimeError("injected failure")

    monkeypatch.setattr("slim_lightning.compress.pipeline.compress_model", boom)
    with pytest.raises(RuntimeError, match="injected"):
        run_compress(cfg_of("lowrank.rank_ratio=0.25"), run_dir)
    rep = json.loads((run_dir / "report.json").read_text())
    assert rep["status"] == "failed" and "injected" in rep["error"]
    assert not (run_dir / "packed").exists()  # the previous run's checkpoint is not passed off
    assert leftovers(run_dir) == []


def test_planted_symlinks_are_not_followed_and_outputs_respect_umask(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    for name in ("report.json.tmp", ".report.json.tmp", "layers.png"):
        (run_dir / name).symlink_to(victim)
    (run_dir / "calib_state").mkdir()
    (run_dir / "calib_state" / "progress.json.tmp").symlink_to(victim)
    run_compress(cfg_of(), run_dir)
    assert victim.read_text() == "keep me"
    umask = os.umask(0)
    os.umask(umask)
    for f in (run_dir / "packed" / "model.safetensors", run_dir / "report.json"):
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f
    assert (run_dir / "packed").stat().st_mode & 0o777 == 0o777 & ~umask


# -- hostile inputs: refused before any weights load ---------------------------------------------
@pytest.fixture
def no_weights(monkeypatch):
    """Fails the test if model weights are loaded or anything is compressed."""

    def refuse(*a, **k):
        raise AssertionError("weights were loaded before the bad input was refused")

    monkeypatch.setattr("slim_lightning.models.load.load_model", refuse)
    monkeypatch.setattr("slim_lightning.compress.pipeline.compress_model", refuse)


@pytest.mark.parametrize(
    "content, problem",
    [
        (b"", "empty"),
        (b"\x00\x00\x00\x00", "NUL"),
        (b"caf\xe9 na\xefve " * 50, "not valid UTF-8"),
        (b"   \n\n\t  \n", "only whitespace"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "NUL"),
    ],
)
@pytest.mark.parametrize("group", ["calib", "eval"])
def test_bad_text_files_are_refused_at_config_time(tmp_path, content, problem, group):
    f = tmp_path / "bad.txt"
    f.write_bytes(content)
    with pytest.raises(ConfigError, match=rf"{group}\.path.*bad\.txt.*{problem}"):
        build_plan(cfg_of(f"{group}=text", f"{group}.path={f}"))


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["calib.seqlen=2000"], "calib.seqlen"),  # more tokens than the text has
        (["eval.seqlen=2000"], "eval.seqlen"),  # not even one window
        (["calib.seqlen=4096"], "calib.seqlen"),  # past max_position_embeddings
        (["method=slim", "sparsity.m=5", "sparsity.n=2"], "sparsity.m"),  # 64 % 5 != 0
        (
            [
                "sparsity=4of8",
                "+model.tiny.hidden_size=36",
                "+model.tiny.num_attention_heads=3",
                "+model.tiny.num_key_value_heads=1",
            ],
            "sparsity.m",
        ),
    ],
)
def test_impossible_sizes_are_refused_before_weights_load(tmp_path, no_weights, overrides, key):
    short = tmp_path / "short.txt"
    short.write_text("A short text. " * 100)
    extra = ["calib=text", f"calib.path={short}", "eval=text", f"eval.path={short}"]
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as e:
        run_compress(cfg_of(*extra, *overrides), tmp_path / "run")
    assert time.perf_counter() - t0 < 10
    if "seqlen" in key and "4096" not in overrides[0]:  # names the too-short file
        assert "short.txt" in str(e.value)
    assert json.loads((tmp_path / "run" / "report.json").read_text())["status"] == "failed"


def test_eval_seqlen_one_is_a_config_error():
    with pytest.raises(ConfigError, match=r"eval\.seqlen"):
        build_plan(cfg_of("eval.seqlen=1"))


def _hf_dir(tmp_path: Path, **tiny) -> Path:
    from slim_lightning.models.tiny import tiny_model

    model, tok = tiny_model("llama", **tiny)
    d = tmp_path / "hf"
    model.save_pretrained(d, safe_serialization=True)
    tok.save_pretrained(d)
    return d


def test_model_dir_without_config_json_names_model_path(tmp_path, no_weights):
    d = _hf_dir(tmp_path)
    (d / "config.json").unlink()
    with pytest.raises(ConfigError, match=r"model\.path.*config\.json"):
        run_compress(cfg_of(f"+model.path={d}", "model.random_init=false"), tmp_path / "run")


def test_unsupported_architecture_names_model_path(tmp_path, no_weights):
    d = _hf_dir(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"model\.path.*blocks the engine understands.*Conv1D"):
        run_compress(cfg_of(f"+model.path={d}", "model.random_init=false"), tmp_path / "run")


def test_unreachable_hub_id_fails_fast_naming_model_path(tmp_path, no_weights, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", "http://127.0.0.1:9")
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=r"model\.path.*some-org/some-model.*cannot be reached"):
        run_compress(
            cfg_of("+model.path=some-org/some-model", "model.random_init=false"), tmp_path / "r"
        )
    assert time.perf_counter() - t0 < 15


def test_nan_weights_are_refused_naming_the_tensor(tmp_path):
    from safetensors.torch import load_file, save_file

    d = _hf_dir(tmp_path)
    sd = load_file(d / "model.safetensors")
    sd["model.layers.1.mlp.up_proj.weight"][3, 4] = float("nan")
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*NaN"):
        run_compress(cfg_of(f"+model.path={d}", "model.random_init=false"), tmp_path / "run")


def test_truncated_token_cache_heals(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIM_LIGHTNING_CACHE", str(tmp_path / "cache"))
    first = run_compress(cfg_of(), tmp_path / "a")
    for f in (tmp_path / "cache" / "tokens").glob("*.safetensors"):
        f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])
    with pytest.warns(UserWarning, match="damaged"):
        again = run_compress(cfg_of(), tmp_path / "b")
    assert again["ppl"] == first["ppl"]
    assert sha(tmp_path / "a" / "packed" / "model.safetensors") == sha(
        tmp_path / "b" / "packed" / "model.safetensors"
    )


# -- verified checkpoints -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def packed(reference):
    return reference[0] / "packed"


def _copy(packed: Path, tmp_path: Path) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    dst = tmp_path / "packed"
    subprocess.run(["cp", "-r", str(packed), str(dst)], check=True)
    return dst


def test_flipped_byte_is_refused_naming_the_file(tmp_path, packed):
    d = _copy(packed, tmp_path)
    data = bytearray((d / "model.safetensors").read_bytes())
    data[len(data) - 1000] ^= 0x10
    (d / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*sha256"):
        load_compressed(d)


def test_inf_scale_is_refused_even_unverified(tmp_path, packed):
    from safetensors.torch import load_file, save_file

    d = _copy(packed, tmp_path)
    sd = load_file(d / "model.safetensors")
    key = next(k for k in sd if k.endswith("weight_scale"))
    sd[key].view(torch.float16)[0, 0] = float("inf")
    save_file(sd, d / "model.safetensors", metadata={"format": "slim-lightning"})
    with pytest.raises(CheckpointError, match=r"sha256"):
        load_compressed(d)
    with pytest.raises(CheckpointError, match=rf"{key.rsplit('.', 1)[0]}.*scale.*NaN/Inf"):
        load_compressed(d, verify=False)


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda m: "{not json", r"slim\.json.*unreadable"),
        (lambda m: {**m, "layers": []}, r"slim\.json.*layers"),
        (lambda m: _set_layer(m, "n", 3), r"slim\.json.*layer .*nnz"),
        (lambda m: _set_layer(m, "m", 8), r"slim\.json.*layer .*"),
        (lambda m: _set_layer(m, "shape", [7, 64]), r"slim\.json.*layer .*"),
    ],
)
def test_tampered_metadata_is_refused_naming_the_file(tmp_path, packed, edit, match):
    d = _copy(packed, tmp_path)
    meta = json.loads((d / "slim.json").read_text())
    new = edit(meta)
    (d / "slim.json").write_text(new if isinstance(new, str) else json.dumps(new))
    if isinstance(new, dict) and isinstance(new.get("layers"), dict):
        # the same edit in config.json too, so the layer checks (not the cross-check of the two
        # files, which refuses a one-sided edit) are what must find it
        cfg = json.loads((d / "config.json").read_text())
        cfg["quantization_config"]["layers"] = new["layers"]
        (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=match):
        load_compressed(d, verify=False)


def _set_layer(meta: dict, key: str, value) -> dict:
    name = next(iter(meta["layers"]))
    meta["layers"][name]["weight"][key] = value
    return meta


def test_tampered_config_is_refused(tmp_path, packed):
    d = _copy(packed, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_hidden_layers"] = 2
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config\.json.*sha256"):
        load_compressed(d)
    with pytest.raises(CheckpointError, match=r"slim\.json: layer model\.layers\.2"):
        load_compressed(d, verify=False)


def test_missing_file_and_auto_map_never_prompt(tmp_path, packed):
    d = _copy(packed, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "evil.Model", "AutoConfig": "evil.Config"}
    (d / "config.json").write_text(json.dumps(cfg))
    # no terminal prompt, no remote code: either a clean load (auto_map ignored) or an error
    code = (
        "import sys, slim_lightning\n"
        f"m, t, meta = slim_lightning.load_compressed({str(d)!r}, verify=False)\n"
        "print('loaded', type(m).__name__)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], input="y\n", capture_output=True, text=True, timeout=120
    )
    assert "evil" not in out.stdout
    assert out.returncode == 0 and "LlamaForCausalLM" in out.stdout, out.stderr[-1500:]
    d2 = _copy(packed, tmp_path / "fresh")
    (d2 / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match=r"tokenizer\.json.*missing"):
        load_compressed(d2)


def test_gpu_marker_without_cuda_fails_loudly():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: -m gpu runs for real")
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-m", "gpu", "tests/test_kernels.py", "-q"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode != 0
    assert "no CUDA device" in out.stdout + out.stderr


# -- train.py: checkpoints are tied to their base --------------------------------------------------
def train_cfg(*overrides: str):
    return compose_config(
        "train",
        [
            "debug=train",
            "+peft=true",
            "logger=none",
            "eval.max_windows=2",
            "train.eval_before=false",
            "train.val_every_n_steps=0",
            "trainer.max_steps=2",
            "callbacks.model_checkpoint.every_n_train_steps=2",
            *overrides,
        ],
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from slim_lightning.app.train_run import run_train

    run_dir = tmp_path_factory.mktemp("trained")
    run_train(train_cfg(), run_dir)
    ckpt = next((run_dir / "checkpoints").glob("*.ckpt"))
    return run_dir, ckpt


def test_garbage_ckpt_path_is_refused_before_weights_load(tmp_path, no_weights):
    from slim_lightning.app.train_run import run_train

    bad = tmp_path / "last.ckpt"
    bad.write_bytes(b"PK\x03\x04 not really a checkpoint")
    with pytest.raises(ConfigError, match=r"ckpt_path.*last\.ckpt"):
        run_train(train_cfg(f"ckpt_path={bad}"), tmp_path / "run")


def test_ckpt_of_another_base_is_refused(tmp_path, trained, reference, monkeypatch):
    from slim_lightning.app.train_run import run_train

    _, ckpt = trained
    # against a compressed checkpoint of another base: refused in preflight
    with pytest.raises(ConfigError, match=r"ckpt_path.*trained on another"):
        run_train(
            train_cfg(f"ckpt_path={ckpt}", f"compressed.path={reference[0] / 'packed'}"),
            tmp_path / "a",
        )

    # compressing another base (other weights, same adapter shapes): refused before compressing
    def refuse(*a, **k):
        raise AssertionError("compressed although the checkpoint cannot be resumed")

    monkeypatch.setattr("slim_lightning.compress.pipeline.compress_model", refuse)
    with pytest.raises(ConfigError, match=r"ckpt_path.*fingerprint"):
        run_train(train_cfg(f"ckpt_path={ckpt}", "model.tiny.seed=7"), tmp_path / "b")


def test_ckpt_resume_on_its_own_base_is_accepted(tmp_path, trained):
    from slim_lightning.app.train_run import run_train

    run_dir, ckpt = trained
    rep = run_train(
        train_cfg(
            f"ckpt_path={ckpt}", f"compressed.path={run_dir / 'packed'}", "trainer.max_steps=3"
        ),
        tmp_path / "c",
    )
    assert rep["status"] == "done" and rep["train"]["steps"] == 3


def test_training_text_too_short_is_refused_before_weights_load(tmp_path, no_weights):
    from slim_lightning.app.train_run import run_train

    text = tmp_path / "train.txt"
    text.write_text("Too short to train on. " * 3)
    with pytest.raises(ConfigError, match=r"data\.seqlen.*train\.txt"):
        run_train(train_cfg("data=text", f"data.path={text}", "data.seqlen=64"), tmp_path / "r")
