"""Shared test set-up.

TRITON_INTERPRET must be set before Triton kernels are first imported: on a CPU-only machine the
kernels run in Triton's interpreter (slow, so kernel tests use small shapes).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

torch.set_num_threads(min(2, torch.get_num_threads()))
