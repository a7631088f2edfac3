"""The widget's logic without Qt: the background job, the cached result, the mask and its edits.

Everything the widget shows after a run is recomputed from a :class:`ResultSession` on the main
thread in milliseconds: the mask from the cached difference map (``pipeline.threshold_region``),
the user's painted corrections on top of it, and the metrics against a ground truth. The job
(:func:`localize_job`) is a generator run by napari's thread worker; it yields progress and
touches no layer.

Arrays held here are in napari order ``(S, A, R)`` (the transpose of the canonical ``[X, Y, Z]``
the core works in), so they can be handed to layers as they are: :class:`NapariResult` keeps
those copies of a core result, made once.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ._layers import to_napari
from .core import metrics
from .core.errors import WhatIsHealthyError

AUTO = "auto"  # the model combo's automatic choice: core.model_choice.AUTO


# ------------------------------------------------------------------------------------------------
# The background job


@dataclass(frozen=True)
class StatusMessage:
    """A message from the job that is not a diffusion step (loading the model, preparing)."""

    text: str


@dataclass(frozen=True)
class JobFailed:
    """An expected failure (bad input, incompatible model, out of memory), as a message."""

    message: str
    error: BaseException | None = None


class InputCache:
    """The last stacked input volume and its prepared slices, reused while the input layers hold
    the same arrays: a preview at new settings then skips stacking (a 144 MB copy for BraTS) and
    preparing (brain mask, percentiles, slicing), about 0.4 s on a laptop CPU.

    The key holds the layers' arrays themselves (not just their ``id``), so an array cannot be
    freed and another take its ``id`` while it is cached. Replacing a layer's data gives a new
    key; editing an image layer's array in place is not detected (napari has no image painting).
    """

    def __init__(self) -> None:
        self._arrays: tuple[Any, ...] = ()
        self._data: np.ndarray | None = None
        self._prepared: dict[tuple[int, int], Any] = {}

    def data(self, arrays: Sequence[Any], build: Callable[[], np.ndarray]) -> np.ndarray:
        """The stacked volume of ``arrays`` (layer data in channel order), built once."""
        arrays = tuple(arrays)
        same = len(arrays) == len(self._arrays) and all(
            a is b for a, b in zip(arrays, self._arrays, strict=True)
        )
        if not same or self._data is None:
            self._arrays, self._data, self._prepared = arrays, build(), {}
        return self._data

    def prepared(self, data: np.ndarray, spec: Any) -> Any:
        """``pipeline.prepare_input(data, spec)``, kept per model size and channel count while
        ``data`` is the cached volume."""
        from .core import pipeline

        if data is not self._data:
            return pipeline.prepare_input(data, spec)
        key = (int(spec.image_size), int(spec.in_channels))
        if key not in self._prepared:
            self._prepared[key] = pipeline.prepare_input(data, spec)
        return self._prepared[key]

    def clear(self, *_: Any) -> None:
        self._arrays, self._data, self._prepared = (), None, {}


@dataclass
class JobRequest:
    """One run. ``overrides`` are LocalizeSettings fields. ``classifier``: a noisy-image
    classifier checkpoint for classifier guidance (None: classifier-free guidance); with one,
    ``method`` defaults to ``"classifier"``."""

    model: str | Path
    device: str
    data: np.ndarray  # [C, X, Y, Z] canonical float32, channels in the model's order
    overrides: dict[str, Any]
    z_slices: list[int] | None = None
    inputs: tuple[str, ...] = ()
    classifier: str | Path | None = None
    cache: InputCache | None = None  # reuses the prepared slices of the same data


def localize_job(request: JobRequest) -> Generator[Any, None, Any]:
    """Load the model (and the classifier, if any; both cached) and localize, yielding a
    StatusMessage or a pipeline Progress per step; returns the result ready to show (a
    :class:`NapariResult`), None when closed, or a :class:`JobFailed`."""
    from .core import counterfactual
    from .core.session import LocalizeSession

    try:
        yield StatusMessage("loading the model")
        session = LocalizeSession.load(request.model, request.device)
        overrides = dict(request.overrides)
        if request.classifier is not None:
            overrides.setdefault("method", "classifier")
        settings = session.settings(device=request.device, **overrides)
        if settings.method == "classifier":
            yield StatusMessage("loading the classifier")
        guide = session.load_guide(request.classifier, settings)
        # Instant once made; the first OpenVINO run of a model on this machine converts it.
        yield StatusMessage("preparing the network")
        session.network(settings)
        yield StatusMessage("preparing the slices")
        prepared = (request.cache.prepared(request.data, session.spec)
                    if request.cache is not None else None)
        gen = session.iter_localize(request.data, settings, guide, request.z_slices,
                                    inputs=request.inputs, prepared=prepared)
        result = yield from gen
        if result is None:
            return None
        yield StatusMessage("preparing the layers")
        return prepare_for_display(result)
    except WhatIsHealthyError as exc:
        return JobFailed(str(exc), exc)
    except Exception as exc:
        if counterfactual.is_out_of_memory(exc):
            return JobFailed(
                "out of memory: try the current-slice scope, the CPU device, or close other "
                f"programs using the GPU ({type(exc).__name__}: {str(exc).splitlines()[0]})",
                exc,
            )
        raise


# ------------------------------------------------------------------------------------------------
# The cached result, the mask and the user's edits


class NapariResult:
    """A core ``LocalizeResult`` as napari shows it: its arrays in napari's ``(S, A, R)`` order
    and the values derived from them for display, each made once and kept (the core result
    speaks only its canonical ``[X, Y, Z]``). Transposing a BraTS volume costs ~20 ms, as much
    as thresholding it, so :meth:`remask` thresholds these copies: a slider move never
    transposes."""

    def __init__(self, result: Any) -> None:
        self.result = result  # pipeline.LocalizeResult
        self.first_mask: tuple[MaskParams, np.ndarray] | None = None  # see prepare_for_display
        self._made: dict[str, Any] = {}

    def cached(self, key: str, make: Callable[[], Any]) -> Any:
        """``make()``, made once under ``key``."""
        if key not in self._made:
            self._made[key] = make()
        return self._made[key]

    def zyx(self, name: str) -> np.ndarray:
        """The result's ``difference``, ``brain`` or ``mask`` in napari order (C-contiguous)."""
        if name not in ("difference", "brain", "mask"):
            raise ValueError(f"no napari-order copy of {name!r}")
        return self.cached(name, lambda: to_napari(getattr(self.result, name)))

    def healthy(self, channel: int = 0) -> np.ndarray:
        """One channel of the healthy image in napari order."""
        return self.cached(f"healthy_{channel}",
                           lambda: to_napari(self.result.healthy[channel]))

    def remask(self, params: MaskParams) -> np.ndarray:
        """The uint8 napari-order mask of ``params``, computed on the napari-order copies (equal
        to the transpose of ``pipeline.remask`` of the result)."""
        from .core.pipeline import threshold_region
        from .core.settings import parse_threshold

        return threshold_region(
            self.zyx("difference"),
            float(parse_threshold(float(params.threshold))),  # type: ignore[arg-type]
            self.result.mask_region[::-1],
            self.zyx("brain") if params.brain_only else None,
            int(params.min_component_voxels),
        )


def prepare_for_display(result: Any, reference_channel: int = 0) -> NapariResult:
    """Compute in the worker thread what showing ``result`` needs (napari-order copies, display
    limits, the slider's range, the first mask): on a 1 mm volume these take most of a second,
    which the GUI thread would otherwise stall for when the run's layers are added."""
    view = NapariResult(result)
    session = ResultSession(view, "", reference_channel)
    session.healthy()
    session.difference()
    view.zyx("brain")
    session.difference_range()
    session.display_limits()
    session.histogram()
    params = MaskParams(float(result.threshold_used), int(result.settings.min_component_voxels),
                        bool(result.settings.brain_only))
    view.first_mask = (params, view.remask(params))
    return view


@dataclass
class MaskParams:
    threshold: float
    min_component_voxels: int = 0
    brain_only: bool = True


@dataclass
class ResultSession:
    """One run's result plus what the user did to its mask since.

    ``overrides`` holds the user's painted corrections: -1 where the user did not paint, else the
    value painted there. Painted voxels win over the threshold result, so moving the threshold
    never discards them; :meth:`discard_edits` drops them.
    """

    view: NapariResult
    source_name: str
    reference_channel: int = 0
    overrides: np.ndarray | None = None
    displayed: np.ndarray | None = None
    _auprc_cache: dict[Any, float] = field(default_factory=dict)

    @property
    def result(self) -> Any:
        """The core ``LocalizeResult`` (canonical ``[X, Y, Z]``)."""
        return self.view.result

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.result.mask.shape[::-1])  # type: ignore[return-value]

    # Layers' data -------------------------------------------------------------------------
    def healthy(self) -> np.ndarray:
        return self.view.healthy(self.reference_channel)

    def difference(self) -> np.ndarray:
        return self.view.zyx("difference")

    def difference_range(self) -> tuple[float, float]:
        """(0, a top for the threshold slider and the difference display)."""
        return self.view.cached("difference_range", self._difference_range)

    def _difference_range(self) -> tuple[float, float]:
        diff = self.result.difference
        inside = diff[self.result.brain] if self.result.brain.any() else diff.ravel()
        top = float(inside.max()) if inside.size else 0.0
        top = max(top, 2.0 * float(self.result.threshold_used), 1e-3)
        return 0.0, top

    def histogram(self) -> Any:
        """The brain's difference histogram with its threshold markers (core.lesions)."""
        from .core.lesions import difference_histogram

        return self.view.cached("histogram", lambda: difference_histogram(
            self.view.zyx("difference"), self.view.zyx("brain"),
            self.result.recommended_threshold, top=self.difference_range()[1]))

    def display_limits(self) -> tuple[float, float]:
        return self.view.cached("display_limits", self._display_limits)

    def _display_limits(self) -> tuple[float, float]:
        diff = self.result.difference
        positive = diff[diff > 0]
        if positive.size == 0:
            return 0.0, 1.0
        high = float(np.percentile(positive, 99.9))
        return 0.0, high if high > 0 else 1.0

    # Mask ---------------------------------------------------------------------------------
    def auto_mask(self, params: MaskParams) -> np.ndarray:
        """The threshold result of ``params`` (napari order): the worker's first mask once,
        when it matches, else the result's difference map thresholded again."""
        first, self.view.first_mask = self.view.first_mask, None
        if first is not None and first[0] == MaskParams(
                float(params.threshold), int(params.min_component_voxels),
                bool(params.brain_only)):
            return first[1]
        return self.view.remask(params)

    def mask(self, params: MaskParams) -> np.ndarray:
        """The mask to show: the threshold result with the painted voxels on top.

        Remembers what it returned, so that :meth:`record_edits` can tell painting apart.
        """
        mask = self.auto_mask(params)
        self._auto = None  # the threshold result under the edits (only needed when there are)
        if self.overrides is not None:
            self._auto = mask.copy()
            painted = self.overrides >= 0
            mask[painted] = self.overrides[painted].astype(np.uint8)
        self.displayed = mask.copy()
        return mask

    def record_edits(self, layer_data: Any) -> int:
        """Compare the layer with what was last shown; keep every changed voxel as an edit.

        Returns the number of voxels newly recorded.
        """
        if self.displayed is None:
            return 0
        data = np.asarray(layer_data)
        if data.shape != self.displayed.shape:
            return 0
        changed = data != self.displayed
        count = int(np.count_nonzero(changed))
        if count:
            if self.overrides is None:
                self.overrides = np.full(data.shape, -1, dtype=np.int16)
                self._auto = self.displayed.copy()  # no edits yet: what is shown is the result
            values = data[changed]
            kept = values.astype(np.int16)
            auto = getattr(self, "_auto", None)
            if auto is not None:  # put back to the threshold result (Ctrl+Z): no edit any more
                kept[values == auto[changed]] = -1
            self.overrides[changed] = kept
            self.displayed[changed] = values
        return count

    @property
    def n_edits(self) -> int:
        return 0 if self.overrides is None else int(np.count_nonzero(self.overrides >= 0))

    def discard_edits(self) -> None:
        self.overrides = None

    def adopt_edits(self, previous: ResultSession | None) -> bool:
        """Carry the painted voxels of a previous run over (same grid only)."""
        if previous is None or previous.overrides is None:
            return False
        if previous.overrides.shape != self.shape:
            return False
        self.overrides = previous.overrides.copy()
        return True

    # Metrics ------------------------------------------------------------------------------
    def evaluation_region(self) -> np.ndarray:
        """napari-order bool array: brain voxels on the slices this run processed."""
        brain = self.view.zyx("brain").copy()
        processed = np.zeros(brain.shape[0], dtype=bool)
        processed[np.asarray(self.result.processed_slices, dtype=int)] = True
        brain[~processed] = False
        return brain

    def dice(self, mask: np.ndarray, truth: np.ndarray) -> float:
        region = self.evaluation_region()
        return metrics.dice(np.asarray(mask)[region] > 0, np.asarray(truth)[region] > 0)

    def auprc(self, truth: np.ndarray, key: Any = None) -> float:
        """AUPRC of the difference map against ``truth`` on :meth:`evaluation_region` (cached by
        ``key``: it does not depend on the threshold)."""
        if key is not None and key in self._auprc_cache:
            return self._auprc_cache[key]
        region = self.evaluation_region()
        value = metrics.auprc(self.view.zyx("difference")[region], np.asarray(truth)[region] > 0)
        if key is not None:
            self._auprc_cache[key] = value
        return value


def format_metric(value: float) -> str:
    return "n/a" if value != value else f"{value:.3f}"


def mask_provenance(session: ResultSession, params: MaskParams) -> dict[str, Any]:
    return {
        "threshold": float(params.threshold),
        "min_component_voxels": int(params.min_component_voxels),
        "brain_only": bool(params.brain_only),
        "painted_voxels": session.n_edits,
        "recomputed": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
