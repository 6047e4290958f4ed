"""Fine-tuning text for the SLiM adapters: a ``LightningDataModule`` of packed token blocks.

The ``data`` config group instantiates :class:`TrainDataConfig`. Sources are those of
``slim_lightning.data.text`` and the TRAINING text is the source's calibration part, which shares no
text with its evaluation part (``embedded``: the even-position topics of CPython's language
reference, evaluation uses the odd ones; ``wikitext2``: train vs test; ``c4``: train vs
validation). A run that would train on the evaluation text fails at start (ConfigError).

The text is tokenised once (cached, see ``data.tokenize_text``), cut into non-overlapping blocks of
``seqlen`` tokens (the remainder is dropped), the LAST ``val_blocks`` blocks are held out for
validation and the rest is training data. The budget is ``train_tokens``: the run takes
``ceil(train_tokens / tokens_per_step)`` optimiser steps, cycling over the training blocks (a fresh
shuffle per epoch) when the budget exceeds the text.

Sampling is always a ``DistributedSampler`` with the trainer's world size and rank (world size 1
without a trainer), so the order depends only on ``seed`` and the epoch: a run resumed at an epoch
boundary sees exactly the batches of an uninterrupted one, and every rank reads a disjoint shard.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from ..errors import ConfigError
from .config import TrainDataConfig
from .text import load_text, tokenize_text


def _c4_train_ids(tokenizer: Any, cfg: TrainDataConfig, need: int) -> torch.Tensor:
    # documents in shard order, each followed by EOS, until the budget (+ validation) is covered
    from .text import _c4

    docs = _c4(cfg.resolved_split)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    out: list[int] = []
    for i in range(min(len(docs), cfg.max_docs)):
        out.extend(tokenizer(docs[i]["text"], verbose=False)["input_ids"] + eos)
        if len(out) >= need:
            break
    return torch.tensor(out, dtype=torch.int64)


def training_tokens(tokenizer: Any, cfg: TrainDataConfig) -> torch.Tensor:
    """The tokenised fine-tuning text, int64 ``(N,)``."""
    if cfg.source == "c4":
        return _c4_train_ids(tokenizer, cfg, cfg.train_tokens + cfg.val_blocks * cfg.seqlen)
    return tokenize_text(tokenizer, load_text(cfg), cfg.cache_dir)


def make_blocks(ids: torch.Tensor, cfg: TrainDataConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Cuts ``ids (N,)`` into ``(train (n_train, seqlen), val (val_blocks, seqlen))`` int64 blocks.

    Raises:
        ConfigError: ``data.seqlen`` when fewer than ``val_blocks + 1`` blocks fit in the text.
    """
    n = ids.numel() // cfg.seqlen
    if n < cfg.val_blocks + 1:
        raise ConfigError(
            "data.seqlen",
            cfg.seqlen,
            f"at most {ids.numel() // (cfg.val_blocks + 1)} (the training text {cfg.where} has "
            f"{ids.numel()} tokens and {cfg.val_blocks} blocks are held out)",
        )
    blocks = ids[: n * cfg.seqlen].reshape(n, cfg.seqlen).long()  # (n_blocks, seqlen)
    return blocks[: n - cfg.val_blocks], blocks[n - cfg.val_blocks :]


def check_batch(cfg: TrainDataConfig, n_train: int, world_size: int) -> None:
    """``data.batch_size`` must fit the training blocks on every rank."""
    if n_train < world_size * cfg.batch_size:
        raise ConfigError(
            "data.batch_size",
            cfg.batch_size,
            f"at most {n_train // world_size} ({n_train} training blocks of {cfg.seqlen} tokens "
            f"in {cfg.where} over {world_size} rank(s))",
        )


def check_budget(cfg: TrainDataConfig, n_train: int, world_size: int = 1) -> None:
    """Before any weights load: a batch the training blocks cannot fill is refused
    (``data.batch_size``); a step larger than the whole budget, or a budget that repeats the
    text, is said (warning naming the key and what the run will do)."""
    log = logging.getLogger(__name__)
    check_batch(cfg, n_train, world_size)
    per_step = cfg.tokens_per_step(world_size)
    if per_step > cfg.train_tokens:
        log.warning(
            "data.batch_size=%d x data.seqlen=%d x %d rank(s) = %d tokens per step exceeds "
            "data.train_tokens=%d: the run takes 1 step of %d tokens",
            cfg.batch_size,
            cfg.seqlen,
            world_size,
            per_step,
            cfg.train_tokens,
            per_step,
        )
    have = n_train * cfg.seqlen
    if cfg.train_tokens > have:
        log.warning(
            "data.train_tokens=%d exceeds the %d training tokens of %s: the run repeats the "
            "text (~%.1f epochs)",
            cfg.train_tokens,
            have,
            cfg.where,
            cfg.train_tokens / have,
        )


def indexed_loader(
    blocks: torch.Tensor,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int = 0,
    world_size: int = 1,
    rank: int = 0,
    drop_last: bool = False,
    num_workers: int = 0,
) -> DataLoader:
    """A DataLoader of ``(ids (b, seqlen), index (b,))`` over ``blocks`` with a DistributedSampler.

    The block index lets evaluation de-duplicate the samples DistributedSampler repeats to even
    out the shards.
    """
    ds = TensorDataset(blocks, torch.arange(blocks.shape[0]))
    sampler = DistributedSampler(
        ds, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last
    )
    return DataLoader(
        ds, batch_size=batch_size, sampler=sampler, num_workers=num_workers, drop_last=drop_last
    )


class SLiMDataModule(L.LightningDataModule):
    """Packed fine-tuning blocks (see the module docstring).

    Args:
        cfg: the validated ``data`` group.
        tokenizer: the model's tokenizer (a plain object; not saved as a hyperparameter).
        validate: False gives no validation loader (no validation during fitting).
    """

    def __init__(
        self,
        cfg: TrainDataConfig,
        tokenizer: Any,
        validate: bool = True,
        blocks: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        super().__init__()
        self.cfg = cfg
        self.validate = validate
        self.tokenizer = tokenizer
        # (train, val) blocks already cut by preflight, or None to tokenise in setup()
        self.train_blocks: torch.Tensor | None = None if blocks is None else blocks[0]
        self.val_blocks: torch.Tensor | None = None if blocks is None else blocks[1]

    def setup(self, stage: str | None = None) -> None:
        """Tokenises and blocks the text once per process (idempotent)."""
        if self.train_blocks is not None:
            return
        self.train_blocks, self.val_blocks = make_blocks(
            training_tokens(self.tokenizer, self.cfg), self.cfg
        )

    def _dist(self) -> tuple[int, int]:
        t = self.trainer
        return (t.world_size, t.global_rank) if t is not None else (1, 0)

    def train_dataloader(self) -> DataLoader:
        self.setup()
        world, rank = self._dist()
        check_batch(self.cfg, self.train_blocks.shape[0], world)
        return indexed_loader(
            self.train_blocks,
            self.cfg.batch_size,
            shuffle=True,
            seed=self.cfg.seed,
            world_size=world,
            rank=rank,
            drop_last=True,  # equal micro-batch counts on every rank
            num_workers=self.cfg.num_workers,
        )

    def val_dataloader(self) -> DataLoader | list:
        self.setup()
        if not self.validate or self.val_blocks.shape[0] == 0:
            return []
        world, rank = self._dist()
        return indexed_loader(
            self.val_blocks,
            self.cfg.batch_size,
            shuffle=False,
            world_size=world,
            rank=rank,
            num_workers=self.cfg.num_workers,
        )
