"""What text a run reads, as typed configs: ``calib``, ``eval`` and ``data`` (fine-tuning).

Each group instantiates a frozen dataclass that validates itself, so a typo or an impossible
value fails at start naming its key. The sources and splits are described in ``data.text``.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from ..errors import ConfigError, check_choice, check_int

# offline zero-shot task built from the embedded text (``data.zeroshot_task``)
LOCAL_TASKS = ("slim_continuation",)


SOURCES = ("embedded", "embedded_shakespeare", "text", "wikitext2", "c4")


# split "auto" resolves per role: (calibration split, evaluation split)
_SPLITS = {
    "embedded": (("calib", "eval"), "calib", "eval"),
    "embedded_shakespeare": (("calib", "eval"), "calib", "eval"),
    "text": (("all",), "all", "all"),
    "wikitext2": (("train", "validation", "test"), "train", "test"),
    "c4": (("train", "validation"), "train", "validation"),
}


@dataclass(frozen=True)
class TextSourceConfig:
    """Where text comes from (shared fields of ``calib`` and ``eval``).

    Attributes:
        source: embedded | embedded_shakespeare | text | wikitext2 | c4.
        path: the file for ``source=text``.
        split: ``auto`` (calibration or evaluation part, per role) or an explicit split:
            embedded*: calib | eval; wikitext2: train | validation | test; c4: train | validation;
            text: all.
        seqlen: tokens per window.
        cache_dir: cache root for tokenised text (see ``cache_root``).
        name: label in reports (default: the source).
    """

    _group: ClassVar[str] = "data"
    _role: ClassVar[int] = 1  # index into _SPLITS values: 1 calibration, 2 evaluation

    source: str = "embedded"
    path: str | None = None
    split: str = "auto"
    seqlen: int = 512
    cache_dir: str | None = None
    name: str | None = None

    def __post_init__(self) -> None:
        g = self._group
        check_choice(f"{g}.source", self.source, SOURCES)
        check_choice(f"{g}.split", self.split, ("auto", *_SPLITS[self.source][0]))
        check_int(f"{g}.seqlen", self.seqlen, 1)
        if self.source == "text":
            check_text_file(f"{g}.path", self.path)

    @property
    def where(self) -> str:
        """The text's origin for messages: the file for ``text``, else source and split."""
        if self.source == "text":
            return f"{self._group}.path={self.path}"
        return f"{self._group}.source={self.source} (split {self.resolved_split})"

    @property
    def resolved_split(self) -> str:
        """The concrete split (``auto`` resolved for this role)."""
        return _SPLITS[self.source][self._role] if self.split == "auto" else self.split

    @property
    def label(self) -> str:
        """Name used in reports."""
        return self.name or self.source


@dataclass(frozen=True)
class CalibConfig(TextSourceConfig):
    """Calibration data (the ``calib`` group): ``nsamples`` random windows of ``seqlen`` tokens."""

    _group: ClassVar[str] = "calib"
    _role: ClassVar[int] = 1

    nsamples: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("calib.nsamples", self.nsamples, 1)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ConfigError("calib.seed", self.seed, "a non-negative integer")


@dataclass(frozen=True)
class EvalConfig(TextSourceConfig):
    """Evaluation data (the ``eval`` group): non-overlapping windows, at most ``max_windows``.

    ``zero_shot`` lists lm-eval-harness tasks (mmlu, piqa, arc_easy, arc_challenge, winogrande,
    openbookqa: from the hub) and/or ``slim_continuation`` (offline, built from the embedded
    evaluation text: :mod:`.zeroshot_task`) to run on the dense and compressed models;
    ``zero_shot_limit`` caps examples per task (debugging only).
    """

    _group: ClassVar[str] = "eval"
    _role: ClassVar[int] = 2

    max_windows: int | None = 80
    zero_shot: tuple[str, ...] = ()
    zero_shot_limit: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.seqlen < 2:
            raise ConfigError(
                "eval.seqlen", self.seqlen, "an integer >= 2 (a window predicts tokens 2..seqlen)"
            )
        if self.max_windows is not None:
            check_int("eval.max_windows", self.max_windows, 1)
        tasks = tuple(self.zero_shot or ())
        object.__setattr__(self, "zero_shot", tasks)
        for t in tasks:
            check_choice("eval.zero_shot", t, (*LOCAL_TASKS, *ZERO_SHOT_TASKS))
        if tasks and importlib.util.find_spec("lm_eval") is None:
            raise ConfigError(
                "eval.zero_shot",
                list(tasks),
                "[] unless lm-eval-harness is installed (pip install 'slim-lightning[eval]')",
            )
        if self.zero_shot_limit is not None:
            check_int("eval.zero_shot_limit", self.zero_shot_limit, 1)


def check_text_file(key: str, path: Any) -> None:
    """Raises ConfigError naming ``key`` and the file unless it is non-empty UTF-8 text."""
    p = Path(str(path)).expanduser() if path else None
    if p is None or not p.is_file():
        raise ConfigError(key, path, "an existing UTF-8 text file")
    try:
        data = p.read_bytes()
    except OSError as e:
        raise ConfigError(key, path, f"a readable UTF-8 text file ({e.strerror})") from None
    if not data:
        raise ConfigError(key, path, "a non-empty UTF-8 text file (this file is empty)")
    if b"\x00" in data:
        raise ConfigError(
            key, path, f"a UTF-8 text file (byte {data.index(0)} is NUL: binary data?)"
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(
            key,
            path,
            f"a UTF-8 text file (byte {e.start} = {data[e.start : e.start + 1]!r} is not valid "
            "UTF-8; convert it first, e.g. `iconv -f latin1 -t utf-8`)",
        ) from None
    if not text.strip():
        raise ConfigError(key, path, "a text file with some text in it (only whitespace)")


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


ZERO_SHOT_TASKS = ("mmlu", "piqa", "arc_easy", "arc_challenge", "winogrande", "openbookqa")
