"""``slim_continuation``: an offline multiple-choice zero-shot task built from embedded text.

The lm-eval-harness tasks of the paper (piqa, arc_easy, ...) download their data from the
Hugging Face hub. ``slim_continuation`` needs no network: its examples are built, deterministically,
from the EVALUATION part of the ``embedded`` corpus (CPython's ``pydoc_data/topics.py``, odd
topics; see :mod:`slim_lightning.data.text`), so it never shares text with the calibration part.

Each example is a prose paragraph's opening sentence(s) (the context) and four candidate next
sentences: the paragraph's true next sentence and three distractors, the sentences closest in
length to it among the continuations of paragraphs of *other* topics. The model picks the
candidate with the highest log-likelihood (lm-eval's ``multiple_choice``: ``acc`` on the summed
log-likelihood, ``acc_norm`` per character). Chance is 0.25.

The examples are written as JSONL under ``<cache>/zero_shot/`` (see ``data.cache_root``; the file
name carries a digest of its content) and loaded by lm-eval through the ``json`` dataset builder,
which reads local files without network (``HF_DATASETS_OFFLINE=1`` is fine). The text of
``pydoc_data`` differs between Python versions, so scores compare on one Python minor version only.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from pathlib import Path
from typing import Any

from .config import LOCAL_TASKS

TASK = LOCAL_TASKS[0]
N_EXAMPLES = 200  # a cap: CPython 3.11's text yields 128
N_CHOICES = 4
SEED = 0
_VERSION = 1  # bump when the construction changes (it is part of the cache file's name)

_MIN_SENT, _MAX_SENT = 40, 240  # characters per sentence (context part and candidates)
_MAX_CONTEXT = 400  # characters of context
_SENT_END = re.compile(r'(?<=[a-z0-9)"\]][.!?])\s+(?=["(]?[A-Z])')


def _prose_paragraphs(text: str) -> list[str]:
    """Paragraphs of running prose (no indented code or grammar, no headings), one line each."""
    out = []
    for para in text.split("\n\n"):
        lines = para.split("\n")
        if not para.strip() or any(ln.startswith(" ") or not ln.strip() for ln in lines):
            continue  # code, grammar, lists, tables: indented in topics.py
        if any(set(ln.strip()) <= set("*=-~^") for ln in lines):
            continue  # section headings
        joined = re.sub(r"-\n(?=[a-z])", "-", para)  # "left-\nhand" -> "left-hand"
        out.append(" ".join(joined.split()))
    return out


def _sentences(paragraph: str) -> list[str]:
    return [s.strip() for s in _SENT_END.split(paragraph) if s.strip()]


def _ok_sentence(s: str) -> bool:
    return _MIN_SENT <= len(s) <= _MAX_SENT and s[-1] in ".!?" and ">>>" not in s


def continuation_examples(n: int = N_EXAMPLES, seed: int = SEED) -> list[dict[str, Any]]:
    """The task's examples, deterministic for a given Python version (``pydoc_data``).

    Returns:
        up to ``n`` dicts ``{"id", "topic", "context", "choices": [4 distinct sentences],
        "label": index of the true continuation}``, in corpus order.
    """
    from .text import embedded_parts

    parts = embedded_parts()
    calib_text = " ".join(" ".join(t.split()) for t in parts["calib"].values())
    # candidates: (topic, context, true next sentence); everything checked against calibration
    cands: list[tuple[str, str, str]] = []
    seen: set[str] = set()
    for topic in sorted(parts["eval"]):
        for para in _prose_paragraphs(parts["eval"][topic]):
            sents = _sentences(para)
            if len(sents) < 2:
                continue
            # context: the first sentences that fit, the continuation: the sentence after them
            k = 1
            while k + 1 < len(sents) and len(" ".join(sents[: k + 1])) <= _MAX_CONTEXT // 2:
                k += 1
            context, nxt = " ".join(sents[:k]), sents[k]
            if not (_MIN_SENT <= len(context) <= _MAX_CONTEXT and _ok_sentence(nxt)):
                continue
            if context in calib_text or nxt in calib_text or context in seen or nxt in seen:
                continue  # also: paragraphs quoted in two evaluation topics count once
            seen.update((context, nxt))
            cands.append((topic, context, nxt))
    rng = random.Random(seed)
    if len(cands) > n:  # an even, seeded subsample in corpus order
        cands = [cands[i] for i in sorted(rng.sample(range(len(cands)), n))]
    pool = sorted({c[2] for c in cands})  # distractors come from the kept continuations
    by_topic: dict[str, set[str]] = {}
    for topic, _, nxt in cands:
        by_topic.setdefault(topic, set()).add(nxt)
    examples = []
    for i, (topic, context, nxt) in enumerate(cands):
        other = [s for s in pool if s not in by_topic[topic] and s not in context]
        other.sort(key=lambda s: (abs(len(s) - len(nxt)), s))  # similar length: no length cue
        distractors = rng.sample(other[:12], N_CHOICES - 1)
        label = rng.randrange(N_CHOICES)
        choices = [*distractors[:label], nxt, *distractors[label:]]
        examples.append(
            {"id": i, "topic": topic, "context": context, "choices": choices, "label": label}
        )
    return examples


def write_examples(cache_dir: str | Path | None = None) -> Path:
    """Writes the examples as JSONL (once per content digest) and returns the file."""
    from ..io import cache_root

    lines = "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in continuation_examples())
    digest = hashlib.sha256(f"{_VERSION}\n{lines}".encode()).hexdigest()[:16]
    path = (
        cache_root(str(cache_dir) if cache_dir else None) / "zero_shot" / f"{TASK}-{digest}.jsonl"
    )
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(lines, encoding="utf-8")
        os.replace(tmp, path)  # atomic: a concurrent run sees the whole file or none
    return path


def task_config(cache_dir: str | Path | None = None) -> dict[str, Any]:
    """The lm-eval (0.4) task config of ``slim_continuation`` (an inline task dict)."""
    path = write_examples(cache_dir)
    return {
        "task": TASK,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(path)}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{context}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{label}}",
        "target_delimiter": " ",
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
        "metadata": {"version": float(_VERSION)},
    }
