"""Anomaly maps and masks from an input and its healthy counterfactual (numpy only, no Qt).

The expensive counterfactual is computed once; everything here runs on the cached difference
volume. :func:`make_mask` is called on every move of the GUI threshold slider, so it is written to
take a few milliseconds on a 240x240x155 volume (see ``docs/engine.md`` for the measurement).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from .errors import WhatIsHealthyError
from .runtime import run_in_threads, worker_threads

try:  # a compiled labeller: see label_components
    import cc3d as _cc3d
except ImportError:  # pragma: no cover - cc3d is a dependency; scipy is the fallback
    _cc3d = None

__all__ = [
    "LESION_CONTRAST",
    "LESION_CONTRAST_CHOICES",
    "contrast_signs",
    "difference_maps",
    "EDGE_GUIDE_EPS",
    "edge_guided",
    "erode_mask",
    "guided_filter",
    "in_plane_box",
    "healthy_percentile_threshold",
    "make_mask",
    "median_smooth",
    "otsu_threshold",
]


#: How a lesion changes each modality's intensity, as radiology reads it: +1 brighter, -1
#: darker, 0 either way. Oedema, demyelination, gliosis and tumour are hyperintense on FLAIR and
#: T2 and hypointense on T1; on T1ce enhancement is bright and necrosis dark. A modality not
#: listed counts either way. Used by ``lesion_contrast="expected"``.
LESION_CONTRAST: dict[str, int] = {"flair": 1, "t2": 1, "t1": -1, "t1ce": 0}
#: ``"any"``: |input - healthy| in every modality (the paper's score); ``"expected"``: in each
#: modality only the change a lesion makes there (:data:`LESION_CONTRAST`), so that a healthy
#: image that the counterfactual renders brighter on FLAIR, say, is not called a lesion.
LESION_CONTRAST_CHOICES = ("any", "expected")


def contrast_signs(modalities: tuple[str, ...] | list[str], lesion_contrast: str) -> np.ndarray:
    """The sign each channel's difference is read with (float32 ``[C]``: +1 input brighter than
    its counterfactual, -1 darker, 0 either way) under ``lesion_contrast``."""
    if lesion_contrast not in LESION_CONTRAST_CHOICES:
        raise WhatIsHealthyError(
            f"lesion_contrast must be one of {', '.join(LESION_CONTRAST_CHOICES)} (any: "
            "|input - healthy| in every modality, the paper's; expected: only the change a "
            f"lesion makes in each modality), got {lesion_contrast!r}"
        )
    if lesion_contrast == "any":
        return np.zeros(len(modalities), dtype=np.float32)
    return np.array([LESION_CONTRAST.get(str(m).lower(), 0) for m in modalities],
                    dtype=np.float32)


def difference_maps(
    original: np.ndarray, healthy: np.ndarray, channel_axis: int,
    signs: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(mean, per_channel)``: each channel's difference between ``original`` and its
    ``healthy`` counterfactual, averaged over channels, and per channel.

    ``signs`` (one per channel, :func:`contrast_signs`): 0 or None reads a channel as
    |original - healthy|; +1 keeps only where the original is brighter (``max(o - h, 0)``), -1
    only where it is darker. ``per_channel`` keeps the input's shape (channel axis where it
    was); ``mean`` drops that axis. Both are float32. The mean over channels is the peers'
    anomaly score.
    """
    original = np.asarray(original)
    healthy = np.asarray(healthy)
    if original.shape != healthy.shape:
        raise WhatIsHealthyError(
            f"the input {original.shape} and its counterfactual {healthy.shape} differ in shape"
        )
    if not -original.ndim <= channel_axis < original.ndim:
        raise WhatIsHealthyError(
            f"channel_axis {channel_axis} is out of range for shape {original.shape}"
        )
    delta = original.astype(np.float32) - healthy.astype(np.float32)
    if signs is None or not np.any(signs):
        per_channel = np.abs(delta, out=delta)
    else:
        signs = np.asarray(signs, dtype=np.float32)
        if signs.shape != (original.shape[channel_axis],):
            raise WhatIsHealthyError(
                f"signs {signs.shape} must give one sign per channel "
                f"({original.shape[channel_axis]})"
            )
        shape = [1] * original.ndim
        shape[channel_axis] = -1
        sign = signs.reshape(shape)
        # sign 0: |d|; sign +-1: max(sign * d, 0).
        per_channel = np.where(sign == 0, np.abs(delta), np.maximum(sign * delta, 0.0))
        per_channel = per_channel.astype(np.float32, copy=False)
    return per_channel.mean(axis=channel_axis, dtype=np.float32), per_channel


def median_smooth(values: np.ndarray, size: int, slice_axis: int | None = -1) -> np.ndarray:
    """Median filter of width ``size`` (``size <= 1``: an unchanged copy).

    ``slice_axis`` set (default -1, the axial axis of a volume in canonical RAS; use 0 for a
    ``[N, S, S]`` stack of slices): a 2D ``size x size`` median within each slice, as the peers'
    evaluation does, because the counterfactual is made slice by slice. ``slice_axis=None``: a 3D
    ``size^3`` median. Borders are reflected (scipy's default).
    """
    values = np.asarray(values)
    if int(size) <= 1:
        return values.copy()
    if slice_axis is None:
        return ndimage.median_filter(values, size=(int(size),) * values.ndim)
    axis = slice_axis % values.ndim
    footprint = tuple(1 if i == axis else int(size) for i in range(values.ndim))
    # Slices are filtered independently: runs of them on the worker threads (scipy releases the
    # GIL), the same numbers as one call. A volume's median: 0.52 -> 0.26 s on 2 cores.
    out = np.empty_like(values)
    edges = np.linspace(0, values.shape[axis], min(worker_threads(), values.shape[axis]) + 1)
    parts = [(slice(None),) * axis + (slice(int(lo), int(hi)),)
             for lo, hi in zip(edges[:-1], edges[1:], strict=True) if int(hi) > int(lo)]

    def run(part: tuple[slice, ...]) -> None:
        ndimage.median_filter(values[part], size=footprint, output=out[part])

    run_in_threads([lambda part=part: run(part) for part in parts])
    return out


def guided_filter(
    values: np.ndarray, guide: np.ndarray, radius: int, eps: float, slice_axis: int = -1,
    channel_axis: int | None = None,
) -> np.ndarray:
    """Edge-aware smoothing of ``values`` by ``guide`` (the guided filter, He et al. 2010), in
    each 2D slice: the output is locally ``a * guide + b``, fitted to ``values`` in each
    ``(2 radius + 1)^2`` window, so it takes the guide's edges where the guide has them.

    Used to upsample a map made at the model's resolution (64 px, 3-4 mm per pixel on a brain)
    with the full-resolution image as the guide: the lesion's edge follows the image's edge
    instead of a bilinear ramp. ``eps`` (in squared guide units) decides what counts as an edge:
    windows whose guide variance is well below it are just averaged. ``values`` and ``guide``
    have the same shape; ``channel_axis`` (if any) is not filtered across. float32 out.
    """
    values = np.asarray(values, dtype=np.float32)
    guide = np.asarray(guide, dtype=np.float32)
    if values.shape != guide.shape:
        raise WhatIsHealthyError(f"guided_filter: values {values.shape} and guide {guide.shape} differ")
    if int(radius) <= 0:
        return values.copy()
    fixed = {slice_axis % values.ndim}
    if channel_axis is not None:
        fixed.add(channel_axis % values.ndim)
    size = tuple(1 if i in fixed else 2 * int(radius) + 1 for i in range(values.ndim))

    def box(a: np.ndarray) -> np.ndarray:
        return ndimage.uniform_filter(a, size=size, mode="reflect")

    mean_g, mean_v = box(guide), box(values)
    var_g = box(guide * guide) - mean_g * mean_g
    cov = box(guide * values) - mean_g * mean_v
    a = cov / (np.maximum(var_g, 0.0) + np.float32(eps))
    b = mean_v - a * mean_g
    return (box(a) * guide + box(b)).astype(np.float32, copy=False)


# The guided filter's eps for difference maps, in squared normalised units (the input is scaled
# to [-1, 1]): windows whose image variance is well below it (flat tissue, noise) are averaged,
# real edges are kept. 1e-2 and 1e-3 measured the same on the calibration cases (issue 12).
EDGE_GUIDE_EPS = 1e-2


def edge_guided(per_channel: np.ndarray, guide: np.ndarray, radius: int,
                eps: float = EDGE_GUIDE_EPS) -> np.ndarray:
    """Edge-aware upsampling of per-channel difference maps ``[C, X, Y, n]``: each channel
    refitted (:func:`guided_filter`, in-plane) to its own full-resolution ``guide`` channel
    (the normalised image), clipped at 0 as a difference is."""
    out = np.empty(per_channel.shape, dtype=np.float32)

    def run(c: int) -> None:
        out[c] = guided_filter(per_channel[c], guide[c], radius, eps, slice_axis=-1)

    # One channel per worker thread at a time (scipy releases the GIL): the temporaries of as
    # many channels as threads, the same numbers as one channel after the other.
    run_in_threads([lambda c=c: run(c) for c in range(per_channel.shape[0])])
    return np.maximum(out, 0.0, out=out)


def in_plane_box(brain: np.ndarray, margin: int) -> tuple[slice, slice] | None:
    """The (x, y) box of ``brain`` ``[X, Y, n]`` over all its slices, grown by ``margin``
    (clipped to the array); None when there is no brain. A filter reaching ``margin`` voxels,
    run on this box only, gives the brain voxels exactly what it gives on the whole plane."""
    box = bounding_box(np.asarray(brain).any(axis=2))
    if box is None:
        return None
    return tuple(slice(max(b.start - margin, 0), min(b.stop + margin, n))  # type: ignore[return-value]
                 for b, n in zip(box, brain.shape[:2], strict=True))


def erode_mask(mask: np.ndarray, voxels: int = 1) -> np.ndarray:
    """Binary erosion by ``voxels`` (face connectivity, outside = background): the brain less its
    edge, where the peers do not score (the skull-stripping border is not a lesion)."""
    mask = np.asarray(mask, dtype=bool)
    if voxels <= 0:
        return mask.copy()
    return ndimage.binary_erosion(mask, iterations=int(voxels))


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of ``values`` (e.g. the difference inside the brain): the histogram cut
    maximising the between-class variance; foreground is ``values > threshold``.

    Same histogram convention as scikit-image (bin centres). NaNs are ignored; a constant input
    returns that constant; an empty one raises.
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    if v.size == 0:
        raise WhatIsHealthyError("Otsu threshold of an empty set of values")
    lo, hi = float(v.min()), float(v.max())
    if lo == hi:
        return lo
    hist, edges = np.histogram(v, bins=int(bins), range=(lo, hi))
    centres = (edges[:-1] + edges[1:]) / 2
    hist = hist.astype(np.float64)
    w1 = np.cumsum(hist)
    w2 = np.cumsum(hist[::-1])[::-1]
    m1 = np.cumsum(hist * centres) / np.maximum(w1, 1e-300)
    m2 = (np.cumsum((hist * centres)[::-1]) / np.maximum(w2[::-1], 1e-300))[::-1]
    between = w1[:-1] * w2[1:] * (m1[:-1] - m2[1:]) ** 2
    return float(centres[int(np.argmax(between))])


def healthy_percentile_threshold(
    difference: np.ndarray, healthy_region_mask: np.ndarray, percentile: float = 99.0
) -> float:
    """The ``percentile`` of the difference over voxels known to be healthy.

    Calibrated on healthy data, this bounds the false-positive rate there: at most about
    ``100 - percentile`` % of healthy voxels lie above it (the "5 % FPR on healthy" choice of the
    literature is ``percentile=95``).
    """
    difference = np.asarray(difference)
    region = np.asarray(healthy_region_mask, dtype=bool)
    if region.shape != difference.shape:
        raise WhatIsHealthyError(
            f"the healthy-region mask {region.shape} does not match the map {difference.shape}"
        )
    if not 0.0 <= percentile <= 100.0:
        raise WhatIsHealthyError(f"percentile must be in [0, 100], got {percentile}")
    values = difference[region]
    values = values[np.isfinite(values)]
    if values.size == 0:
        raise WhatIsHealthyError("the healthy region is empty: no voxels to calibrate on")
    return float(np.percentile(values, percentile))


_STRUCTURES: dict[tuple[int, int], np.ndarray] = {}


# cc3d's neighbourhoods for scipy's connectivity 1..ndim (faces, + edges, + corners).
_CC3D_NEIGHBOURS = {2: {1: 4, 2: 8}, 3: {1: 6, 2: 18, 3: 26}}


def label_components(mask: np.ndarray, connectivity: int = 1) -> tuple[np.ndarray, int]:
    """``(labels, count)`` of the connected components of a boolean array, as
    ``scipy.ndimage.label`` with ``generate_binary_structure(ndim, connectivity)``.

    2D and 3D arrays go through connected-components-3d (cc3d), 2.5-3x faster than scipy on a
    BraTS-size mask (14 against 36-38 ms for the whole volume): this is the slider's cost when
    small components are filtered. Other dimensions, or without cc3d, use scipy.
    """
    neighbours = _CC3D_NEIGHBOURS.get(mask.ndim, {}).get(connectivity)
    if neighbours is not None and _cc3d is not None:
        labels, count = _cc3d.connected_components(
            np.ascontiguousarray(mask), connectivity=neighbours, return_N=True
        )
        return labels, int(count)
    labels, count = ndimage.label(mask, structure=_structure(mask.ndim, connectivity))
    return labels, int(count)


def _structure(ndim: int, connectivity: int) -> np.ndarray:
    key = (ndim, connectivity)
    if key not in _STRUCTURES:
        _STRUCTURES[key] = ndimage.generate_binary_structure(ndim, connectivity)
    return _STRUCTURES[key]


def bounding_box(mask: np.ndarray) -> tuple[slice, ...] | None:
    """Bounding box of the True voxels; one full pass plus passes over shrinking sub-boxes."""
    box: list[slice] = [slice(None)] * mask.ndim
    for axis in range(mask.ndim):
        others = tuple(i for i in range(mask.ndim) if i != axis)
        # box[axis] is still the full axis here; the axes already done make the box smaller,
        # so only the first pass reads the whole volume.
        profile = mask[tuple(box)].any(axis=others)
        hits = np.flatnonzero(profile)
        if hits.size == 0:
            return None
        box[axis] = slice(int(hits[0]), int(hits[-1]) + 1)
    return tuple(box)


def make_mask(
    difference: np.ndarray,
    threshold: float,
    brain_mask: np.ndarray | None = None,
    min_component_voxels: int = 0,
    connectivity: int = 1,
) -> np.ndarray:
    """uint8 mask of ``difference > threshold`` (inside ``brain_mask`` if given), dropping
    connected components smaller than ``min_component_voxels``.

    Components use ``connectivity`` 1 (faces) by default; 2 or 3 add edges and corners. Fast
    enough for a slider: components are only labelled when asked for, and only inside the
    bounding box of the above-threshold voxels; sizes come from one ``np.bincount``.
    """
    difference = np.asarray(difference)
    if not 1 <= connectivity <= max(difference.ndim, 1):
        raise WhatIsHealthyError(
            f"connectivity must be 1..{difference.ndim} for a {difference.ndim}D map"
        )
    above = difference > threshold  # NaN compares False: never in the mask
    if brain_mask is not None:
        brain = np.asarray(brain_mask)
        if brain.shape != difference.shape:
            raise WhatIsHealthyError(
                f"the brain mask {brain.shape} does not match the map {difference.shape}"
            )
        np.logical_and(above, brain, out=above)
    if min_component_voxels > 1:
        box = bounding_box(above)
        if box is not None:
            sub = above[box]  # a view: writing to it writes the mask
            labels, n = label_components(sub, connectivity)
            if n:
                # Sizes and the keep/drop decision on the foreground voxels only: fewer elements
                # than the box (measured ~1.5x faster than bincount over the whole box).
                fg = labels[sub]
                keep = np.bincount(fg) >= min_component_voxels
                if not keep[1:].all():  # nothing small: leave the mask as it is
                    sub[sub] = keep[fg]
    return above.view(np.uint8)  # bool and uint8 share the layout: no copy
