"""The one LightningModule behind both entry points.

``setup()`` loads the base model and either loads a compressed checkpoint or runs the one-shot
compression (idempotent: Lightning calls it on every process and stage). ``compress.py`` is this
setup plus ``trainer.validate``; ``train.py`` adds fitting of the adapters.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from .config import CompressPlan, build_plan


class SLiMModule(L.LightningModule):
    """Compress-in-setup LightningModule.

    Args:
        cfg: the composed Hydra config as a plain dict (``save_hyperparameters`` gets no module).
        run_dir: the run directory (resume state, checkpoints, reports).
    """

    def __init__(self, cfg: dict[str, Any], run_dir: str | None = None):
        super().__init__()
        self.save_hyperparameters({"cfg": cfg, "run_dir": run_dir})
        self.cfg: DictConfig = OmegaConf.create(cfg)
        self.plan: CompressPlan = build_plan(self.cfg)
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.model: torch.nn.Module | None = None
        self.tokenizer: Any = None
        self.calib_result: Any = None
        self.compressed = False
        self.timings: dict[str, float] = {}
        self._val_nll = 0.0
        self._val_tokens = 0
        self.last_val: dict[str, float] = {}

    # -- model ------------------------------------------------------------------------------
    def load_base(self) -> None:
        """Loads the uncompressed model and tokenizer once (CPU)."""
        if self.model is not None:
            return
        import time

        from .models import load_model

        t0 = time.perf_counter()
        self.model, self.tokenizer = load_model(self.plan.model)
        self.timings["load_s"] = time.perf_counter() - t0

    def calibration_ids(self) -> torch.Tensor:
        """The calibration windows, int64 ``(nsamples, seqlen)`` (tokenised once, cached)."""
        from .data import calibration_windows

        return calibration_windows(self.tokenizer, self.plan.calib)

    def setup(self, stage: str | None = None) -> None:
        """Load-or-compress, exactly once per process."""
        if self.compressed:
            return
        import time

        from .pipeline import compress_model

        self.load_base()
        t0 = time.perf_counter()
        ids = self.calibration_ids()
        self.timings["calib_data_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        self.calib_result = compress_model(
            self.model, self.plan, ids, self.run_dir, packed=self.plan.export.packed
        )
        self.timings["compress_s"] = time.perf_counter() - t0
        self.compressed = True

    def forward(self, input_ids: torch.Tensor) -> Any:
        return self.model(input_ids=input_ids, use_cache=False)

    # -- evaluation -------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._val_nll, self._val_tokens = 0.0, 0

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        from .evaluation import per_window_nll

        ids = batch[0] if isinstance(batch, (list, tuple)) else batch
        nll, n = per_window_nll(self.model, ids)
        self._val_nll += float(nll)
        self._val_tokens += int(n)

    def on_validation_epoch_end(self) -> None:
        totals = torch.tensor([self._val_nll, float(self._val_tokens)], dtype=torch.float64)
        if self.trainer is not None and self.trainer.world_size > 1:
            totals = self.all_gather(totals).reshape(-1, 2).sum(0)
        nll = float(totals[0] / max(float(totals[1]), 1.0))
        ppl = math.exp(nll) if nll < 700 else float("inf")
        self.last_val = {"val/loss": nll, "val/ppl": ppl, "val/tokens": float(totals[1])}
        self.log("val/loss", nll, rank_zero_only=True)
        self.log("val/ppl", ppl, rank_zero_only=True)
