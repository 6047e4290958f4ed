"""Compatibility module: the fine-tuning names now live in their own modules.

* :mod:`slim_lightning.train_config`: the validated settings (``TrainConfig``, ``TrainerConfig``,
  ``LoggerConfig``, ``TrainPlan``, ``build_train_plan``, ``build_optimizer_factory``,
  ``lr_lambda``).
* :mod:`slim_lightning.adapters`: what trains and the model after training (``mark_trainable``,
  ``count_trainable``, ``requantize_all``, ``state_hashes``, ``merge_to_dense``).

New code imports from those; this module only re-exports them for existing callers.
"""

from __future__ import annotations

from .adapters import count_trainable, mark_trainable, merge_to_dense, requantize_all, state_hashes
from .train_config import (
    OPTIMIZER_HINT,
    LoggerConfig,
    TrainConfig,
    TrainerConfig,
    TrainPlan,
    build_optimizer_factory,
    build_train_plan,
    lr_lambda,
    make_dataclass,
)

__all__ = [
    "OPTIMIZER_HINT",
    "LoggerConfig",
    "TrainConfig",
    "TrainPlan",
    "TrainerConfig",
    "build_optimizer_factory",
    "build_train_plan",
    "count_trainable",
    "lr_lambda",
    "make_dataclass",
    "mark_trainable",
    "merge_to_dense",
    "requantize_all",
    "state_hashes",
]
