"""Evaluation: Dice, AUROC and AUPRC per case and pooled, at three honestly labelled thresholds,
for the counterfactual method and for the FLAIR-intensity baseline.

What is scored
--------------
Voxels inside the brain only; ground truth is ``seg > 0`` (every BraTS label counts as lesion).
Two scores are compared on the same voxels:

* ``counterfactual``: the pipeline's difference map (model-space difference mapped back, median
  filtered), exactly what ``localize`` thresholds;
* ``flair_baseline``: the normalised FLAIR intensity (brain 99th percentile -> 1.0), median
  filtered with the same size. Bright lesions are easy for it; subtle ones are not.

Masks at a threshold are made as ``localize`` makes them (:func:`anomaly.make_mask`, restricted to
the brain, components under ``min_component_voxels`` dropped); Dice is computed from those masks.
AUROC and AUPRC use the raw scores (no threshold).

The three thresholds
--------------------
``default``
    counterfactual: the model spec's recommended threshold (or what ``--threshold`` says, Otsu
    per case included); baseline: 1.0 in normalised FLAIR units, the case's own brain 99th
    percentile (a raw intensity has no model to recommend a value).
``calibrated``
    with a calibration set: the threshold of best pooled voxel Dice on that set (a separate set
    of cases; the honest choice). Without one: the 99th percentile of the score over brain voxels
    of the *lesion-free axial slices of the evaluated cases*, i.e. at most 1 % of healthy-looking
    brain flagged. That needs the evaluated cases' segmentations to know which slices are
    lesion-free (only slice-level labels, the method's own supervision), so it is labelled as
    calibrated on the evaluated cases' healthy slices, not as held out.
``oracle``
    the threshold of best pooled voxel Dice on the evaluated set itself: what the literature
    often reports; optimistic, labelled so.

Thresholds are chosen on raw voxel scores (an exact sweep, :func:`metrics.threshold_sweep`) and
then applied through the full mask post-processing, so a reported oracle Dice can be a little
below the sweep's best.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .anomaly import healthy_percentile_threshold, make_mask, median_smooth
from .counterfactual import Progress
from .data import discover_cases
from .errors import InputError, WhatIsHealthyError
from .metrics import auprc, auroc, rank_scores, threshold_sweep
from .model import ModelSpec
from .pipeline import LocalizeSettings, iter_localize, prepare_input
from .preprocess import normalise
from .provenance import jsonable, versions
from .settings import is_integer
from .steps import drain

FORMAT = "napari-whatishealthy/evaluation/1"
METHODS = ("counterfactual", "flair_baseline")
THRESHOLDS = ("default", "calibrated", "oracle")
HEALTHY_PERCENTILE = 99.0  # calibration on healthy slices: at most 1 % of them flagged
BASELINE_DEFAULT = 1.0  # normalised FLAIR: the case's brain 99th percentile

__all__ = [
    "CaseScores",
    "METHODS",
    "THRESHOLDS",
    "case_kinds",
    "evaluate",
    "format_report",
    "score_case",
    "summarise",
]


@dataclass
class CaseScores:
    """Scores of one case over its brain voxels (1D, in ``brain[box]`` order)."""

    name: str
    kind: str  # typical | subtle | healthy (from cases.json) or lesion | healthy
    box: tuple[slice, ...]
    brain: np.ndarray  # bool, cropped to box
    truth: np.ndarray  # [V] bool
    lesion_free: np.ndarray  # [V] bool: voxel lies in an axial slice without lesion
    scores: dict[str, np.ndarray]  # method -> [V] float32
    default_threshold: dict[str, float]
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)

    @property
    def lesion_voxels(self) -> int:
        return int(self.truth.sum())

    @property
    def brain_voxels(self) -> int:
        return int(self.truth.size)

    def mask(self, method: str, threshold: float, min_component_voxels: int) -> np.ndarray:
        """The post-processed mask at ``threshold`` over the brain voxels ([V] bool)."""
        full = np.zeros(self.brain.shape, np.float32)
        full[self.brain] = self.scores[method]
        mask = make_mask(full, threshold, brain_mask=self.brain,
                         min_component_voxels=min_component_voxels)
        return mask[self.brain].astype(bool)


def case_kinds(root: str | Path) -> dict[str, str]:
    """Case name -> kind from the ``cases.json`` that ``synth`` writes (empty if absent)."""
    root = Path(root)
    for candidate in (root / "cases.json", root.parent / "cases.json"):
        if candidate.is_file():
            try:
                manifest = json.loads(candidate.read_text())
                return {str(c["name"]): str(c["kind"]) for c in manifest.get("cases", [])}
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
                return {}
    return {}


def _box(mask: np.ndarray) -> tuple[slice, ...]:
    if not mask.any():
        return tuple(slice(0, 0) for _ in mask.shape)
    box = []
    for axis in range(mask.ndim):
        others = tuple(i for i in range(mask.ndim) if i != axis)
        hits = np.flatnonzero(mask.any(axis=others))
        box.append(slice(int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)


def score_case(
    volume: Any,
    model: Any,
    spec: ModelSpec,
    settings: LocalizeSettings,
    kind: str | None = None,
    on_step: Callable[[Progress], Any] | None = None,
    classifier: Any = None,
    z_stride: int = 1,
) -> CaseScores:
    """Run the pipeline on one case (a Volume with a segmentation) and keep its brain scores.

    ``classifier``: the noisy-image classifier for ``settings.method == "classifier"``.
    ``z_stride`` k > 1 runs and scores every k-th processed axial slice only (a sweep over many
    settings at 1/k of the cost; every method is scored on the same voxels)."""
    if volume.segmentation is None:
        raise InputError(
            f"{volume.name}: no segmentation (<case>_seg.nii.gz); evaluation needs the ground truth"
        )
    started = time.time()
    volume = volume.select(spec.modalities)
    if not is_integer(z_stride) or z_stride < 1:
        raise WhatIsHealthyError(f"the slice stride must be an integer >= 1, got {z_stride!r}")
    prepared = prepare_input(volume.data, spec)
    z_slices = None if z_stride == 1 else prepared.slice_index[::z_stride].tolist()
    gen = iter_localize(model, spec, volume.data, settings, z_slices, classifier=classifier,
                        prepared=prepared)
    result = drain(gen, on_step)
    brain = result.brain
    if z_slices is not None:  # score only the slices that were run
        brain = brain.copy()
        brain[..., np.setdiff1d(np.arange(brain.shape[2]), z_slices)] = False
    box = _box(brain)
    brain_box = brain[box]
    lesion = volume.segmentation > 0
    truth = lesion[box][brain_box]
    lesion_z = lesion.any(axis=(0, 1))
    lesion_free = np.broadcast_to(~lesion_z, brain.shape)[box][brain_box]
    flair_index = spec.modalities.index("flair") if "flair" in spec.modalities else 0
    flair, _ = normalise(volume.data[[flair_index]], brain)
    flair = median_smooth(flair[0], settings.median_size, slice_axis=-1)
    if kind is None:
        kind = "lesion" if truth.any() else "healthy"
    return CaseScores(
        name=volume.name,
        kind=kind,
        box=box,
        brain=brain_box,
        truth=truth,
        lesion_free=np.ascontiguousarray(lesion_free),
        scores={
            "counterfactual": result.difference[box][brain_box].astype(np.float32),
            "flair_baseline": flair[box][brain_box].astype(np.float32),
        },
        default_threshold={
            "counterfactual": result.threshold_used,
            "flair_baseline": BASELINE_DEFAULT,
        },
        seconds=round(time.time() - started, 3),
        warnings=list(result.warnings),
    )


def _pooled(cases: Sequence[CaseScores], method: str) -> tuple[np.ndarray, np.ndarray]:
    scores = np.concatenate([c.scores[method] for c in cases]) if cases else np.zeros(0)
    truth = np.concatenate([c.truth for c in cases]) if cases else np.zeros(0, bool)
    return scores, truth


def _none_if_nan(value: float) -> float | None:
    return None if value is None or not np.isfinite(value) else float(value)


def _choose_thresholds(
    cases: Sequence[CaseScores],
    calibration: Sequence[CaseScores] | None,
    settings: LocalizeSettings,
    calibration_name: str | None,
) -> dict[str, dict[str, dict[str, Any]]]:
    chosen: dict[str, dict[str, dict[str, Any]]] = {}
    for method in METHODS:
        entry: dict[str, dict[str, Any]] = {}
        if method == "counterfactual":
            per_case = {c.default_threshold[method] for c in cases}
            value = per_case.pop() if len(per_case) == 1 else None
            if settings.threshold == "auto":
                label = "model default: the spec's recommended threshold"
            elif settings.threshold == "otsu":
                label = "Otsu's threshold per case"
            else:
                label = f"given threshold {settings.threshold}"
            entry["default"] = {"value": value, "per_case": value is None, "label": label}
        else:
            entry["default"] = {
                "value": BASELINE_DEFAULT,
                "per_case": False,
                "label": "fixed 1.0 in normalised FLAIR units (each case's brain 99th "
                         "percentile)",
            }
        if calibration:
            scores, truth = _pooled(calibration, method)
            best_t, best_d, _ = threshold_sweep(rank_scores(scores, truth))
            entry["calibrated"] = {
                "value": _none_if_nan(best_t),
                "per_case": False,
                "label": f"calibrated: best pooled Dice on the calibration set "
                         f"{calibration_name} ({len(calibration)} cases, held out)",
                "calibration_dice": _none_if_nan(best_d),
            }
        else:
            scores = np.concatenate([c.scores[method] for c in cases])
            region = np.concatenate([c.lesion_free for c in cases])
            value = (healthy_percentile_threshold(scores, region, HEALTHY_PERCENTILE)
                     if region.any() else None)
            entry["calibrated"] = {
                "value": value,
                "per_case": False,
                "label": "calibrated on healthy slices: 99th percentile of the score over brain "
                         "voxels of the lesion-free axial slices of the EVALUATED cases (uses "
                         "their slice-level labels; not a held-out calibration)",
            }
        scores, truth = _pooled(cases, method)
        best_t, best_d, _ = threshold_sweep(rank_scores(scores, truth))
        entry["oracle"] = {
            "value": _none_if_nan(best_t),
            "per_case": False,
            "label": "optimistic (oracle): best pooled Dice on the evaluated set itself",
            "sweep_dice": _none_if_nan(best_d),
        }
        chosen[method] = entry
    return chosen


def _threshold_for(case: CaseScores, method: str, name: str, chosen: dict) -> float | None:
    entry = chosen[method][name]
    if entry["per_case"]:
        return case.default_threshold[method]
    return entry["value"]


Counts = dict[str, dict[str, list[tuple[int, int, int, int] | None]]]


def _counts(cases: Sequence[CaseScores], chosen: dict, settings: LocalizeSettings) -> Counts:
    """counts[method][threshold][case] = (tp, fp, fn, flagged); None where a case has no
    threshold of that kind."""
    counts: Counts = {}
    for method in METHODS:
        counts[method] = {}
        for name in THRESHOLDS:
            row: list[tuple[int, int, int, int] | None] = []
            for c in cases:
                t = _threshold_for(c, method, name, chosen)
                if t is None:
                    row.append(None)
                    continue
                pred = c.mask(method, t, settings.min_component_voxels)
                tp = int(np.count_nonzero(pred & c.truth))
                fp = int(np.count_nonzero(pred & ~c.truth))
                fn = int(np.count_nonzero(~pred & c.truth))
                row.append((tp, fp, fn, tp + fp))
            counts[method][name] = row
    return counts


def _per_case(cases: Sequence[CaseScores], counts: Counts, chosen: dict) -> list[dict[str, Any]]:
    per_case: list[dict[str, Any]] = []
    for c in cases:
        per_case.append({
            "name": c.name, "kind": c.kind, "lesion_voxels": c.lesion_voxels,
            "brain_voxels": c.brain_voxels, "seconds": c.seconds, "warnings": c.warnings,
        })
    for method in METHODS:
        for i, c in enumerate(cases):
            has_lesion = c.lesion_voxels > 0
            r = rank_scores(c.scores[method], c.truth) if has_lesion else None
            entry: dict[str, Any] = {
                "auroc": _none_if_nan(auroc(r)) if r is not None else None,
                "auprc": _none_if_nan(auprc(r)) if r is not None else None,
                "dice": {}, "flagged_fraction": {}, "threshold": {}, "volume_ratio": {},
            }
            for name in THRESHOLDS:
                cnt = counts[method][name][i]
                entry["threshold"][name] = _threshold_for(c, method, name, chosen)
                if cnt is None:
                    entry["dice"][name] = entry["flagged_fraction"][name] = None
                    continue
                tp, fp, fn, flagged = cnt
                entry["dice"][name] = 2 * tp / (2 * tp + fp + fn) if has_lesion else None
                entry["flagged_fraction"][name] = flagged / max(c.brain_voxels, 1)
                entry["volume_ratio"][name] = flagged / c.lesion_voxels if has_lesion else None
            per_case[i][method] = entry
    return per_case


def _pooled_group(cases: Sequence[CaseScores], members: list[int], method: str,
                  counts: Counts) -> dict[str, Any]:
    sub = [cases[i] for i in members]
    scores, truth = _pooled(sub, method)
    has_lesion = bool(truth.any())
    r = rank_scores(scores, truth) if has_lesion else None
    brain_voxels = int(truth.size)
    g: dict[str, Any] = {
        "cases": len(sub),
        "lesion_voxels": int(truth.sum()),
        "brain_voxels": brain_voxels,
        "auroc": _none_if_nan(auroc(r)) if r is not None else None,
        "auprc": _none_if_nan(auprc(r)) if r is not None else None,
        "dice": {}, "flagged_fraction": {}, "volume_ratio": {},
    }
    for name in THRESHOLDS:
        rows = [counts[method][name][i] for i in members]
        if any(x is None for x in rows):
            g["dice"][name] = g["flagged_fraction"][name] = g["volume_ratio"][name] = None
            continue
        tp, fp, fn, flagged = (sum(x[k] for x in rows) for k in range(4))  # type: ignore[index]
        g["dice"][name] = 2 * tp / (2 * tp + fp + fn) if has_lesion else None
        g["flagged_fraction"][name] = flagged / max(brain_voxels, 1)
        # Predicted / true lesion volume over the group's lesion cases (1 = right size).
        lesion_rows = [counts[method][name][i] for i in members if cases[i].lesion_voxels]
        g["volume_ratio"][name] = (sum(x[3] for x in lesion_rows) / int(truth.sum())  # type: ignore[index]
                                   if has_lesion else None)
    return g


def _healthy_flagged(cases: Sequence[CaseScores], controls: list[int],
                     counts: Counts) -> dict[str, Any]:
    healthy_flagged: dict[str, Any] = {}
    for method in METHODS:
        healthy_flagged[method] = {}
        for name in THRESHOLDS:
            rows = [counts[method][name][i] for i in controls]
            if not rows or any(x is None for x in rows):
                healthy_flagged[method][name] = None
                continue
            flagged = sum(x[3] for x in rows)  # type: ignore[index]
            total = sum(cases[i].brain_voxels for i in controls)
            healthy_flagged[method][name] = flagged / max(total, 1)
    return healthy_flagged


def summarise(
    cases: Sequence[CaseScores],
    settings: LocalizeSettings,
    calibration: Sequence[CaseScores] | None = None,
    calibration_name: str | None = None,
) -> dict[str, Any]:
    """Per-case and pooled metrics at the three thresholds for both methods (JSON-able)."""
    if not cases:
        raise WhatIsHealthyError("no cases to evaluate")
    chosen = _choose_thresholds(cases, calibration, settings, calibration_name)
    groups: dict[str, list[int]] = {"all": list(range(len(cases)))}
    for i, c in enumerate(cases):
        groups.setdefault(c.kind, []).append(i)
    counts = _counts(cases, chosen, settings)
    per_case = _per_case(cases, counts, chosen)
    pooled = {method: {group: _pooled_group(cases, members, method, counts)
                       for group, members in groups.items()} for method in METHODS}
    controls = [i for i, c in enumerate(cases) if c.lesion_voxels == 0]
    healthy_flagged = _healthy_flagged(cases, controls, counts)
    return {
        "thresholds": chosen,
        "pooled": pooled,
        "cases": per_case,
        "healthy_controls": {
            "cases": len(controls),
            "flagged_fraction": healthy_flagged,
        },
    }


SCORING = ("voxels inside the brain; truth = seg > 0; Dice from post-processed masks (median "
           "filter, brain restriction, small components removed); AUROC/AUPRC from raw scores")


def evaluate(
    data: str | Path,
    model: Any,
    spec: ModelSpec,
    settings: LocalizeSettings,
    *,
    calibration: str | Path | None = None,
    limit: int | None = None,
    calibration_limit: int | None = None,
    model_info: dict[str, Any] | None = None,
    on_case: Callable[[int, int, str, str], Any] | None = None,
    on_step: Callable[[Progress], Any] | None = None,
    classifier: Any = None,
    classifier_info: dict[str, Any] | None = None,
    z_stride: int = 1,
    shard: Any = None,
) -> dict[str, Any] | None:
    """Evaluate ``model`` on the cases under ``data`` (and calibrate on ``calibration``).

    ``shard`` (:class:`.sharding.Shard`, under torchrun): each rank scores its share of the
    cases and rank 0 gathers them and returns the report of all cases (None on other ranks).

    ``on_case(i, n, name, set)`` is called before each case (``set`` is ``"evaluate"`` or
    ``"calibration"``); ``on_step`` gets every diffusion step. ``classifier`` is needed for
    ``settings.method == "classifier"`` (``classifier_info``, e.g. its path and hash, goes into
    the report). ``z_stride`` k > 1: every k-th brain slice only (see :func:`score_case`).
    Returns the JSON-able report.
    """
    from .sharding import Shard, run_sharded
    from .volume import load_volume

    shard = shard or Shard()

    def run(root: str | Path, n_max: int | None, which: str) -> list[CaseScores] | None:
        dirs = discover_cases(root)
        if n_max is not None:
            if n_max < 1:
                raise WhatIsHealthyError("the case limit must be at least 1")
            dirs = dirs[:n_max]
        kinds = case_kinds(root)

        def one(i: int, d: Path) -> CaseScores:
            if on_case is not None:
                on_case(i, len(dirs), d.name, which)
            volume = load_volume(d)
            return score_case(volume, model, spec, settings,
                              kind=kinds.get(volume.name), on_step=on_step,
                              classifier=classifier, z_stride=z_stride)

        # Under torchrun each rank scores its cases; rank 0 gets them all, in case order.
        return shard.gather(run_sharded(dirs, shard, one))

    started = time.time()
    if calibration is not None and Path(calibration).resolve() == Path(data).resolve():
        raise WhatIsHealthyError(
            f"{calibration}: the calibration set is the evaluated set; give a separate folder "
            "(or leave --calibration out to calibrate on the lesion-free slices)"
        )
    calib_cases = run(calibration, calibration_limit, "calibration") if calibration else None
    cases = run(data, limit, "evaluate")
    if cases is None:  # not rank 0: its cases went to rank 0's report
        return None
    report: dict[str, Any] = {
        "format": FORMAT,
        "data": str(Path(data).resolve()),
        "calibration": str(Path(calibration).resolve()) if calibration else None,
        "model": model_info or {"name": spec.name},
        "settings": jsonable(settings),
        "z_stride": z_stride,
        "versions": versions(),
        **({"classifier": classifier_info or {"name": getattr(
            getattr(classifier, "spec", None), "name", None)}}
           if settings.method == "classifier" else {}),
        "scoring": SCORING,
    }
    calibration_name = str(calibration) if calibration else None
    report.update(summarise(cases, settings, calib_cases, calibration_name))
    report["seconds"] = round(time.time() - started, 1)
    return report


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


BASELINE_NOTE = (
    "best threshold = the one threshold of best pooled Dice on these cases, chosen per method "
    "(optimistic: what a threshold tuned on the test cases would give); FLAIR baseline = "
    "brain-normalised FLAIR intensity as the score, median filtered like the model's map"
)


def format_baseline_table(report: dict[str, Any]) -> str:
    """Markdown table: the model beside the FLAIR-intensity baseline, per kind of case and per
    case (AUPRC, Dice at the model's thresholds, both methods' best-threshold Dice, predicted /
    true lesion volume, and the share of brain flagged in healthy controls)."""
    cf, fl = "counterfactual", "flair_baseline"
    lines = [
        "| cases | kind | model AUPRC | FLAIR AUPRC | model Dice (default threshold) | "
        "model Dice (calibrated) | model Dice (best threshold) | FLAIR Dice (best threshold) | "
        "model predicted/true volume | brain flagged % (model / FLAIR best) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def pct(v: Any) -> str:
        return "-" if v is None else f"{100 * v:.2f}"

    def row(label: str, kind: str, m: dict, b: dict, flagged: tuple[Any, Any]) -> str:
        return (f"| {label} | {kind} | {_fmt(m['auprc'])} | {_fmt(b['auprc'])} | "
                f"{_fmt(m['dice']['default'])} | {_fmt(m['dice']['calibrated'])} | "
                f"{_fmt(m['dice']['oracle'])} | {_fmt(b['dice']['oracle'])} | "
                f"{_fmt(m.get('volume_ratio', {}).get('default'), 2)} | "
                f"{pct(flagged[0])} / {pct(flagged[1])} |")

    for group, m in report["pooled"][cf].items():
        b = report["pooled"][fl][group]
        flagged = (m["flagged_fraction"]["default"], b["flagged_fraction"]["oracle"])
        label = f"{group} ({m['cases']})"
        lines.append(row(label, "pooled", m, b, flagged if group == "healthy" else (None, None)))
    for case in report["cases"]:
        m, b = case[cf], case[fl]
        healthy = case["lesion_voxels"] == 0
        flagged = ((m["flagged_fraction"]["default"], b["flagged_fraction"]["oracle"])
                   if healthy else (None, None))
        lines.append(row(case["name"], case["kind"], m, b, flagged))
    lines.append("")
    lines.append(BASELINE_NOTE + ".")
    return "\n".join(lines)


def format_report(report: dict[str, Any]) -> str:
    """A plain-text summary: thresholds, pooled metrics per group, healthy controls."""
    lines: list[str] = []
    for method in METHODS:
        lines.append(f"== {method} ==")
        for name in THRESHOLDS:
            t = report["thresholds"][method][name]
            value = "per case" if t["per_case"] else _fmt(t["value"], 4)
            lines.append(f"  threshold {name:<10} {value:>9}  ({t['label']})")
        header = f"  {'group':<10} {'cases':>5} {'AUROC':>6} {'AUPRC':>6} " + " ".join(
            f"{'Dice@' + n:>15}" for n in THRESHOLDS
        ) + " " + " ".join(f"{'flag%@' + n:>16}" for n in THRESHOLDS)
        lines.append(header)
        for group, g in report["pooled"][method].items():
            dice = " ".join(f"{_fmt(g['dice'][n]):>15}" for n in THRESHOLDS)
            flag = " ".join(
                f"{_fmt(None if g['flagged_fraction'][n] is None else 100 * g['flagged_fraction'][n], 2):>16}"  # noqa: E501
                for n in THRESHOLDS
            )
            lines.append(f"  {group:<10} {g['cases']:>5} {_fmt(g['auroc']):>6} "
                         f"{_fmt(g['auprc']):>6} {dice} {flag}")
    hc = report["healthy_controls"]
    if hc["cases"]:
        lines.append(f"healthy controls ({hc['cases']} cases), % of brain voxels flagged:")
        for method in METHODS:
            parts = ", ".join(
                f"{n} {_fmt(None if v is None else 100 * v, 2)}"
                for n, v in hc["flagged_fraction"][method].items()
            )
            lines.append(f"  {method}: {parts}")
    return "\n".join(lines)
