"""Text a run reads: ``config`` (the ``calib`` / ``eval`` / ``data`` groups), ``text`` (sources,
tokenisation cache, windows), ``datamodule`` (fine-tuning blocks), ``evaluation`` (perplexity,
zero-shot), ``zeroshot_task`` (the offline task)."""

from .config import CalibConfig, EvalConfig, TrainDataConfig

__all__ = ["CalibConfig", "EvalConfig", "TrainDataConfig"]
