"""The conftest guard: under CI=true a skip for a missing package fails (issue 22)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PROBE = """
import pytest

def test_needs_a_missing_package():
    pytest.importorskip("no_such_package_slim_lightning")

def test_skips_for_another_reason():
    pytest.skip("one method is enough")
"""


@pytest.mark.parametrize("ci", ["true", ""])
def test_missing_package_skip_fails_only_under_ci(tmp_path, ci):
    shutil.copy(Path(__file__).with_name("conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "test_probe.py").write_text(PROBE)
    env = {**os.environ, "CI": ci}
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    summary = out.stdout.strip().splitlines()[-1]
    if ci:
        assert "1 failed, 1 skipped" in summary, out.stdout[-2000:]
        assert "install the extras" in out.stdout
    else:
        assert "2 skipped" in summary and "failed" not in summary, out.stdout[-2000:]
