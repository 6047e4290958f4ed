"""SIGTERM / SIGINT during a run: ``status: interrupted`` with the stage and the last finished
block or step, on every rank; the lock released; the next run resumes (``app.signals``).

The runs are real processes signalled from outside, as torchrun, SLURM or a user would; each
test waits for an observable condition (a saved block, a checkpoint, a log line), never a sleep.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from slim_lightning.app.signals import Interrupted, SignalGuard

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def _wait_for(cond, proc: subprocess.Popen, what: str, timeout: float = 240.0) -> None:
    t0 = time.monotonic()
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (rc {proc.returncode}) before {what}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)  # polling an observable condition, not a synchronisation by sleep


def _report(run: Path, name: str = "report.json") -> dict:
    return json.loads((run / name).read_text())


def test_guard_turns_sigterm_into_interrupted_and_records_once():
    seen = []
    guard = SignalGuard(seen.append)
    with pytest.raises(Interrupted) as err:
        with guard:
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                for _ in range(1000):  # the handler runs at the next bytecode boundary
                    time.sleep(0.001)
            except Interrupted as e:
                guard.record_once("SIGTERM")
                raise e
    assert err.value.signum == signal.SIGTERM
    assert seen == ["SIGTERM"]  # the watcher thread and the main thread record once
    assert signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None) or callable(
        signal.getsignal(signal.SIGTERM)
    )
    assert signal.getsignal(signal.SIGTERM) != guard._handler  # restored


def test_guard_is_inert_outside_the_main_thread():
    out = {}

    def body():
        with SignalGuard(lambda _n: None) as g:
            out["installed"] = g._wakeup is not None

    t = threading.Thread(target=body)
    t.start()
    t.join()
    assert out == {"installed": False}


COMPRESS = [
    sys.executable,
    "compress.py",
    "debug=default",
    "method=slim_q",
    "+model.tiny.num_hidden_layers=12",
    "eval_dense=false",
]


def test_sigterm_during_compression_is_recorded_and_the_rerun_resumes(tmp_path):
    run = tmp_path / "run"
    cmd = [*COMPRESS, f"hydra.run.dir={run}"]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    state = run / "calib_state"
    _wait_for(lambda: (state / "block_0001.json").is_file(), proc, "two saved blocks")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    rep = _report(run)
    assert rep["status"] == "interrupted" and rep["signal"] == "SIGTERM", rep
    assert rep["stage"] == "compress_setup" and rep["last_block"] >= 1, rep
    assert rep["blocks"] == 12 and "resume" in rep
    from slim_lightning.app.rundir import acquire

    os.close(acquire(run))  # the lock was released
    again = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    done = _report(run)
    assert done["status"] == "done" and done["resumed_blocks"] >= rep["last_block"] + 1
    assert done["previous"]["status"] == "interrupted"


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(d.name))
            except (OSError, ValueError, IndexError):
                continue
    return out


def _rank_of(pid: int) -> int | None:
    try:
        env = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for kv in env:
        if kv.startswith(b"RANK="):
            return int(kv[5:])
    return None


@pytest.mark.parametrize("how", ["sigterm_to_torchrun", "sigkill_rank_1"])
def test_torchrun_runs_record_their_end_on_every_rank(how, tmp_path):
    """SIGTERM to torchrun (what SLURM does before preemption): every rank records
    ``interrupted`` (rank zero in report.json, rank 1 in report.rank1.json). One rank killed:
    rank zero records how it ended, with its stage, instead of staying at ``running``. The
    lock is free afterwards."""
    run = tmp_path / "run"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    proc = subprocess.Popen(
        [*torchrun, *COMPRESS[1:], f"hydra.run.dir={run}"],
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    _wait_for(lambda: any("block 1 reconstructed" in ln for ln in lines), proc, "block 1")
    ranks = {_rank_of(p): p for p in _children(proc.pid)}
    assert 1 in ranks, (ranks, lines[-20:])
    if how == "sigterm_to_torchrun":
        proc.send_signal(signal.SIGTERM)
    else:
        os.kill(ranks[1], signal.SIGKILL)
    proc.wait(timeout=180)
    reader.join(timeout=10)
    assert proc.returncode != 0
    rep = _report(run)
    if how == "sigterm_to_torchrun":
        other = _report(run, "report.rank1.json")
        for r, rec in ((0, rep), (1, other)):
            assert rec["status"] == "interrupted" and rec["signal"] == "SIGTERM", rec
            assert rec["rank"] == r and rec["stage"] == "compress_setup"
    # torchrun's SIGTERM (interrupted) or the dead peer's closed connection (failed, with the
    # error) reaches rank zero first: either way the record names the stage, never "running"
    assert rep["status"] in ("interrupted", "failed"), (rep, lines[-30:])
    if rep["status"] == "interrupted":
        assert rep["signal"] == "SIGTERM" and rep["rank"] == 0
    else:
        assert "closed" in rep["error"] or "error" in rep["error"].lower()
    assert rep["stage"] == "compress_setup" and rep["last_block"] >= 0
    from slim_lightning.app.rundir import acquire

    os.close(acquire(run))


def test_sigterm_during_training_is_recorded_and_the_rerun_continues_from_the_checkpoint(
    tmp_path,
):
    run = tmp_path / "run"
    base = [
        sys.executable,
        "train.py",
        "debug=train",
        "+peft=true",
        "logger=none",
        "engine.progress=false",
        "train.eval_before=false",
        "train.val_every_n_steps=0",
        "callbacks.model_checkpoint.every_n_train_steps=2",
        f"hydra.run.dir={run}",
    ]
    proc = subprocess.Popen(
        [*base, "trainer.max_steps=100000"],
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    ckpts = run / "checkpoints"
    _wait_for(lambda: len(list(ckpts.glob("*.ckpt"))) >= 2, proc, "two checkpoints")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    rep = _report(run)
    assert rep["status"] == "interrupted" and rep["signal"] == "SIGTERM", (rep, err[-2000:])
    assert rep["stage"] == "fit" and rep["last_step"] >= 2, rep
    newest = max(ckpts.glob("*.ckpt"), key=lambda p: (p.stat().st_mtime, p.name))
    import torch

    step = torch.load(newest, map_location="cpu", weights_only=False)["global_step"]
    assert step >= 2
    again = subprocess.run(
        [*base, f"trainer.max_steps={step + 2}"],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    done = _report(run)
    assert done["status"] == "done" and done["resumed_from"] == str(newest)
    assert done["train"]["steps"] == step + 2
