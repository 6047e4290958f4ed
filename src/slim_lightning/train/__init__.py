"""Adapter fine-tuning: ``plan`` (the ``train.py`` groups -> ``TrainPlan``) and ``module`` (the
LightningModule whose ``setup`` compresses or loads)."""

from .plan import TrainerConfig, TrainPlan, build_train_plan

__all__ = ["TrainPlan", "TrainerConfig", "build_train_plan"]
