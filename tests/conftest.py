"""Shared test set-up.

TRITON_INTERPRET must be set before Triton kernels are first imported: on a CPU-only machine the
kernels run in Triton's interpreter (slow, so kernel tests use small shapes).
"""

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="module")
def one_thread():
    """Runs a module single-threaded (opt in with ``pytestmark = pytest.mark.usefixtures(...)``).

    The 2 CPU cores are shared: with 2 intra-op threads, tiny SVD/matmul calls spin-wait under
    load and run ~100x slower than single-threaded.
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


ROOT = Path(__file__).resolve().parents[1]


def compose_config(config_name: str, overrides: list[str] | tuple[str, ...] = ()):
    """The composed Hydra config ``conf/<config_name>.yaml`` with ``overrides`` (compose API)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides))


@pytest.fixture
def compose_cfg():
    """``compose_cfg("compress", ["debug=default", ...])``: see :func:`compose_config`."""
    return compose_config


def pytest_configure(config):
    # `-m gpu` on a machine without CUDA must fail loudly, not report "skipped" and exit 0
    markexpr = config.getoption("markexpr", default="") or ""
    selects_gpu = "gpu" in markexpr and "not gpu" not in markexpr
    if selects_gpu and not torch.cuda.is_available():
        raise pytest.UsageError(
            f"-m {markexpr!r} selects the GPU tests, but no CUDA device is visible "
            "(torch.cuda.is_available() is False); run them on a GPU machine"
        )


# -- under CI (CI=true) a test of an advertised feature may not skip for a missing package ------
_MISSING = ("could not import", "No module named", "not installed", "needs lm-eval")


def _fail_missing_package_skip(report) -> None:
    """Under CI=true, turns a (test or collection) skip for a missing package into a failure."""
    if not report.skipped or os.environ.get("CI", "").lower() not in ("1", "true", "yes"):
        return
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    if any(m in reason for m in _MISSING):
        report.outcome = "failed"
        report.longrepr = f"CI=true: skipped for a missing package ({reason}); install the extras"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_missing_package_skip(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _fail_missing_package_skip(outcome.get_result())
