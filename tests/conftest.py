"""Shared test set-up.

TRITON_INTERPRET must be set before Triton kernels are first imported: on a CPU-only machine the
kernels run in Triton's interpreter (slow, so kernel tests use small shapes).
"""

import os

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
