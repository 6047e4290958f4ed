"""The one LightningModule behind both entry points.

``setup()`` gets the run's compressed model from ``pipeline.load_or_compress`` (load
``compressed.path``, or load the base and compress it) and keeps only what Lightning needs around
it: idempotence (Lightning calls it on every process and stage) and, under several processes,
rank zero compresses and writes the packed checkpoint while the other ranks wait at a barrier
and load it, so all ranks hold bit-identical compressed weights. The module takes the typed plan
built once at the entry point (no DictConfig inside). ``train.py`` adds fitting of the adapters:
the packed base is a set of frozen buffers (exactly sparse, on its grid), only the adapters
(optionally norms / embeddings / lm_head) are parameters that train, and Lightning checkpoints
hold only those parameters plus the optimiser state and the digest of the base.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
import torch

from ..compress.plan import CompressPlan
from ..memory import PROGRESS

COMPRESSED_DIR = "compressed"  # run_dir/compressed: the one-shot result (shared by DDP ranks)


def plan_hparams(plan: Any) -> dict[str, Any]:
    """A JSON-able view of a (train) plan for ``save_hyperparameters``."""
    return json.loads(json.dumps(asdict(plan), default=str))


class SLiMModule(L.LightningModule):
    """Compress-in-setup LightningModule.

    Args:
        plan: the validated ``CompressPlan`` (``config.build_plan``), built once by the caller.
        run_dir: the run directory (resume state, checkpoints, reports).
        train: the ``TrainPlan`` of ``train.py`` (what trains, optimiser, ``compressed.*``,
            ``ckpt_path``); None for compression only.
        prepared: ``preflight.Prepared`` (tokenizer and tokenised texts, checked early).
        base: the uncompressed model already loaded (``pipeline.load_base``), e.g. after a dense
            evaluation; ``setup`` compresses it in place.
        dist: the ``distributed.DistContext`` of a several-process ``compress.py`` run (the
            engine's block step follows it), or None.
    """

    def __init__(
        self,
        plan: CompressPlan,
        run_dir: str | None = None,
        *,
        train: Any = None,
        prepared: Any = None,
        base: Any = None,
        dist: Any = None,
    ):
        super().__init__()
        self.save_hyperparameters(
            {"plan": plan_hparams(train if train is not None else plan), "run_dir": run_dir}
        )
        self.plan = plan
        self.train_plan = train
        self.prepared = prepared
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.model: torch.nn.Module | None = None
        self.tokenizer: Any = None if prepared is None else prepared.tokenizer
        self.loaded: Any = None  # pipeline.Loaded: the base, then the compressed model
        self._base_sha256: str | None = None
        self.compressed = False
        self.compress_calls = 0
        self.timings: dict[str, float] = {}
        self.last_val: dict[str, float] = {}
        self.val_prefix = "val"
        self.trainable_names: list[str] = []
        self.n_trainable = 0
        self.train_stats = {"tokens": 0, "seconds": 0.0, "steps": 0}
        self._val: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._val_nll = 0.0
        self._val_tokens = 0
        self._t_batch = 0.0
        # Lightning checkpoints hold only the trainable tensors: the rest comes from setup()
        self.strict_loading = False
        self.dist_ctx = dist
        self._teacher: list | None = None  # (a list: not a registered submodule)
        if base is not None:
            self._adopt(base)

    # -- plan views ----------------------------------------------------------------------------
    @property
    def train_cfg(self) -> Any:
        from .plan import TrainConfig

        return self.train_plan.train if self.train_plan is not None else TrainConfig()

    @property
    def compressed_path(self) -> str | None:
        return None if self.train_plan is None else self.train_plan.compressed_path

    @property
    def calib_result(self) -> Any:
        return None if self.loaded is None else self.loaded.calib_result

    @property
    def loaded_meta(self) -> dict[str, Any] | None:
        return None if self.loaded is None else self.loaded.meta

    @property
    def export_dtype(self) -> str:
        return "float32" if self.loaded is None else self.loaded.export_dtype

    @property
    def fingerprint(self) -> str | None:
        """The compression fingerprint (model weights, data, options) of this run's base."""
        return None if self.loaded is None else self.loaded.fingerprint

    @property
    def source_sha256(self) -> str | None:
        """The dense parent's weights digest (recorded in the checkpoints this run writes)."""
        return None if self.loaded is None else self.loaded.source_sha256

    # -- model ---------------------------------------------------------------------------------
    def _adopt(self, loaded: Any) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer if loaded.tokenizer is not None else self.tokenizer
        self.timings.update(loaded.timings)

    def load_base(self) -> None:
        """Loads the uncompressed model once (``pipeline.load_base``), e.g. for a dense
        evaluation before ``setup`` compresses it."""
        if self.model is None:
            from ..compress.pipeline import load_base

            self._adopt(load_base(self.plan, self.prepared))

    def get_tokenizer(self) -> Any:
        """The tokenizer (from preflight, else from the packed checkpoint or the base model)."""
        if self.tokenizer is None:
            if self.compressed_path is not None:
                self._load_or_compress()
            else:
                self.load_base()
        return self.tokenizer

    def _save_compressed_here(self) -> Path:
        from ..checkpoint import save_compressed

        assert self.run_dir is not None, "a distributed run needs run_dir"
        out = self.run_dir / COMPRESSED_DIR
        results = {"layers_summary": self.compression_summary()}
        save_compressed(
            self.model,
            self.tokenizer,
            out,
            plan=self.plan,
            results=results,
            calibration=self.fingerprint,
            dtype=self.export_dtype,
            base_sha256=self.base_sha256(),
            source_sha256=self.source_sha256,
        )
        return out

    def base_sha256(self) -> str:
        """sha256 of the packed base (every SLiMLinear buffer but the adapters'); computed once."""
        if self._base_sha256 is None:
            from ..nn.adapters import state_hashes

            self._base_sha256 = state_hashes(self.model)["base"]
        return self._base_sha256

    def setup(self, stage: str | None = None) -> None:
        """Load-or-compress exactly once per process; for ``fit`` also marks what trains."""
        if not self.compressed:
            self._load_or_compress()
            from ..nn.backend import set_dense_cache

            set_dense_cache(self.model, self.plan.dense_cache)
        if stage == "fit":
            self.prepare_training()

    def _get(self, compressed_path: Any = None) -> None:
        from ..compress.pipeline import load_or_compress

        if compressed_path is None:
            self.compress_calls += 1
        base = self.loaded if (self.loaded is not None and not self.loaded.compressed) else None
        ckpt = None if self.train_plan is None else self.train_plan.ckpt_path
        self._adopt(
            load_or_compress(
                self.plan,
                self.run_dir,
                prepared=self.prepared,
                compressed_path=compressed_path,
                base=None if compressed_path is not None else base,
                ckpt_path=ckpt,
                dist=self.dist_ctx,
            )
        )

    def _load_or_compress(self) -> None:
        if self.compressed_path is not None:
            self._get(self.compressed_path)
        else:
            trainer = self._trainer
            distributed = trainer is not None and trainer.world_size > 1
            save = self.train_plan is not None and self.train_plan.save_compressed
            if not distributed:
                self._get()
                if save and self.plan.export.packed and self.run_dir is not None:
                    self._save_compressed_here()
            else:
                if trainer.is_global_zero:
                    self._get()
                    self._save_compressed_here()
                # the other ranks wait for rank zero's packed checkpoint, then load it
                trainer.strategy.barrier("slim_compressed")
                if not trainer.is_global_zero:
                    self._get(self.run_dir / COMPRESSED_DIR)
        self.compressed = True
        self._ignore_packed_buffers_in_ddp()
        self._write_rank_hashes("setup")

    def _ignore_packed_buffers_in_ddp(self) -> None:
        # identical on every rank by construction (rank zero wrote them, the others loaded them);
        # DDP's start-up broadcast would also fail on their int8 codes / int16 scales with gloo
        from ..nn.embedding import PackedEmbedding
        from ..nn.linear import SLiMLinear

        names = []
        for mname, mod in self.model.named_modules():
            if isinstance(mod, (SLiMLinear, PackedEmbedding)):
                names += [f"model.{mname}.{b}" for b, _ in mod.named_buffers(recurse=False)]
        self._ddp_params_and_buffers_to_ignore = names

    def prepare_training(self) -> None:
        """Freezes everything but the adapters (and the ``train.*`` extras); idempotent."""
        if self.trainable_names:
            return
        from ..errors import ConfigError
        from ..nn.adapters import count_trainable, mark_trainable

        tc = self.train_cfg
        self.trainable_names = mark_trainable(
            self.model, norms=tc.norms, embeddings=tc.embeddings, lm_head=tc.lm_head
        )
        if not self.trainable_names:
            raise ConfigError(
                "lowrank.method", self.plan.spec.lowrank.method, "a method with adapters"
            )
        self.n_trainable = count_trainable(self.model)
        self.model.train()  # loaded in eval mode; validation restores this mode after it runs
        if tc.gradient_checkpointing:
            self.model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )

    def compression_summary(self) -> dict[str, float]:
        from ..compress.engine import summarize_layers

        if self.calib_result is None and self.loaded_meta is not None:
            return dict(self.loaded_meta.get("results", {}).get("layers_summary", {}))
        reports = self.calib_result.reports if self.calib_result is not None else []
        return summarize_layers(reports)

    def _write_rank_hashes(self, tag: str) -> None:
        if self.run_dir is None or not self.train_cfg.rank_hashes:
            return
        from ..io import atomic_write_json
        from ..nn.adapters import state_hashes

        rank = self._trainer.global_rank if self._trainer is not None else 0
        atomic_write_json(
            self.run_dir / "rank_hashes" / f"{tag}_rank{rank}.json",
            {"rank": rank, "tag": tag, **state_hashes(self.model)},
        )

    def forward(self, input_ids: torch.Tensor) -> Any:
        return self.model(input_ids=input_ids, use_cache=False)

    # -- fine-tuning -------------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        from .plan import lr_lambda

        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = self.train_plan.optimizer(params)
        tc = self.train_cfg
        total = max(1, int(self.trainer.max_steps))
        sched = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(tc.warmup_steps, total, tc.schedule)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_fit_start(self) -> None:
        metrics = {"train/trainable_params": float(self.n_trainable)}
        for name, v in self.compression_summary().items():
            metrics[f"compress/{name}"] = float(v)
        for lg in self.loggers:
            lg.log_metrics(metrics, step=self.global_step)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._t_batch = time.perf_counter()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        from ..data.evaluation import training_nll

        ids = batch[0] if isinstance(batch, (list, tuple)) else batch  # (b, seqlen)
        tc = self.train_cfg
        if tc.loss == "lm":
            nll, n = training_nll(self.model, ids)  # chunked LM head: no full fp32 logits
            loss = nll / n
        else:  # distillation from the dense parent (train.distill)
            from .distill import distill_loss

            loss, parts = distill_loss(
                self.model,
                self.teacher(),
                ids,
                kind=tc.loss,
                temperature=tc.kd_temperature,
                squarehead_weight=tc.squarehead_weight,
                lm_weight=tc.lm_weight,  # the label loss from the same forward
            )
            for k, v in parts.items():
                self.log(f"train/{k}", v)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        return loss

    def teacher(self) -> torch.nn.Module:
        """The frozen dense parent for ``train.loss=kd*``, loaded on first use onto this rank's
        device; held outside the module tree (no checkpoint, no DDP)."""
        if self._teacher is None:
            from .distill import load_teacher

            self._teacher = [
                load_teacher(self.plan, self.prepared, self.train_cfg.teacher_dtype, self.device)
            ]
        return self._teacher[0]

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        dt = time.perf_counter() - self._t_batch
        ids = batch[0] if isinstance(batch, (list, tuple)) else batch
        tokens = ids.numel() * self.trainer.world_size
        self.train_stats["tokens"] += tokens
        self.train_stats["seconds"] += dt
        self.train_stats["steps"] = int(self.global_step)
        PROGRESS["last_step"] = int(self.global_step)  # (an interruption's record)
        self.log("train/tokens_per_s", tokens / max(dt, 1e-9))
        self.log("train/tokens", float(self.train_stats["tokens"]))

    def on_fit_end(self) -> None:
        if self.train_cfg.requantize:
            from ..nn.adapters import requantize_all

            requantize_all(self.model)
        self._write_rank_hashes("fit_end")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keep = {n for n, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint["slim_trainable"] = sorted(keep)
        # the adapters only make sense on the base they were trained on: resuming checks it
        checkpoint["slim_base"] = {
            "base_sha256": self.base_sha256(),
            "fingerprint": self.fingerprint,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        base = checkpoint.get("slim_base")
        if not isinstance(base, dict) or base.get("base_sha256") != self.base_sha256():
            got = base.get("base_sha256", "none")[:12] if isinstance(base, dict) else "none"
            raise ValueError(
                f"ckpt_path: the checkpoint's adapters were trained on another compressed base "
                f"(base sha256 {got} != {self.base_sha256()[:12]} of this run); resume with the "
                "same compressed.path (or the same model, data and method options)"
            )
        want = {n for n, p in self.named_parameters() if p.requires_grad}
        have = set(checkpoint.get("state_dict", {}))
        if want and want != have:
            missing, extra = sorted(want - have), sorted(have - want)
            raise RuntimeError(
                "checkpoint does not match the trainable set of this run "
                f"(missing {missing[:3]}..., unexpected {extra[:3]}...): same model, method and "
                "train.* options are needed to resume"
            )

    # -- evaluation -------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._val, self._val_nll, self._val_tokens = [], 0.0, 0

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        from ..data.evaluation import per_window_nll

        if isinstance(batch, (list, tuple)) and len(batch) == 2:
            ids, index = batch  # (b, seqlen), (b,): indices de-duplicate padded DDP shards
            nll, _ = per_window_nll(self.model, ids, reduction="none")
            self._val.append((index.detach(), nll.detach().double()))
            self._val_tokens += ids.shape[0] * (ids.shape[1] - 1)
            return
        ids = batch[0] if isinstance(batch, (list, tuple)) else batch
        nll, n = per_window_nll(self.model, ids)
        self._val_nll += float(nll)
        self._val_tokens += int(n)

    def _indexed_totals(self) -> tuple[float, float]:
        index = torch.cat([i for i, _ in self._val]).to(self.device)
        nll = torch.cat([v for _, v in self._val]).to(self.device)
        seqlen_m1 = self._val_tokens / max(index.numel(), 1)
        if self._trainer is not None and self.trainer.world_size > 1:
            index = self.all_gather(index).reshape(-1)
            nll = self.all_gather(nll).reshape(-1)
        per_window: dict[int, float] = {}
        for i, v in zip(index.tolist(), nll.tolist(), strict=True):
            per_window.setdefault(int(i), float(v))
        return sum(per_window.values()), len(per_window) * seqlen_m1

    def on_validation_epoch_end(self) -> None:
        if self._val:
            total_nll, total_tokens = self._indexed_totals()
        else:
            totals = torch.tensor([self._val_nll, float(self._val_tokens)], dtype=torch.float64)
            if self._trainer is not None and self.trainer.world_size > 1:
                totals = self.all_gather(totals).reshape(-1, 2).sum(0)
            total_nll, total_tokens = float(totals[0]), float(totals[1])
        nll = total_nll / max(total_tokens, 1.0)
        ppl = math.exp(nll) if nll < 700 else float("inf")
        self.last_val = {"val/loss": nll, "val/ppl": ppl, "val/tokens": float(total_tokens)}
        p = self.val_prefix
        self.log(f"{p}/loss", nll, rank_zero_only=True, sync_dist=False)
        self.log(f"{p}/ppl", ppl, rank_zero_only=True, sync_dist=False)
