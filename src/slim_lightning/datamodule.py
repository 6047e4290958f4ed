"""Fine-tuning text for the SLiM adapters: a ``LightningDataModule`` of packed token blocks.

The ``data`` config group instantiates :class:`TrainDataConfig`. Sources are those of
``slim_lightning.data`` and the TRAINING text is the source's calibration part, which shares no
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

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import lightning as L
import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from .data import TextSourceConfig, load_text, tokenize_text
from .errors import ConfigError, check_int


@dataclass(frozen=True)
class TrainDataConfig(TextSourceConfig):
    """Fine-tuning data (the ``data`` group).

    Attributes:
        train_tokens: the training budget in tokens (all ranks and accumulation steps together).
        batch_size: blocks per micro-batch on each rank.
        val_blocks: blocks held out (from the end of the text) for validation during fitting.
        max_docs: ``c4`` only: at most this many training documents are read.
        num_workers: DataLoader workers (0 = in the main process; blocks are tiny tensors).
        seed: shuffling seed (epoch ``e`` uses ``seed + e``).
    """

    _group: ClassVar[str] = "data"
    _role: ClassVar[int] = 1  # the calibration part: disjoint from the evaluation part

    train_tokens: int = 200_000
    batch_size: int = 1
    val_blocks: int = 8
    max_docs: int = 200_000
    num_workers: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("data.train_tokens", self.train_tokens, 1)
        check_int("data.batch_size", self.batch_size, 1)
        check_int("data.val_blocks", self.val_blocks, 0)
        check_int("data.max_docs", self.max_docs, 1)
        check_int("data.num_workers", self.num_workers, 0)
        check_int("data.seed", self.seed, 0)

    def tokens_per_step(self, world_size: int = 1, accumulate: int = 1) -> int:
        """Tokens consumed by one optimiser step."""
        return self.seqlen * self.batch_size * world_size * accumulate

    def num_steps(self, world_size: int = 1, accumulate: int = 1) -> int:
        """Optimiser steps that spend the ``train_tokens`` budget (at least 1)."""
        return max(1, math.ceil(self.train_tokens / self.tokens_per_step(world_size, accumulate)))


def check_disjoint(data: TrainDataConfig, eval_cfg: Any) -> None:
    """Raises ConfigError when the training text would be the evaluation text."""
    if eval_cfg is None:
        return
    same_source = data.source == eval_cfg.source
    if data.source == "text":
        same_source = same_source and str(data.path) == str(eval_cfg.path)
    if same_source and data.resolved_split == eval_cfg.resolved_split:
        raise ConfigError(
            "data.split",
            data.split,
            f"a split other than the evaluation split {eval_cfg.resolved_split!r} of "
            f"{eval_cfg.source!r} (fine-tuning on the evaluation text)",
        )


def _c4_train_ids(tokenizer: Any, cfg: TrainDataConfig, need: int) -> torch.Tensor:
    # documents in shard order, each followed by EOS, until the budget (+ validation) is covered
    from .data import _c4

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
        if self.train_blocks.shape[0] < world * self.cfg.batch_size:
            raise ConfigError(
                "data.batch_size",
                self.cfg.batch_size,
                f"at most {self.train_blocks.shape[0] // world} ({self.train_blocks.shape[0]} "
                f"training blocks over {world} ranks)",
            )
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
