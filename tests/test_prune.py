"""Masks (N:M, unstructured) and scores (magnitude, Wanda). SparseGPT: test_sparsegpt.py."""

import pytest
import torch

from slim_lightning.core.prune import (
    magnitude_score,
    make_mask,
    nm_mask,
    unstructured_mask,
    wanda_score,
)
from slim_lightning.core.types import PrunerSpec, SparsitySpec

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_nm_keeps_exactly_n(n, m):
    torch.manual_seed(0)
    score = torch.rand(17, 64)
    mask = nm_mask(score, n, m)
    groups = mask.view(17, 64 // m, m)
    assert (groups.sum(-1) == n).all()
    # the kept entries are the n largest of each group
    kept_min = torch.where(groups, score.view(17, -1, m), torch.inf).amin(-1)
    pruned_max = torch.where(~groups, score.view(17, -1, m), -torch.inf).amax(-1)
    assert (kept_min > pruned_max).all()


def test_nm_hand_case_and_error():
    score = torch.tensor([[0.1, 0.9, 0.5, 0.3, 4.0, 3.0, 2.0, 1.0]])
    assert nm_mask(score, 2, 4).tolist() == [[False, True, True, False, True, True, False, False]]
    with pytest.raises(ValueError, match=r"\(3, 10\)"):
        nm_mask(torch.rand(3, 10), 2, 4)


@pytest.mark.parametrize("ratio", [0.5, 0.3, 0.9])
def test_unstructured_exact_per_row(ratio):
    torch.manual_seed(1)
    score = torch.rand(9, 70)
    mask = unstructured_mask(score, ratio)
    assert (mask.sum(1) == 70 - round(ratio * 70)).all()
    kept_min = torch.where(mask, score, torch.inf).amin(1)
    pruned_max = torch.where(~mask, score, -torch.inf).amax(1)
    assert (kept_min > pruned_max).all()


def test_scores_and_make_mask():
    w = torch.tensor([[1.0, -2.0, 3.0, -4.0]])
    stat = torch.tensor([16.0, 4.0, 1.0, 0.0])
    assert wanda_score(w, stat).tolist() == [[4.0, 4.0, 3.0, 0.0]]
    assert magnitude_score(w).tolist() == [[1.0, 2.0, 3.0, 4.0]]
    sp = SparsitySpec("nm", 2, 4)
    assert make_mask(w, stat, sp, PrunerSpec("wanda")).tolist() == [[True, True, False, False]]
    assert make_mask(w, None, sp, PrunerSpec("magnitude")).tolist() == [[False, False, True, True]]
    assert make_mask(w, stat, SparsitySpec("dense"), PrunerSpec()) is None
    with pytest.raises(ValueError):
        make_mask(w, stat, sp, PrunerSpec("sparsegpt"))


def test_zero_statistic_is_an_error_for_wanda():
    # an all-zero statistic carries no calibration signal: every Wanda score would tie at 0 and
    # the mask would be arbitrary, so this is an error, never a silent fallback to magnitude
    w = torch.randn(4, 8)
    with pytest.raises(ValueError, match="all zero"):
        wanda_score(w, torch.zeros(8))
    with pytest.raises(ValueError, match="non-finite"):
        wanda_score(w, torch.tensor([1.0] * 7 + [float("nan")]))
    # partly zero is legitimate (dead inputs): those columns score 0 and are pruned first
    stat = torch.ones(8)
    stat[[0, 4]] = 0.0
    m = make_mask(w, stat, SparsitySpec("nm", 2, 4), PrunerSpec("wanda"))
    assert not m[:, 0].any() and not m[:, 4].any()
