"""The one pipeline both front ends call: volume -> healthy counterfactual -> difference -> mask.

``iter_localize`` runs the whole path on a canonical ``[C, X, Y, Z]`` volume and yields the
counterfactual's :class:`Progress` after every network call (so a GUI can show progress and stop
between steps); it *returns* a :class:`LocalizeResult`. ``localize`` runs it to the end.
``remask`` recomputes the mask of a result in milliseconds; ``threshold_region``, its core, works
in any axis order (the GUI threshold slider calls it on napari's ``[Z, Y, X]`` copies, which the
napari layer keeps: the result itself speaks only ``[X, Y, Z]``). ``core.results.write_outputs``
writes a result next to its source grid (the CLI, and the widget's save).

Resolution and where each output is computed
--------------------------------------------
The network works on ``S x S`` model-space slices (64 x 64 for the default model), the input is
usually finer (240 x 240 for BraTS). Two choices follow from that:

* The **difference** is computed in model space, ``|input_S - healthy_S|`` averaged over
  channels, where the input and its counterfactual are at the same resolution, and only then
  mapped back to the volume grid (bilinear, the exact inverse of the slicing and crop). Computing
  it at full resolution instead would count the resampling blur of every edge as anomaly.
  Axial slices that were not processed (no brain, or outside ``z_slices``) get 0.
* The **healthy image** is ``input - upsample(input_S - healthy_S)`` in normalised units, mapped
  back to the input's intensities: the full-resolution input minus the change the model made.
  Where the model changed nothing it is the input itself, voxel for voxel, with all its detail;
  where it removed a lesion the change appears at model resolution. Upsampling ``healthy_S``
  directly would blur the whole scan and make it differ from the input everywhere. The change is
  applied inside the brain only; the background stays exactly as in the input.

The difference (and so the threshold) is in normalised units: intensities divided by the brain's
99th percentile and mapped to [-1, 1], so 0.1 is 5 % of that percentile. It is median filtered
in-plane (``median_size``) before thresholding; the mask is restricted to the brain
(``brain_only``) and components smaller than ``min_component_voxels`` are dropped.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Generator, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .anomaly import (
    contrast_signs,
    difference_maps,
    edge_guided,
    erode_mask,
    in_plane_box,
    make_mask,
    median_smooth,
    otsu_threshold,
)
from .counterfactual import iter_counterfactual, model_device, network_description
from .device import resolve_device
from .device_outputs import DeviceOutputs, Outputs, choose_outputs
from .errors import InputError, WhatIsHealthyError
from .memory import check_memory
from .model import ModelSpec
from .preprocess import PreparedVolume, normalise_with, prepare, to_slices
from .preprocess import as_basic_slice as _as_slice
from .provenance import make_provenance
from .settings import THRESHOLD_CHOICES, LocalizeSettings, parse_threshold
from .steps import Progress, drain

__all__ = [
    "LocalizeResult",
    "LocalizeSettings",
    "Progress",
    "THRESHOLD_CHOICES",
    "iter_localize",
    "localize",
    "parse_threshold",
    "prepare_input",
    "remask",
    "resolve_threshold",
    "threshold_region",
]

@dataclass
class LocalizeResult:
    """One localization. Arrays are canonical RAS ``[..., X, Y, Z]`` like the input.

    ``difference`` is the anomaly score that is thresholded: the model-space difference mapped
    back and median filtered (normalised units, 0 on unprocessed slices). ``difference_per_channel``
    is the unsmoothed difference of each channel. ``healthy`` is in the input's intensity units.
    """

    healthy: np.ndarray  # [C, X, Y, Z] float32
    difference: np.ndarray  # [X, Y, Z] float32
    difference_per_channel: np.ndarray  # [C, X, Y, Z] float32
    mask: np.ndarray  # [X, Y, Z] uint8
    brain: np.ndarray  # [X, Y, Z] bool
    threshold_used: float
    settings: LocalizeSettings
    provenance: dict[str, Any]
    modalities: tuple[str, ...] = ()
    # With several noise levels: the per-voxel standard deviation of their difference maps.
    uncertainty: np.ndarray | None = None  # [X, Y, Z] float32
    processed_slices: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    recommended_threshold: float = 0.0
    warnings: list[str] = field(default_factory=list)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.mask.shape)  # type: ignore[return-value]

    @functools.cached_property
    def mask_region(self) -> tuple[slice, slice, slice]:
        """The box ``[X, Y, Z]`` outside which no mask voxel can be set: the range of processed
        axial slices within the brain's bounding box (empty when there is no brain). The
        difference is 0 outside the brain and on unprocessed slices, so thresholding only ever
        looks in here (about 40 % of a BraTS volume). Made once: the slider asks on every move."""
        from .anomaly import bounding_box

        box = bounding_box(self.brain)
        if box is None:
            return (slice(0, 0),) * 3
        return _intersect(_processed_range(self.processed_slices), box)  # type: ignore[return-value]


def resolve_threshold(
    threshold: float | str | None,
    difference: np.ndarray,
    brain: np.ndarray,
    recommended: float,
) -> float:
    """The number a threshold setting means for this difference map."""
    value = parse_threshold(threshold)
    if value is None or value == "auto":
        return float(recommended)
    if value == "otsu":
        inside = difference[brain]
        if inside.size == 0:
            return float(recommended)
        return float(otsu_threshold(inside))
    return float(value)


def remask(
    result: LocalizeResult,
    threshold: float | str | None = None,
    min_component_voxels: int | None = None,
    brain_only: bool = True,
) -> np.ndarray:
    """A new uint8 ``[X, Y, Z]`` mask from ``result.difference`` (``result`` is not changed).

    ``threshold``: a number, ``"auto"``, ``"otsu"`` or None (``result.threshold_used``);
    ``min_component_voxels`` None keeps the result's setting; ``"otsu"`` is computed over the
    brain voxels of the processed slices. Milliseconds on a BraTS volume. A front end that holds
    the arrays in another axis order calls :func:`threshold_region` on its own copies.
    """
    region = _processed_range(result.processed_slices)
    if threshold is None:
        value = result.threshold_used
    else:
        value = resolve_threshold(
            threshold, result.difference[region], result.brain[region],
            result.recommended_threshold,
        )
    if min_component_voxels is None:
        min_component_voxels = result.settings.min_component_voxels
    return threshold_region(result.difference, value, result.mask_region,
                            result.brain if brain_only else None, int(min_component_voxels))


def threshold_region(
    difference: np.ndarray,
    threshold: float,
    region: tuple[slice, ...],
    brain: np.ndarray | None = None,
    min_component_voxels: int = 0,
) -> np.ndarray:
    """A uint8 mask the shape of ``difference``: :func:`make_mask` inside ``region`` (a box of
    slices), 0 outside it. Any axis order: ``difference``, ``brain`` (None: not restricted to it)
    and ``region`` only have to agree, so a viewer can keep its own transposed copies and never
    transpose on a threshold change. Components are found within ``region``: pass a box outside
    which nothing can be above the threshold (:attr:`LocalizeResult.mask_region`, reversed for
    ``[Z, Y, X]`` arrays)."""
    mask = np.zeros(difference.shape, dtype=np.uint8)
    mask[region] = make_mask(
        difference[region],
        threshold,
        brain_mask=brain[region] if brain is not None else None,
        min_component_voxels=int(min_component_voxels),
    )
    return mask


def _check_finite_weights(network: Any, path: str | Path | None, what: str) -> None:
    """Refuse a network with NaN or infinite weights before it runs (its output would be NaN)."""
    parameters = getattr(network, "parameters", None)
    if parameters is None:
        return
    with torch.no_grad():
        named = [(n, t) for n, t in getattr(network, "named_parameters", lambda: [])()
                 if t.is_floating_point()]
        # One wait for all of them: on a GPU each bool() waits for the device.
        first = named[0][1].device if named else None
        if not named or bool(torch.stack([torch.isfinite(t).all().to(first)
                                          for _, t in named]).all()):
            return
        name = next(n for n, t in named if not bool(torch.isfinite(t).all()))
        where = f" {path}" if path else ""
        raise WhatIsHealthyError(
            f"the {what}{where} has NaN or infinite weights (in {name}); it cannot give a "
            "result: use another checkpoint"
        )


def _check_finite_result(healthy_s: np.ndarray, settings: LocalizeSettings) -> None:
    """Stop on a counterfactual with NaN or infinite values instead of writing an empty mask."""
    bad = int(np.size(healthy_s) - np.count_nonzero(np.isfinite(healthy_s)))
    if bad:
        share = 100.0 * bad / max(1, np.size(healthy_s))
        scale = (f"classifier scale {settings.classifier_scale}" if settings.method == "classifier"
                 else f"guidance {settings.guidance:g}")
        raise WhatIsHealthyError(
            f"the counterfactual has {share:.1f} % NaN or infinite values: the settings overflow "
            f"the model ({scale}, noise level {settings.noise_level:g}); use smaller values (the "
            "model's recommended settings are the defaults)"
        )


def _check_data(data: np.ndarray, spec: ModelSpec) -> np.ndarray:
    data = np.asarray(data)
    if data.ndim != 4:
        raise InputError(f"expected a [C, X, Y, Z] volume, got an array of shape {data.shape}")
    if data.shape[0] != spec.in_channels:
        raise InputError(
            f"the model expects {spec.in_channels} channel(s) {', '.join(spec.modalities)}, "
            f"the volume has {data.shape[0]}"
        )
    if min(data.shape[1:]) < 2:
        raise InputError(f"a volume of shape {data.shape[1:]} is not 3D")
    if not np.issubdtype(data.dtype, np.number) or np.issubdtype(data.dtype, np.complexfloating):
        raise InputError(f"unsupported data type {data.dtype}; a real-valued volume is needed")
    return data.astype(np.float32, copy=False)  # prepare() refuses NaN and infinities


def prepare_input(data: np.ndarray, spec: ModelSpec) -> PreparedVolume:
    """Check a ``[C, X, Y, Z]`` volume against the model and prepare its model-space slices.

    The result can be given to :func:`iter_localize` / :func:`localize` as ``prepared=`` for any
    number of runs on the same data (a GUI's previews at different settings): the brain mask,
    the normalisation and the slicing are then done once.
    """
    return prepare(_check_data(data, spec), spec.image_size)


def _matching_prepared(prepared: PreparedVolume, data: np.ndarray, spec: ModelSpec) -> None:
    if (prepared.shape != tuple(data.shape[1:]) or prepared.size != spec.image_size
            or prepared.channels != data.shape[0]):
        raise WhatIsHealthyError(
            f"the prepared volume ({prepared.channels} channel(s), {prepared.shape}, model size "
            f"{prepared.size}) does not belong to this data ({data.shape[0]} channel(s), "
            f"{tuple(data.shape[1:])}) and model (size {spec.image_size}); prepare it again"
        )
    if prepared.source is not None and prepared.source is not data:
        raise WhatIsHealthyError(
            "the prepared volume was made from another array than this data; prepare it again "
            "(prepare_input) whenever the data changes"
        )


def _restrict(prepared: PreparedVolume, z_slices: Iterable[int] | None) -> PreparedVolume:
    if z_slices is None:
        return prepared
    nz = prepared.shape[2]
    wanted = np.unique(np.asarray(list(z_slices), dtype=np.int64).ravel())
    bad = wanted[(wanted < 0) | (wanted >= nz)]
    if bad.size:
        raise WhatIsHealthyError(
            f"axial slice(s) {bad.tolist()} are outside the volume (0..{nz - 1})"
        )
    return prepared.restrict(wanted)


def iter_localize(
    model: Any,
    spec: ModelSpec,
    data: np.ndarray,
    settings: LocalizeSettings | None = None,
    z_slices: Sequence[int] | None = None,
    *,
    model_path: str | Path | None = None,
    model_hash: str | None = None,
    inputs: Iterable[str | Path] = (),
    classifier: Any = None,
    classifier_path: str | Path | None = None,
    classifier_hash: str | None = None,
    prepared: PreparedVolume | None = None,
) -> Generator[Progress, None, LocalizeResult]:
    """Localize lesions in ``data`` (``[C, X, Y, Z]`` canonical, channels in ``spec.modalities``
    order), step by step.

    Yields a :class:`Progress` after each network call and returns the :class:`LocalizeResult`
    as the ``StopIteration`` value; ``close()`` stops at the current step with nothing returned.
    ``z_slices`` restricts the work to those axial slices (a one-slice preview); the others are
    left as in the input (difference 0, healthy = input). ``model_path``, ``model_hash`` and
    ``inputs`` only go into the provenance. ``classifier`` is the noisy-image classifier that
    ``settings.method == "classifier"`` needs (see :mod:`.classifier`; ignored otherwise);
    ``classifier_path`` and ``classifier_hash`` only go into the provenance. ``prepared``:
    :func:`prepare_input` of this same ``data`` array, to skip preparing it again. Bad input is
    refused here, at call time.
    """
    settings = settings or LocalizeSettings.from_spec(spec)
    settings.validate()
    data = _check_data(data, spec)
    _check_finite_weights(model, model_path, "model")
    check_memory(int(np.prod(data.shape[1:])), data.shape[0])
    started = time.time()
    if prepared is None:
        prepared = prepare(data, spec.image_size)
    else:
        _matching_prepared(prepared, data, spec)
    sub = _restrict(prepared, z_slices)
    sub.slices  # noqa: B018 - made here (lazily) so that the preparing time says what it cost
    seconds_preparing = time.time() - started
    guided_by = (classifier or settings.classifier) if settings.method == "classifier" else None
    _check_finite_weights(guided_by, classifier_path, "classifier")
    # The classifier is a network, not a setting: the result and its provenance keep none.
    settings = dataclasses.replace(settings, classifier=None)
    device = model_device(model) or resolve_device(settings.device)
    # iter_counterfactual checks the model, the slices and the settings now, not at next().
    run_settings = dataclasses.replace(settings, classifier=guided_by)
    if settings.noise_levels:
        inner = _iter_levels(model, sub.slices, run_settings)
    else:
        inner = iter_counterfactual(model, sub.slices, run_settings)
    classifier_info = None
    if guided_by is not None:
        from .classifier import classifier_record

        classifier_info = classifier_record(guided_by, classifier_path, classifier_hash,
                                            settings.classifier_scale)
    # What runs the network (made and kept by iter_counterfactual above: this is a lookup).
    network = network_description(model, settings, device)
    return _run(
        inner, data, prepared, sub, settings, spec, device, z_slices,
        model_path, model_hash, tuple(inputs), classifier_info, seconds_preparing, network,
    )


def _iter_levels(
    model: Any, slices: np.ndarray, settings: LocalizeSettings
) -> Generator[Progress, None, list[np.ndarray]]:
    """One counterfactual per level of ``settings.noise_levels``, one after the other, with
    progress counted over all of them; returns the healthy slices of each level."""
    levels = [float(v) for v in settings.noise_levels]
    runs = [iter_counterfactual(model, slices, dataclasses.replace(
        settings, noise_level=level, noise_levels=())) for level in levels]  # checked now
    out: list[np.ndarray] = []
    done = 0
    try:
        for run in runs:
            last = 0
            while True:
                try:
                    p = next(run)
                except StopIteration as stop:
                    out.append(stop.value)
                    break
                last = p.step
                yield Progress(done + p.step, done + p.total * (len(levels) - len(out)), p.phase)
            done += last
    finally:
        for run in runs:
            run.close()
    return out


def _run(
    inner: Generator[Progress, None, np.ndarray | list[np.ndarray]],
    data: np.ndarray,
    prepared: PreparedVolume,
    sub: PreparedVolume,
    settings: LocalizeSettings,
    spec: ModelSpec,
    device: torch.device,
    z_slices: Sequence[int] | None,
    model_path: str | Path | None,
    model_hash: str | None,
    inputs: tuple,
    classifier_info: dict[str, Any] | None = None,
    seconds_preparing: float = 0.0,
    network: str = "",
) -> Generator[Progress, None, LocalizeResult]:
    started = time.time()
    if settings.seed is not None:
        torch.manual_seed(int(settings.seed))
    try:
        healthy_s = yield from inner
    finally:
        inner.close()
    if healthy_s is None:  # closed from outside
        return None  # type: ignore[return-value]
    per_level = healthy_s if isinstance(healthy_s, list) else [healthy_s]
    for level_result in per_level:
        _check_finite_result(level_result, settings)
    t_model = time.time() - started
    warnings = _warnings(prepared, sub)
    brain = prepared.brain
    signs = contrast_signs(spec.modalities, settings.lesion_contrast)
    outputs = _outputs_for(data, prepared, sub, settings, device, signs)
    difference, per_channel, healthy = outputs(per_level[0])
    difference, uncertainty = _over_levels(difference, per_level, outputs)
    t_outputs = time.time() - started
    recommended = float(spec.inference.threshold)
    region = _processed_range(sub.slice_index)
    threshold_used = resolve_threshold(settings.threshold, difference[region], brain[region],
                                       recommended)
    # Unprocessed slices have difference 0, never above a threshold: only their range counts.
    mask = threshold_region(difference, threshold_used, region,
                            brain if settings.brain_only else None, settings.min_component_voxels)
    provenance = make_provenance(
        settings=settings,
        device=str(device),
        model_path=model_path,
        model_hash=model_hash,
        model_name=spec.name,
        inputs=inputs,
        threshold_used=threshold_used,
        extra={
            "network": network,
            "model_image_size": spec.image_size,
            "modalities": list(spec.modalities),
            "recommended_threshold": recommended,
            "volume_shape": list(data.shape[1:]),
            "slices_processed": int(sub.slice_index.size),
            "z_slices": None if z_slices is None else [int(z) for z in z_slices],
            "mask_voxels": int(mask.sum()),
            "brain_voxels": int(brain.sum()),
            "seconds": round(time.time() - started, 3),
            "seconds_model": round(t_model, 3),
            "seconds_by_stage": _by_stage(seconds_preparing, started, t_model, t_outputs, outputs),
            "warnings": warnings,
            **({"classifier": classifier_info} if classifier_info is not None else {}),
        },
    )
    return LocalizeResult(
        healthy=healthy,
        difference=difference,
        difference_per_channel=per_channel.astype(np.float32, copy=False),
        mask=mask,
        brain=brain,
        threshold_used=threshold_used,
        settings=settings,
        provenance=provenance,
        modalities=tuple(spec.modalities),
        processed_slices=sub.slice_index.copy(),
        recommended_threshold=recommended,
        warnings=warnings,
        uncertainty=uncertainty,
    )


def _by_stage(preparing: float, started: float, network: float, outputs_done: float,
              outputs: Outputs) -> dict[str, Any]:
    """Seconds of each stage of a run (``started``: when the network started; ``network`` and
    ``outputs_done``: seconds from then to the end of each), and where the outputs were made."""
    now = time.time() - started
    return {"preparing": round(preparing, 3), "network": round(network, 3),
            "outputs": round(outputs_done - network, 3), "mask": round(now - outputs_done, 3),
            "outputs_on": getattr(outputs, "where", "host")}


def _outputs_for(data: np.ndarray, prepared: PreparedVolume, sub: PreparedVolume,
                 settings: LocalizeSettings, device: torch.device,
                 signs: np.ndarray | None = None) -> Outputs:
    """How this run maps its counterfactuals back to the volume grid (see
    :func:`.device_outputs.choose_outputs`): numpy on the host, or torch on a CUDA device. The
    device path does what ``_volume_outputs`` does (lesion contrast, guided upsampling, median,
    erosion): a new option there must be ported to it, or use the host path when on
    (tests/test_device_outputs.py). ``signs``: each channel's lesion contrast
    (:func:`.anomaly.contrast_signs`)."""
    erosion, median = int(settings.edge_erosion), int(settings.median_size)
    radius = int(settings.edge_guide_radius)

    def host() -> Outputs:
        scored = _scored_region(prepared.brain, sub.slice_index, erosion)
        return lambda healthy_s: _volume_outputs(data, prepared, sub, healthy_s, median, scored,
                                                 radius, signs)

    return choose_outputs(device, host, lambda: DeviceOutputs(data, prepared, sub, median,
                                                              erosion, device, radius, signs))


def _over_levels(difference: np.ndarray, per_level: list[np.ndarray], outputs: Outputs
                 ) -> tuple[np.ndarray, np.ndarray | None]:
    """(score, uncertainty): with several noise levels the mean of their maps is the score and
    their spread says where it is unsure (the healthy image shown is the first level's)."""
    if len(per_level) < 2:
        return difference, None
    maps = [difference] + [outputs(h)[0] for h in per_level[1:]]
    stack = np.stack(maps)
    return stack.mean(axis=0, dtype=np.float32), stack.std(axis=0, dtype=np.float32)


def _warnings(prepared: PreparedVolume, sub: PreparedVolume) -> list[str]:
    if not prepared.brain.any():
        return ["no brain voxels found (all-zero volume?): nothing to localize, the mask is empty"]
    if sub.slice_index.size == 0:
        return ["none of the requested axial slices holds brain; nothing was processed"]
    return []


def _intersect(a: tuple[slice, ...], b: tuple[slice, ...]) -> tuple[slice, ...]:
    """The overlap of two boxes of basic slices with steps of 1 (None ends: the whole axis)."""
    out = []
    for sa, sb in zip(a, b, strict=True):
        start = max(sa.start or 0, sb.start or 0)
        stops = [s.stop for s in (sa, sb) if s.stop is not None]
        stop = min(stops) if stops else None
        out.append(slice(start, max(start, stop) if stop is not None else None))
    return tuple(out)


def _scored_region(brain: np.ndarray, slice_index: np.ndarray, erosion: int) -> np.ndarray:
    """The brain less ``erosion`` voxels of its edge (3D), computed only around the processed
    slices (with ``erosion`` slices of margin, so that the result there is exact): a one-slice
    preview erodes a thin slab, not the volume."""
    if erosion <= 0 or slice_index.size == 0:
        return brain
    lo = max(int(slice_index.min()) - erosion, 0)
    hi = min(int(slice_index.max()) + erosion + 1, brain.shape[2])
    scored = np.zeros_like(brain)
    scored[..., lo:hi] = erode_mask(brain[..., lo:hi], erosion)
    return scored


def _processed_range(slice_index: np.ndarray) -> tuple[slice, slice, slice]:
    """The index of the axial range spanning the processed slices (empty when none)."""
    if slice_index.size == 0:
        return (slice(None), slice(None), slice(0, 0))
    return (slice(None), slice(None), slice(int(slice_index.min()), int(slice_index.max()) + 1))


def _volume_outputs(
    data: np.ndarray,
    prepared: PreparedVolume,
    sub: PreparedVolume,
    healthy_s: np.ndarray,
    median_size: int,
    scored: np.ndarray | None = None,
    edge_guide_radius: int = 0,
    signs: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(difference [X, Y, Z], per-channel difference [C, X, Y, Z], healthy [C, X, Y, Z]) on the
    volume grid. Only the processed slices are computed; the rest are 0 (differences) and the
    input itself (healthy), so a one-slice preview costs one slice, not a volume. ``signs``:
    each channel's lesion contrast (None: |input - healthy|)."""
    brain = prepared.brain
    idx = sub.slice_index
    channels = data.shape[0]
    difference = np.zeros(brain.shape, dtype=np.float32)
    per_channel = np.zeros((channels, *brain.shape), dtype=np.float32)
    healthy = data.copy()
    if idx.size == 0:
        return difference, per_channel, healthy
    # A run of consecutive slices (a whole volume's brain slices, one preview slice) is a basic
    # slice: numpy copies those ~10x faster than through an index array along the last axis.
    z = _as_slice(idx)
    brain_idx = brain[..., z]
    input_s = sub.slices
    _, per_s = difference_maps(input_s, healthy_s, channel_axis=1, signs=signs)
    per_idx = np.maximum(to_slices(sub, per_s, fill=0.0), 0.0)  # [C, X, Y, n]
    box = in_plane_box(brain_idx, 2 * edge_guide_radius + 1) if edge_guide_radius > 0 else None
    if box is not None:  # each channel's map takes the edges of its own full-resolution image
        guide = normalise_with(data[(slice(None), *box)][..., z], brain_idx[box], prepared.scale)
        per_idx[(slice(None), *box)] = edge_guided(per_idx[(slice(None), *box)], guide,
                                                   edge_guide_radius)
    raw = per_idx.mean(axis=0)  # = to_slices of the channel mean: the resize is linear
    # The median is in-plane; it runs before the background is zeroed, as the map is continuous.
    smoothed = median_smooth(raw, median_size, slice_axis=-1)
    # Outside the brain there is only background; what the model-space resize bleeds there is
    # not an anomaly and would show as a halo in the difference layer.
    # ``scored``: the brain, or the brain less its edge (edge_erosion): the map is 0 outside it.
    smoothed *= brain_idx if scored is None else scored[..., z]
    per_idx *= brain_idx
    difference[..., z] = smoothed
    per_channel[..., z] = per_idx

    delta = to_slices(sub, input_s - healthy_s, fill=0.0)  # [C, X, Y, n], normalised units
    delta *= brain_idx
    # normalised = data / scale * 2 - 1, so a change d in normalised units is d * scale / 2.
    delta *= (prepared.scale / 2.0).astype(np.float32).reshape(-1, 1, 1, 1)
    source = data[..., z]
    changed = np.subtract(source, delta, out=delta)
    if source.size and float(source.min()) >= 0.0:
        np.maximum(changed, 0.0, out=changed)
    healthy[..., z] = changed
    return difference, per_channel, healthy


def localize(
    model: Any,
    spec: ModelSpec,
    data: np.ndarray,
    settings: LocalizeSettings | None = None,
    z_slices: Sequence[int] | None = None,
    progress_callback: Callable[[Progress], Any] | None = None,
    **provenance: Any,
) -> LocalizeResult:
    """Run :func:`iter_localize` to the end (``progress_callback`` gets each Progress)."""
    return drain(iter_localize(model, spec, data, settings, z_slices, **provenance), progress_callback)
