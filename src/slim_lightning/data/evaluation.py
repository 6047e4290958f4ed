"""Perplexity (shared by the plain loop and the Lightning validation step) and zero-shot tasks,
and the evaluation windows and loaders both ``compress.py`` and ``train.py`` use.

Perplexity protocol (SparseGPT/Wanda/SLiM): the evaluation text is cut into non-overlapping
windows of ``seqlen`` tokens; inside each window token t+1 is predicted from tokens <= t (no
context crosses a window boundary); ``ppl = exp(total NLL / total predicted tokens)``. Every window
contributes ``seqlen - 1`` tokens, so this equals the reference's mean of per-window mean losses.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import ZERO_SHOT_TASKS


def _logits(out: Any) -> torch.Tensor:
    if hasattr(out, "logits"):
        return out.logits
    return out[0] if isinstance(out, (tuple, list)) else out


def per_window_nll(
    model: nn.Module, batch: torch.Tensor, reduction: str = "sum"
) -> tuple[torch.Tensor, int]:
    """Summed next-token NLL of token windows (fp32), and the number of predicted tokens.

    Args:
        model: causal LM; ``model(input_ids=...)`` returns logits ``(b, T, V)`` (or an object /
            tuple holding them).
        batch: int64 ``(b, T)`` token windows on the model's device.
        reduction: ``sum``: a 0-dim fp32 tensor, the NLL summed over the batch; ``none``: fp32
            ``(b,)``, the NLL summed inside each window.

    Returns:
        ``(nll, n_tokens)`` with ``n_tokens = b * (T - 1)``.
    """
    if reduction not in ("sum", "none"):
        raise ValueError(f"reduction must be 'sum' or 'none', got {reduction!r}")
    logits = _logits(model(input_ids=batch, use_cache=False))
    b, t = batch.shape
    # log-softmax in fp32: fp16/bf16 logits lose ~3 digits of the NLL otherwise
    shift = logits[:, :-1, :].float().reshape(b * (t - 1), -1)  # (b*(T-1), V)
    target = batch[:, 1:].reshape(-1)  # (b*(T-1),)
    nll = F.cross_entropy(shift, target, reduction="none").reshape(b, t - 1).sum(1)  # (b,)
    return (nll.sum() if reduction == "sum" else nll), b * (t - 1)


#: config fields of heads whose logits are more than ``lm_head(hidden)`` (Gemma 2/3 soft-capping,
#: Granite's and Cohere's logit scales): their models are evaluated through their own forward
_HEAD_TRANSFORMS = ("final_logit_softcapping", "logits_scaling", "logit_scale", "output_multiplier")


def plain_head(model: nn.Module) -> bool:
    """Whether the model's logits are exactly ``lm_head(base(ids)[0])``."""
    cfg = getattr(model, "config", None)
    get = getattr(cfg, "get_text_config", None)
    cfg = get() if callable(get) else cfg
    return all(getattr(cfg, k, None) in (None, 1, 1.0) for k in _HEAD_TRANSFORMS)


def training_nll(
    model: nn.Module, batch: torch.Tensor, chunk_tokens: int = 256
) -> tuple[torch.Tensor, int]:
    """Summed next-token NLL for training, without materialising full-vocabulary logits.

    The decoder runs once; the LM head and the fp32 log-softmax run on ``chunk_tokens`` rows at
    a time under activation checkpointing, so at most one chunk of ``(chunk, vocab)`` fp32
    logits exists at a time (forward and backward) instead of ``(b*T, vocab)`` logits plus
    their softmax. A packed head (``SLiMLinear`` without adapters, ``embeddings.bits``) runs
    through ``PackedHeadNLL`` instead: vocabulary blocks, each dequantised once per pass. Same
    value as :func:`per_window_nll` up to fp32 summation order. Models without a plain
    ``model.model`` + ``lm_head`` split fall back to :func:`per_window_nll`.

    Returns:
        ``(nll, n_tokens)``: 0-dim fp32 sum and ``b * (T - 1)``.
    """
    from torch.utils.checkpoint import checkpoint

    base = getattr(model, "model", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    from ..nn.linear import SLiMLinear

    linear_head = isinstance(head, (nn.Linear, SLiMLinear))  # SLiMLinear: embeddings.bits
    if base is None or not linear_head or not plain_head(model):
        return per_window_nll(model, batch)
    b, t = batch.shape
    hidden = base(input_ids=batch, use_cache=False)[0]  # (b, T, H)
    h = hidden[:, :-1, :].reshape(b * (t - 1), hidden.shape[-1])  # (b*(T-1), H)
    target = batch[:, 1:].reshape(-1)
    if isinstance(head, SLiMLinear) and head.rank == 0:
        # a packed head (embeddings.bits): vocabulary blocks, each dequantised once per pass
        from ..nn.functional import PackedHeadNLL

        return PackedHeadNLL.apply(h, target, head, chunk_tokens), b * (t - 1)

    def chunk_nll(hc: torch.Tensor, tc: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(head(hc).float(), tc, reduction="sum")

    total = hidden.new_zeros((), dtype=torch.float32)
    for s in range(0, h.shape[0], chunk_tokens):
        hc, tc = h[s : s + chunk_tokens], target[s : s + chunk_tokens]
        if torch.is_grad_enabled() and h.requires_grad:
            total = total + checkpoint(chunk_nll, hc, tc, use_reentrant=False)
        else:
            total = total + chunk_nll(hc, tc)
    return total, b * (t - 1)


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def perplexity(
    model: nn.Module,
    windows: torch.Tensor,
    batch_size: int = 1,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> dict[str, float | int]:
    """Perplexity of ``model`` on non-overlapping token windows.

    Args:
        model: causal LM (put in eval mode for the call; its mode and device are restored).
        windows: int64 ``(n, seqlen)`` (see ``data.eval_windows``).
        batch_size: windows per forward pass.
        device: where to run (default: where the model is).
        progress: show a tqdm bar.

    Returns:
        ``{"ppl": exp(nll), "nll": mean NLL per predicted token, "n_tokens": n * (seqlen - 1)}``.
    """
    from tqdm.auto import tqdm

    if windows.dim() != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows must be (n, seqlen>=2), got {tuple(windows.shape)}")
    home = _model_device(model)
    dev = torch.device(device) if device is not None else home
    was_training = model.training
    model.eval()
    model.to(dev)
    total = torch.zeros((), dtype=torch.float64)  # fp64 sum over up to ~10^6 tokens
    n_tokens = 0
    try:
        with torch.inference_mode():
            for i in tqdm(
                range(0, windows.shape[0], batch_size), desc="Perplexity", disable=not progress
            ):
                batch = windows[i : i + batch_size].to(dev)  # (b, seqlen)
                nll, n = per_window_nll(model, batch)
                total += nll.double().cpu()
                n_tokens += n
    finally:
        model.to(home)
        model.train(was_training)
    mean = float(total) / n_tokens
    return {
        "ppl": math.exp(mean) if mean < 700 else float("inf"),
        "nll": mean,
        "n_tokens": n_tokens,
    }


def make_eval_windows(tokenizer: Any, eval_cfg: Any) -> torch.Tensor:
    """Tokenised evaluation text cut into non-overlapping windows ``(n, seqlen)``."""
    from .text import eval_tokens, eval_windows

    return eval_windows(
        eval_tokens(tokenizer, eval_cfg), eval_cfg.seqlen, eval_cfg.max_windows, eval_cfg.where
    )


def eval_loader(windows: torch.Tensor, batch_size: int = 1) -> torch.utils.data.DataLoader:
    """A DataLoader over evaluation windows ``(n, seqlen)`` in order (``compress.py``)."""
    ds = torch.utils.data.TensorDataset(windows)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False)


def indexed_eval_loader(windows: torch.Tensor) -> torch.utils.data.DataLoader:
    """``(ids, index)`` batches of single evaluation windows, in order (``train.py``: the index
    de-duplicates the windows a distributed sampler repeats)."""
    from .datamodule import indexed_loader

    return indexed_loader(windows, 1, shuffle=False)


def zero_shot(
    model: nn.Module,
    tokenizer: Any,
    tasks: tuple[str, ...] | list[str] = ZERO_SHOT_TASKS,
    num_fewshot: int = 0,
    batch_size: int = 1,
    limit: float | None = None,
    device: str | None = None,
    cache_dir: str | None = None,
) -> dict[str, Any]:
    """Zero-shot accuracy with lm-eval-harness (optional dependency ``slim-lightning[eval]``).

    Args:
        model: a Hugging Face causal LM (compressed modules are fine: it is called, not reloaded).
        tokenizer: its tokenizer.
        tasks: lm-eval task names (the paper's six by default) and/or the offline local task
            ``slim_continuation`` (:mod:`.zeroshot_task`: built from the embedded evaluation
            text, no network).
        num_fewshot: 0 for the paper's zero-shot protocol.
        limit: examples per task (debug only; None = all).
        cache_dir: cache root for the local task's examples (see ``data.cache_root``).

    Returns:
        ``{"acc": {task: acc}, "acc_norm": {task: acc_norm or None}, "n": {task: examples
        scored}, "mean_acc": unweighted mean over tasks, "lm_eval_version": str,
        "num_fewshot": int, "limit": limit}`` (``acc`` is lm-eval's ``acc,none``; for a group
        such as ``mmlu`` it is lm-eval's own group aggregate).
    """
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise ImportError(
            "zero-shot evaluation needs lm-eval-harness: pip install 'slim-lightning[eval]' "
            "(or pip install lm-eval)"
        ) from e
    from .zeroshot_task import LOCAL_TASKS, task_config

    tasks = list(tasks)
    if not tasks:
        raise ValueError("zero_shot needs at least one task")
    hub = [t for t in tasks if t not in LOCAL_TASKS]
    # local tasks are inline configs; the index of lm-eval's own tasks is only built when needed
    specs: list[Any] = [task_config(cache_dir) if t in LOCAL_TASKS else t for t in tasks]
    kw: dict[str, Any] = {"pretrained": model, "tokenizer": tokenizer, "batch_size": batch_size}
    if device is not None:
        kw["device"] = device
    lm = HFLM(**kw)
    res = lm_eval.simple_evaluate(
        model=lm,
        tasks=specs,
        num_fewshot=num_fewshot,
        limit=limit,
        task_manager=TaskManager(include_defaults=bool(hub)),
        log_samples=False,
    )
    results = res["results"]
    acc = {t: float(results[t]["acc,none"]) for t in tasks}
    acc_norm = {
        t: float(results[t]["acc_norm,none"]) if "acc_norm,none" in results[t] else None
        for t in tasks
    }
    n_samples = res.get("n-samples", {})
    return {
        "acc": acc,
        "acc_norm": acc_norm,
        "n": {t: n_samples.get(t, {}).get("effective") for t in tasks},
        "mean_acc": sum(acc.values()) / len(acc),
        "lm_eval_version": getattr(lm_eval, "__version__", "unknown"),
        "num_fewshot": num_fewshot,
        "limit": limit,
    }


class _Replay(nn.Module):
    """Stands in for a model's decoder blocks: returns the last block's saved output."""

    def __init__(self, out: Any):
        super().__init__()
        self.out = out

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.out


@torch.no_grad()
def streaming_perplexity(
    model: nn.Module,
    windows: torch.Tensor,
    *,
    stream: Any,
    batch_size: int = 1,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> dict[str, float | int]:
    """``evaluation.perplexity`` of a streaming run's model, one block at a time: the dense
    model (blocks from the shards) or the compressed one (finished blocks from their offload
    files, ``StreamingSource.keep_offloaded``).

    The windows' hidden states go through block 0 (read from the shards, then evicted), then
    block 1, ...; the last block's outputs are fed to the model's own head (final norm, LM head,
    the fp32 NLL of ``per_window_nll``) by a stand-in for the block list. The same operations as
    a whole-model forward, so the same perplexity; the host holds the vocabulary tables, one
    block and the windows' hidden states. Blocks run on ``device``, the rest on the CPU.
    """
    import math

    from tqdm.auto import tqdm

    from ..data.evaluation import per_window_nll
    from ..models.arch import block_kwargs, block_output, capture_block_inputs, to_device

    if windows.dim() != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows must be (n, seqlen>=2), got {tuple(windows.shape)}")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    blocks = stream.blocks
    hidden, kwargs = capture_block_inputs(model, blocks, windows, batch_size)
    memo: dict[int, Any] = {}
    kwargs_dev = [to_device(kw, dev, memo) for kw in kwargs]
    outs: list[Any] = []
    for i in tqdm(range(len(blocks)), desc="Perplexity (streamed)", disable=not progress):
        block = blocks[i]
        stream.read_for_eval(i, block)
        block.to(dev)
        outs = [block(x.to(dev), **kw) for x, kw in zip(hidden, block_kwargs(kwargs_dev, i))]
        hidden = [block_output(o).to("cpu") for o in outs]
        stream.evict_block(block)
    last = [to_device(o, "cpu") for o in outs]
    del outs, hidden
    path = stream.arch.blocks_path
    total, n_tokens = torch.zeros((), dtype=torch.float64), 0
    try:
        for b, start in enumerate(range(0, windows.shape[0], batch_size)):
            model.set_submodule(path, nn.ModuleList([_Replay(last[b])]))
            nll, n = per_window_nll(model, windows[start : start + batch_size])
            total += nll.double()
            n_tokens += n
    finally:
        model.set_submodule(path, blocks)
    mean = float(total) / n_tokens
    return {
        "ppl": math.exp(mean) if mean < 700 else float("inf"),
        "nll": mean,
        "n_tokens": n_tokens,
    }
