"""engine.omp_wait: OMP_WAIT_POLICY is set before torch loads (slim_lightning.device)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from slim_lightning.device import set_omp_wait_policy
from slim_lightning.errors import ConfigError

PROBE = """
import os, sys
from slim_lightning.device import set_omp_wait_policy
print(set_omp_wait_policy({policy!r}))
assert "torch" not in sys.modules
import torch
print(os.environ.get("OMP_WAIT_POLICY"))
"""


def _probe(policy, env_extra=None):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env.update(env_extra or {})
    out = subprocess.run(
        [sys.executable, "-c", PROBE.format(policy=policy)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.split()


def test_policy_is_set_before_torch_loads():
    assert _probe("passive") == ["PASSIVE", "PASSIVE"]
    assert _probe(None) == ["None", "None"]


def test_a_users_environment_wins():
    assert _probe("passive", {"OMP_WAIT_POLICY": "ACTIVE"}) == ["ACTIVE", "ACTIVE"]


def test_bad_value_names_the_key():
    with pytest.raises(ConfigError, match="engine.omp_wait.*passive, active, auto or null"):
        set_omp_wait_policy("sometimes")


def test_too_late_warns_and_changes_nothing(monkeypatch):
    import torch  # noqa: F401 - loaded: the runtime has read its policy already

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    with pytest.warns(UserWarning, match="already loaded"):
        assert set_omp_wait_policy("passive") is None
    assert "OMP_WAIT_POLICY" not in os.environ


def test_engine_config_refuses_a_bad_policy():
    from slim_lightning.compress.plan import EngineConfig

    with pytest.raises(ConfigError, match="engine.omp_wait"):
        EngineConfig(omp_wait="spin")
    assert EngineConfig(omp_wait="PASSIVE").omp_wait == "PASSIVE"


def test_auto_is_passive_only_when_the_cores_are_busy(monkeypatch):
    import slim_lightning.device as device

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setattr(device, "busy_cores", lambda seconds=0.2: 0.1)
    monkeypatch.delitem(sys.modules, "torch")  # (as at an entry point, before torch loads)
    try:
        assert device.set_omp_wait_policy("auto") is None
        assert "OMP_WAIT_POLICY" not in os.environ
        monkeypatch.setattr(device, "busy_cores", lambda seconds=0.2: 1.0)
        assert device.set_omp_wait_policy("auto") == "PASSIVE"
        assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    finally:
        os.environ.pop("OMP_WAIT_POLICY", None)


def test_busy_cores_sees_a_busy_process():
    from slim_lightning.device import busy_cores

    idle = busy_cores(0.3)
    if idle is None:
        pytest.skip("no /proc/stat")
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        import time

        time.sleep(0.3)
        loaded = busy_cores(0.5)
    finally:
        busy.kill()
        busy.wait()
    assert loaded >= 0.7  # (one core spinning, whatever else runs)
