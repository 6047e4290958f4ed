"""Perplexity on hand-checkable models."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from slim_lightning.data.evaluation import per_window_nll, perplexity


class Uniform(nn.Module):
    """Predicts the uniform distribution over ``v`` tokens: perplexity is exactly ``v``."""

    def __init__(self, v: int):
        super().__init__()
        self.v = v
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, input_ids, use_cache=False):
        b, t = input_ids.shape
        return (torch.zeros(b, t, self.v) + self.dummy,)


class Copy(nn.Module):
    """Puts probability p on "next = current + 1" and spreads the rest uniformly."""

    def __init__(self, v: int, p: float):
        super().__init__()
        self.v, self.p = v, p
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, input_ids, use_cache=False):
        q = (1 - self.p) / (self.v - 1)
        probs = torch.full((*input_ids.shape, self.v), q)
        probs.scatter_(-1, ((input_ids + 1) % self.v)[..., None], self.p)
        return (probs.log(),)


def test_uniform_model_has_perplexity_v():
    windows = torch.randint(0, 50, (6, 9))
    out = perplexity(Uniform(50), windows, batch_size=4, progress=False)
    assert out["n_tokens"] == 6 * 8
    assert out["ppl"] == pytest.approx(50.0, rel=1e-6)


def test_hand_computed_mixture():
    v, p = 10, 0.5
    # window 1 follows the rule at every step, window 2 never does
    w = torch.tensor([[0, 1, 2, 3], [0, 0, 0, 0]])
    nll, n = per_window_nll(Copy(v, p), w, reduction="none")
    assert n == 6
    q = (1 - p) / (v - 1)
    assert nll.tolist() == pytest.approx([-3 * math.log(p), -3 * math.log(q)], rel=1e-5)
    out = perplexity(Copy(v, p), w, progress=False)
    assert out["ppl"] == pytest.approx(math.exp(-(3 * math.log(p) + 3 * math.log(q)) / 6), rel=1e-5)


def test_batching_does_not_change_the_result():
    from slim_lightning.models.tiny import tiny_model

    model, _ = tiny_model("llama")
    w = torch.randint(0, 250, (5, 12))
    a = perplexity(model, w, batch_size=1, progress=False)["ppl"]
    b = perplexity(model, w, batch_size=5, progress=False)["ppl"]
    assert a == pytest.approx(b, rel=1e-5)
    model.train()  # the caller's mode is restored after evaluation
    perplexity(model, w, progress=False)
    assert model.training


def test_rejects_bad_windows():
    with pytest.raises(ValueError, match="seqlen"):
        perplexity(Uniform(3), torch.zeros(4, 1, dtype=torch.long), progress=False)


def test_training_nll_equals_per_window_nll_and_its_gradient():
    from slim_lightning.data.evaluation import per_window_nll, training_nll
    from slim_lightning.models.tiny import tiny_model

    model, _ = tiny_model("llama")
    ids = torch.randint(0, 259, (2, 40), generator=torch.Generator().manual_seed(0))
    out = {}
    for name, fn in (("full", per_window_nll), ("chunked", training_nll)):
        model.zero_grad()
        kw = {"chunk_tokens": 16} if name == "chunked" else {}
        nll, n = fn(model, ids, **kw)
        nll.backward()
        out[name] = (
            nll.detach(),
            n,
            model.lm_head.weight.grad.clone(),
            model.model.layers[0].mlp.up_proj.weight.grad.clone(),
        )
    assert out["full"][1] == out["chunked"][1] == 2 * 39
    for a, b in zip(out["full"], out["chunked"]):
        if torch.is_tensor(a):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("cache", "keep"), [(False, True), (False, False), (True, True)])
def test_packed_head_nll_equals_the_module_path(monkeypatch, cache, keep):
    """A packed LM head (embeddings.bits) takes PackedHeadNLL in training_nll: vocabulary blocks
    dequantised once per pass give the same loss and input gradients as the head module through
    cross-entropy, with several vocabulary blocks and token chunks, a bias, and -100 ignored,
    whether the logits wait for the backward (``keep``) or are recomputed there."""
    from slim_lightning.data.evaluation import per_window_nll, training_nll
    from slim_lightning.models.tiny import tiny_model
    from slim_lightning.nn import functional as fn_ops
    from slim_lightning.nn.backend import set_dense_cache
    from slim_lightning.nn.embedding import quantize_embeddings
    from slim_lightning.nn.functional import PackedHeadNLL

    model, _ = tiny_model("llama")
    quantize_embeddings(model, 8, 16)
    set_dense_cache(model, cache)
    head = model.lm_head
    monkeypatch.setattr(fn_ops, "DEQUANT_STEP", 64 * 50)  # 259 rows -> 6 blocks of 50
    monkeypatch.setattr(fn_ops, "KEEP_LOGITS_BYTES", 1 << 30 if keep else 0)
    ids = torch.randint(0, 259, (2, 40), generator=torch.Generator().manual_seed(1))
    ids[0, 5] = 258  # the last row of the last (partial) block
    from slim_lightning.formats import PackedWeight

    decoded, real = [], PackedWeight.to_dense
    monkeypatch.setattr(PackedWeight, "to_dense", lambda pw: decoded.append(pw.shape) or real(pw))
    products, logits = [], fn_ops._head_logits
    monkeypatch.setattr(fn_ops, "_head_logits", lambda *a: products.append(1) or logits(*a))
    out = {}
    for name, fn in (("module", per_window_nll), ("blocks", training_nll)):
        model.zero_grad()
        kw = {"chunk_tokens": 16} if name == "blocks" else {}
        decoded.clear()
        nll, _ = fn(model, ids, **kw)
        nll.backward()
        out[name] = (nll.detach(), model.model.layers[0].mlp.up_proj.weight.grad.clone())
    if not cache:  # each of the 6 vocabulary blocks once forward, once backward
        assert sorted(decoded) == sorted([(50, 64)] * 5 * 2 + [(9, 64)] * 2)
    # 6 blocks x 5 chunks of 16 of the 78 tokens, forward; again in the backward unless kept
    assert len(products) == 30 * (1 if keep else 2)
    for a, b in zip(out["module"], out["blocks"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # direct: a bias and ignored targets, against F.cross_entropy over the module's logits
    head.bias = torch.randn(259)
    h = torch.randn(30, 64, requires_grad=True)
    target = torch.randint(0, 259, (30,), generator=torch.Generator().manual_seed(2))
    target[[3, 17]] = -100
    loss = PackedHeadNLL.apply(h, target, head, 7)
    (g,) = torch.autograd.grad(loss, h)
    h2 = h.detach().clone().requires_grad_(True)
    ref = torch.nn.functional.cross_entropy(head(h2).float(), target, reduction="sum")
    (g2,) = torch.autograd.grad(ref, h2)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(g, g2, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="vocabulary size 259"):
        PackedHeadNLL.apply(h, torch.full((30,), 259), head, 7)
