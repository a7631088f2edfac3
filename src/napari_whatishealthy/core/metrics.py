"""Voxel-wise metrics: Dice, AUROC, AUPRC (average precision), threshold sweep.

Exact and sort-based: scores are split into positives and negatives and each half is sorted once
(``np.sort``, no argsort); every count then comes from ``np.searchsorted``. Ties are handled
exactly (AUROC counts a tied positive/negative pair as one half, like scikit-learn's
``roc_auc_score``; AUPRC steps over distinct score values, like ``average_precision_score``).
scikit-learn is not needed at runtime; the tests check agreement with it.

Conventions for degenerate inputs (documented, not errors):

- ``dice``: both masks empty -> 1.0 (nothing to find, nothing found).
- ``auroc``: no positives or no negatives -> nan.
- ``auprc``: no positives -> nan.
- ``threshold_sweep``: no positives -> best threshold and best Dice are nan (there is no lesion
  to choose a threshold for); the table still holds each threshold's Dice under the rule above.

A mask at threshold ``t`` is ``scores > t``, as in :func:`anomaly.make_mask`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .errors import WhatIsHealthyError

__all__ = ["auprc", "auroc", "dice", "rank_scores", "score_summary", "threshold_sweep"]


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two masks (nonzero = in). Both empty -> 1.0."""
    p = np.asarray(pred).astype(bool, copy=False)
    t = np.asarray(truth).astype(bool, copy=False)
    if p.shape != t.shape:
        raise WhatIsHealthyError(f"the masks differ in shape: {p.shape} and {t.shape}")
    inter = int(np.count_nonzero(p & t))
    total = int(np.count_nonzero(p)) + int(np.count_nonzero(t))
    return 1.0 if total == 0 else 2.0 * inter / total


@dataclass(frozen=True)
class RankedScores:
    """Scores split by truth and sorted once; reused by every metric of :func:`score_summary`."""

    positives: np.ndarray  # ascending
    negatives: np.ndarray  # ascending

    @property
    def n_pos(self) -> int:
        return int(self.positives.size)

    @property
    def n_neg(self) -> int:
        return int(self.negatives.size)


def rank_scores(scores: np.ndarray, truth: np.ndarray) -> RankedScores:
    """Flatten, check and sort: ``truth`` nonzero = positive. NaN scores are refused."""
    s = np.asarray(scores)
    t = np.asarray(truth)
    if s.shape != t.shape:
        raise WhatIsHealthyError(f"scores {s.shape} and truth {t.shape} differ in shape")
    if not np.issubdtype(s.dtype, np.number) or np.issubdtype(s.dtype, np.complexfloating):
        raise WhatIsHealthyError(f"scores must be real numbers, got dtype {s.dtype}")
    if np.issubdtype(s.dtype, np.bool_) or np.issubdtype(s.dtype, np.integer):
        s = s.astype(np.float64)
    s = s.ravel()
    t = t.astype(bool, copy=False).ravel()
    if np.isnan(s).any():
        raise WhatIsHealthyError("scores contain NaN")
    return RankedScores(positives=np.sort(s[t]), negatives=np.sort(s[~t]))


def _ranked(scores: np.ndarray | RankedScores, truth: np.ndarray | None) -> RankedScores:
    if isinstance(scores, RankedScores):
        return scores
    if truth is None:
        raise WhatIsHealthyError("truth is required unless the scores are already ranked")
    return rank_scores(scores, truth)


def auroc(scores: np.ndarray | RankedScores, truth: np.ndarray | None = None) -> float:
    """Area under the ROC curve (Mann-Whitney U / (P N), ties counted half); nan if P or N is 0."""
    r = _ranked(scores, truth)
    if r.n_pos == 0 or r.n_neg == 0:
        return float("nan")
    below = np.searchsorted(r.negatives, r.positives, side="left").sum(dtype=np.int64)
    below_or_tied = np.searchsorted(r.negatives, r.positives, side="right").sum(dtype=np.int64)
    # U = sum over positives of (#negatives below + half #negatives tied), kept in integers.
    return float((int(below) + int(below_or_tied)) / (2.0 * r.n_pos * r.n_neg))


def auprc(scores: np.ndarray | RankedScores, truth: np.ndarray | None = None) -> float:
    """Average precision: sum over distinct score levels v (descending) of
    (recall gained at v) * precision(scores >= v); nan without positives."""
    r = _ranked(scores, truth)
    if r.n_pos == 0:
        return float("nan")
    # Only levels holding positives add recall; each is taken once with its tie count.
    levels, counts = np.unique(r.positives, return_counts=True)
    tp = r.n_pos - np.searchsorted(r.positives, levels, side="left")
    fp = r.n_neg - np.searchsorted(r.negatives, levels, side="left")
    return float(np.sum(counts * (tp / (tp + fp))) / r.n_pos)


def _exact_candidates(r: RankedScores) -> np.ndarray:
    """For each distinct positive level v, a threshold t with ``scores > t`` == ``scores >= v``:
    the midpoint to the next lower score present, or that score itself where the midpoint rounds
    onto v in the scores' dtype (so the threshold works unchanged on float32 maps)."""
    levels = np.unique(r.positives)
    dtype = np.result_type(r.positives.dtype, r.negatives.dtype, np.float32)
    levels = levels.astype(dtype)
    lower = np.full(levels.shape, -np.inf, dtype=dtype)
    lower[1:] = levels[:-1]
    i = np.searchsorted(r.negatives, levels, side="left")
    has_neg = i > 0
    neg_below = np.where(has_neg, r.negatives[np.maximum(i - 1, 0)] if r.n_neg else 0, -np.inf)
    lower = np.maximum(lower, neg_below.astype(dtype))
    with np.errstate(invalid="ignore", over="ignore"):
        mid = (lower / 2 + levels / 2).astype(dtype)
    thresholds = np.where(mid < levels, mid, lower)
    nothing_below = ~np.isfinite(lower)
    thresholds[nothing_below] = np.nextafter(levels[nothing_below], dtype.type(-np.inf))
    return thresholds


def threshold_sweep(
    scores: np.ndarray | RankedScores,
    truth: np.ndarray | None = None,
    thresholds: int | Sequence[float] | np.ndarray | None = None,
) -> tuple[float, float, dict[str, np.ndarray]]:
    """Dice of ``scores > t`` for each threshold; returns ``(best_threshold, best_dice, table)``.

    ``thresholds``: None -> the exact optimum, trying every cut just below a distinct positive
    score (no other cut can be better: lowering a cut past negatives only adds false positives);
    an int n -> n thresholds evenly spaced from the lowest score up to (not including) the
    highest; a sequence -> those. ``table`` holds ascending arrays ``threshold``, ``dice``,
    ``tp``, ``fp``, ``fn``. Ties for the best Dice go to the lowest threshold.
    """
    r = _ranked(scores, truth)
    if thresholds is None:
        thr = _exact_candidates(r)
    elif isinstance(thresholds, int | np.integer) and not isinstance(thresholds, bool):
        if thresholds < 1:
            raise WhatIsHealthyError(f"need at least one threshold, got {thresholds}")
        both = [a for a in (r.positives, r.negatives) if a.size]
        if not both:
            raise WhatIsHealthyError("no scores to sweep")
        lo = min(float(a[0]) for a in both)
        hi = max(float(a[-1]) for a in both)
        thr = np.linspace(lo, hi, int(thresholds), endpoint=False)
    else:
        thr = np.sort(np.asarray(thresholds, dtype=np.float64).ravel())
        if thr.size == 0 or np.isnan(thr).any():
            raise WhatIsHealthyError("thresholds must be a non-empty list of numbers")
    tp = r.n_pos - np.searchsorted(r.positives, thr, side="right")
    fp = r.n_neg - np.searchsorted(r.negatives, thr, side="right")
    fn = r.n_pos - tp
    denom = 2 * tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        dsc = np.where(denom == 0, 1.0, 2.0 * tp / np.maximum(denom, 1))
    table = {
        "threshold": np.asarray(thr),
        "dice": dsc.astype(np.float64),
        "tp": tp.astype(np.int64),
        "fp": fp.astype(np.int64),
        "fn": fn.astype(np.int64),
    }
    if r.n_pos == 0 or thr.size == 0:
        return float("nan"), float("nan"), table
    best = int(np.argmax(dsc))
    return float(thr[best]), float(dsc[best]), table


def score_summary(
    scores: np.ndarray, truth: np.ndarray, threshold: float | None = None
) -> dict[str, float]:
    """AUROC, AUPRC, the best-Dice threshold and its Dice (and the Dice at ``threshold`` if
    given) from one sort: what ``evaluate`` reports per case and pooled."""
    r = rank_scores(scores, truth)
    best_t, best_d, _ = threshold_sweep(r)
    out = {
        "auroc": auroc(r),
        "auprc": auprc(r),
        "best_threshold": best_t,
        "best_dice": best_d,
        "positives": float(r.n_pos),
        "voxels": float(r.n_pos + r.n_neg),
    }
    if threshold is not None:
        out["dice"] = float(threshold_sweep(r, thresholds=[threshold])[2]["dice"][0])
    return out
