"""Dice, AUROC, AUPRC and the threshold sweep, checked against scikit-learn."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import average_precision_score, roc_auc_score

from napari_whatishealthy.core.errors import WhatIsHealthyError
from napari_whatishealthy.core.metrics import (
    auprc,
    auroc,
    dice,
    rank_scores,
    score_summary,
    threshold_sweep,
)


def test_dice_known_arrays() -> None:
    a = np.array([1, 1, 0, 0], bool)
    b = np.array([1, 0, 1, 0], bool)
    assert dice(a, b) == 0.5
    assert dice(a, a) == 1.0
    assert dice(a, ~a) == 0.0
    assert dice(np.zeros(4), np.zeros(4)) == 1.0  # both empty: documented convention
    assert dice(np.zeros(4), a) == 0.0
    assert dice(np.array([0, 2, 3]), np.array([0, 1, 0])) == 2 * 1 / (2 + 1)  # nonzero = in
    with pytest.raises(WhatIsHealthyError):
        dice(a, a[:2])


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("ties", [False, True])
def test_auroc_auprc_agree_with_sklearn(seed: int, ties: bool) -> None:
    rng = np.random.default_rng(seed)
    n = 3000
    truth = rng.random(n) < 0.1
    scores = rng.normal(size=n) + 1.2 * truth
    if ties:
        scores = np.round(scores, 1)  # many tied scores, across both classes
    scores = scores.astype(np.float32)
    assert auroc(scores, truth) == pytest.approx(roc_auc_score(truth, scores), abs=1e-12)
    assert auprc(scores, truth) == pytest.approx(average_precision_score(truth, scores), abs=1e-12)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.booleans()), min_size=2, max_size=40))
def test_agreement_on_small_heavily_tied_inputs(pairs) -> None:
    scores = np.array([p[0] for p in pairs], np.float64)
    truth = np.array([p[1] for p in pairs])
    if truth.all() or not truth.any():
        assert math.isnan(auroc(scores, truth))
        return
    assert auroc(scores, truth) == pytest.approx(roc_auc_score(truth, scores), abs=1e-12)
    assert auprc(scores, truth) == pytest.approx(average_precision_score(truth, scores), abs=1e-12)


def test_degenerate_inputs_are_nan_not_errors() -> None:
    scores = np.array([0.1, 0.5, 0.9])
    none = np.zeros(3, bool)
    assert math.isnan(auroc(scores, none))
    assert math.isnan(auprc(scores, none))
    assert math.isnan(auroc(scores, ~none))
    assert auprc(scores, ~none) == 1.0
    t, d, table = threshold_sweep(scores, none, 4)
    assert math.isnan(t) and math.isnan(d)
    assert table["dice"][-1] in (0.0, 1.0)
    with pytest.raises(WhatIsHealthyError):
        auroc(np.array([np.nan, 1.0]), np.array([True, False]))


def test_sweep_finds_the_planted_threshold() -> None:
    rng = np.random.default_rng(3)
    shape = (40, 40, 20)
    truth = np.zeros(shape, bool)
    truth[10:20, 10:20, 5:12] = True
    scores = np.where(truth, rng.uniform(0.5, 1.0, shape), rng.uniform(0.0, 0.45, shape))
    scores = scores.astype(np.float32)
    best_t, best_d, table = threshold_sweep(scores, truth)
    assert best_d == 1.0 and 0.45 <= best_t < 0.5
    assert dice(scores > best_t, truth) == 1.0
    best_t, best_d, table = threshold_sweep(scores, truth, 100)
    assert best_d == 1.0 and 0.45 <= best_t < 0.5 and table["threshold"].size == 100
    assert np.all(np.diff(table["threshold"]) > 0)
    _, _, table = threshold_sweep(scores, truth, [0.2, 0.7])
    assert table["dice"][0] == pytest.approx(dice(scores > 0.2, truth))
    assert table["tp"][1] == np.count_nonzero((scores > 0.7) & truth)


def test_exact_sweep_is_optimal_and_its_thresholds_work_in_float32() -> None:
    rng = np.random.default_rng(7)
    truth = rng.random(4000) < 0.2
    scores = (rng.normal(size=4000) + truth).astype(np.float32)
    scores[:50] = scores[50]  # ties
    best_t, best_d, table = threshold_sweep(scores, truth)
    # each row's Dice is what the mask at that (float32-applied) threshold really gets
    for t, d in zip(table["threshold"][::37], table["dice"][::37], strict=False):
        assert dice(scores > np.float32(t), truth) == pytest.approx(d)
    # no threshold at all does better: try every distinct score as a cut
    levels = np.unique(scores)
    brute = max(dice(scores >= v, truth) for v in levels)
    assert best_d == pytest.approx(brute)
    assert dice(scores > best_t, truth) == pytest.approx(best_d)


def test_summary_and_shapes() -> None:
    rng = np.random.default_rng(1)
    truth = rng.random((30, 30)) < 0.3
    scores = rng.random((30, 30)) + truth
    s = score_summary(scores, truth, threshold=0.9)
    assert s["auroc"] == pytest.approx(roc_auc_score(truth.ravel(), scores.ravel()))
    assert s["dice"] == pytest.approx(dice(scores > 0.9, truth))
    r = rank_scores(scores, truth)
    assert auroc(r) == s["auroc"] and auprc(r) == s["auprc"]
    with pytest.raises(WhatIsHealthyError):
        auroc(scores, truth[:3])


def test_fast_on_millions_of_voxels() -> None:
    import time

    rng = np.random.default_rng(0)
    n = 2_000_000
    truth = rng.random(n) < 0.01
    scores = (rng.random(n) + 0.5 * truth).astype(np.float32)
    t0 = time.perf_counter()
    score_summary(scores, truth)
    assert time.perf_counter() - t0 < 3.0  # one sort; about 0.3 s here
