"""Preprocessing with an exact inverse: brain mask, normalisation, axial slices, model-size resize.

The method's normalisation: each modality is divided by the 99th percentile of its brain voxels
and mapped with ``x * 2 - 1`` (brain intensities mostly in [-1, 1], background at -1). Axial
slices are cropped to one square box around the brain (the same box for every slice, so that the
model sees the anatomy at one scale), resized to the model size, and only slices that hold brain
are sent to the network.

Robustness: an all-zero volume (no brain) gives zero slices (``N = 0``) and an inverse that maps
nothing back, so the pipeline returns an empty mask; arrays that are not real, finite
``[C, X, Y, Z]`` volumes are refused with an :class:`InputError`; normalised intensities are
clipped to ``[-NORMALISED_LIMIT, NORMALISED_LIMIT]`` so that a few absurd voxels (a corrupt file, a
wrong scaling) cannot overflow float32.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F

from .errors import InputError

BACKGROUND = -1.0
#: Normalised intensities are clipped to +-this (1e6 times the brain's 99th percentile).
NORMALISED_LIMIT = 1e6


@dataclass
class PreparedVolume:
    """Model-space slices of one volume plus what is needed to map results back.

    Holds a reference to the source array (no copy). The model-space slices are made when first
    asked for, and :meth:`restrict` makes only the slices it keeps: a one-slice preview crops,
    normalises and resizes one slice, not the whole volume. The whole normalised volume is only
    computed on request (:attr:`normalised`).
    """

    slice_index: np.ndarray  # [N] axial (z) index of each slice in the volume
    box: tuple[int, int, int, int]  # x0, y0 (may be negative), side, side
    scale: np.ndarray  # [C] the brain 99th percentile of each channel
    brain: np.ndarray  # [X, Y, Z] bool
    size: int
    source: np.ndarray = field(repr=False)  # [C, X, Y, Z] float32, finite
    _slices: np.ndarray | None = field(default=None, repr=False)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.brain.shape)  # type: ignore[return-value]

    @property
    def channels(self) -> int:
        return int(self.scale.shape[0])

    @property
    def slices(self) -> np.ndarray:
        """``[N, C, S, S]`` float32, normalised: the model's input for ``slice_index``."""
        if self._slices is None:
            self._slices = _model_slices(self.source, self.brain, self.scale, self.box,
                                         self.slice_index, self.size)
        return self._slices

    @property
    def normalised(self) -> np.ndarray:
        """The whole volume normalised, ``[C, X, Y, Z]`` float32 (background -1)."""
        return normalise_with(self.source, self.brain, self.scale)

    def restrict(self, z_slices: np.ndarray) -> PreparedVolume:
        """The same volume with only the processed slices among ``z_slices`` (sorted, unique)."""
        keep = np.isin(self.slice_index, z_slices)
        return replace(
            self,
            slice_index=self.slice_index[keep],
            _slices=None if self._slices is None else self._slices[keep],
        )


def brain_mask(data: np.ndarray) -> np.ndarray:
    """Brain = voxels non-zero in any channel (inputs are skull-stripped, as BraTS is)."""
    return np.any(data != 0, axis=0)


def brain_scales(data: np.ndarray, brain: np.ndarray, percentile: float = 99.0) -> np.ndarray:
    """Per-channel brain percentile (the method's scale); ones where there is no brain."""
    channels = data.shape[0]
    scales = np.ones(channels, dtype=np.float32)
    if not brain.any():
        return scales
    for c in range(channels):
        values = data[c][brain].astype(np.float64)  # float32 percentiles can overflow
        scale = float(np.percentile(values, percentile))
        if not scale > 0:
            scale = float(np.abs(values).max())
        if not (scale > 0 and np.isfinite(scale)):
            raise InputError(
                f"channel {c} is zero everywhere inside the brain; check that the right file "
                "was given for this modality"
            )
        scales[c] = scale
    return scales


def normalise_with(data: np.ndarray, brain: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """``[C, ...]`` data mapped with ``x / scale * 2 - 1`` inside ``brain`` (clipped to
    +-NORMALISED_LIMIT), background -1 elsewhere; float32. Works on any crop whose ``brain``
    matches, so that a crop and the whole volume normalise to the same values."""
    out = np.full(data.shape, BACKGROUND, dtype=np.float32)
    factor = (2.0 / np.asarray(scales, dtype=np.float64)).astype(np.float32)
    with np.errstate(all="ignore"):
        for c in range(data.shape[0]):
            values = data[c][brain].astype(np.float32, copy=False) * factor[c] - np.float32(1.0)
            out[c][brain] = np.clip(values, -NORMALISED_LIMIT, NORMALISED_LIMIT)
    return out


def normalise(data: np.ndarray, brain: np.ndarray, percentile: float = 99.0) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel brain percentile scaling to the method's [-1, 1] range; returns (array, scales)."""
    scales = brain_scales(data, brain, percentile)
    return normalise_with(data, brain, scales), scales


def denormalise(normalised: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Inverse of ``normalise`` (per channel, on a [C, ...] array)."""
    shape = (-1,) + (1,) * (normalised.ndim - 1)
    return ((normalised + 1.0) / 2.0 * scales.reshape(shape)).astype(np.float32)


def square_box(brain: np.ndarray, margin: int = 4) -> tuple[int, int, int]:
    """One square in-plane box (x0, y0, side) holding the brain of every axial slice."""
    footprint = brain.any(axis=2)
    if not footprint.any():
        return 0, 0, max(brain.shape[0], brain.shape[1])
    xs = np.flatnonzero(footprint.any(axis=1))
    ys = np.flatnonzero(footprint.any(axis=0))
    width = xs[-1] - xs[0] + 1
    height = ys[-1] - ys[0] + 1
    side = int(max(width, height) + 2 * margin)
    x0 = int(xs[0] + (width - side) // 2)
    y0 = int(ys[0] + (height - side) // 2)
    return x0, y0, side


def brain_slices(brain: np.ndarray, side: int, min_fraction: float = 0.02) -> np.ndarray:
    """Axial slices with enough brain to be worth the network's time."""
    area = brain.sum(axis=(0, 1))
    return np.flatnonzero(area >= max(1, min_fraction * side * side))


def _crop(volume: np.ndarray, x0: int, y0: int, side: int, fill: float) -> np.ndarray:
    """Crop ``[C, X, Y, N]`` to the box, padding with ``fill`` where the box leaves the volume."""
    c, nx, ny, n = volume.shape
    out = np.full((c, side, side, n), fill, dtype=volume.dtype)
    sx0, sy0 = max(x0, 0), max(y0, 0)
    sx1, sy1 = min(x0 + side, nx), min(y0 + side, ny)
    out[:, sx0 - x0 : sx1 - x0, sy0 - y0 : sy1 - y0] = volume[:, sx0:sx1, sy0:sy1]
    return out


def _resize(batch: np.ndarray, size: int) -> np.ndarray:
    """Resize [N, C, H, W] to size x size; antialiased when shrinking."""
    tensor = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
    if tensor.shape[-1] == size:
        return tensor.numpy().copy()
    shrink = size < tensor.shape[-1]
    out = F.interpolate(tensor, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)
    return out.numpy()


def prepare(data: np.ndarray, size: int, brain: np.ndarray | None = None) -> PreparedVolume:
    """Prepare a ``[C, X, Y, Z]`` volume for the model: brain mask, per-channel scales, crop box
    and the axial slices worth processing; the normalised model-space slices ``[N, C, S, S]``
    follow on first use of ``.slices`` (see :class:`PreparedVolume`)."""
    data = np.asarray(data)
    if data.ndim != 4 or data.shape[0] < 1 or min(data.shape[1:]) < 1:
        raise InputError(f"expected a [C, X, Y, Z] array with C >= 1, got shape {data.shape}")
    if data.dtype.kind not in "biuf":
        raise InputError(f"unsupported data type {data.dtype}; a real-valued volume is needed")
    if isinstance(size, bool) or not isinstance(size, int | np.integer) or size < 1:
        raise InputError(f"the model size must be an integer >= 1, got {size!r}")
    size = int(size)
    data = data.astype(np.float32, copy=False)
    if not np.isfinite(data).all():
        raise InputError("the volume contains NaN or infinite voxels; replace them first")
    if brain is None:
        brain = brain_mask(data)
    else:
        brain = np.asarray(brain).astype(bool)
        if brain.shape != data.shape[1:]:
            raise InputError(
                f"the brain mask has shape {brain.shape}, the volume {data.shape[1:]}"
            )
    scales = brain_scales(data, brain)
    x0, y0, side = square_box(brain)
    return PreparedVolume(
        slice_index=brain_slices(brain, side),
        box=(x0, y0, side, side),
        scale=scales,
        brain=brain,
        size=size,
        source=data,
    )


def as_basic_slice(index: np.ndarray) -> slice | np.ndarray:
    """``index`` as a basic slice when it is a run of consecutive integers (numpy copies those
    ~10x faster than through an index array along the last axis), else ``index`` itself."""
    if index.size and int(index[-1]) - int(index[0]) == index.size - 1 and (
            index.size < 2 or bool(np.all(np.diff(index) == 1))):
        return slice(int(index[0]), int(index[-1]) + 1)
    return index


def _model_slices(
    data: np.ndarray,
    brain: np.ndarray,
    scales: np.ndarray,
    box: tuple[int, int, int, int],
    index: np.ndarray,
    size: int,
) -> np.ndarray:
    """The normalised ``[N, C, size, size]`` model input of axial slices ``index``: the crop box
    of each slice, normalised as :func:`normalise_with` (background and outside the volume -1),
    resized. Only the part of the box inside the volume is read, in one strided copy straight
    into the network's slice-first layout (no copy of the slices first, no transpose after)."""
    if index.size == 0:
        return np.zeros((0, data.shape[0], size, size), dtype=np.float32)
    x0, y0, side, _ = box
    nx, ny = data.shape[1:3]
    out = np.full((index.size, data.shape[0], side, side), BACKGROUND, dtype=np.float32)
    sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x0 + side, nx), min(y0 + side, ny)
    z = as_basic_slice(index)
    window = data[:, sx0:sx1, sy0:sy1, z].transpose(3, 0, 1, 2)  # [N, C, w, h]
    inside = brain[sx0:sx1, sy0:sy1, z].transpose(2, 0, 1)[:, None]  # [N, 1, w, h]
    factor = (2.0 / np.asarray(scales, dtype=np.float64)).astype(np.float32)
    with np.errstate(all="ignore"):  # the same float32 arithmetic as normalise_with
        values = window.astype(np.float32) * factor.reshape(1, -1, 1, 1) - np.float32(1.0)
        np.clip(values, -NORMALISED_LIMIT, NORMALISED_LIMIT, out=values)
    np.copyto(out[:, :, sx0 - x0:sx1 - x0, sy0 - y0:sy1 - y0], values, where=inside)
    return _resize(out, size).astype(np.float32, copy=False)


def to_slices(prepared: PreparedVolume, slices: np.ndarray, fill: float = 0.0) -> np.ndarray:
    """Model-space ``[N, C', S, S]`` -> the processed axial slices on the volume grid,
    ``[C', X, Y, N]`` (the N slices of ``prepared.slice_index``, in that order); outside the
    crop box: ``fill``."""
    nx, ny, _ = prepared.shape
    n, channels = slices.shape[0], slices.shape[1]
    out = np.full((channels, nx, ny, n), fill, dtype=np.float32)
    if n == 0:
        return out
    x0, y0, side, _ = prepared.box
    big = _resize(slices, side).transpose(1, 2, 3, 0)  # [C', side, side, N]
    sx0, sy0 = max(x0, 0), max(y0, 0)
    sx1, sy1 = min(x0 + side, nx), min(y0 + side, ny)
    out[:, sx0:sx1, sy0:sy1] = big[:, sx0 - x0 : sx1 - x0, sy0 - y0 : sy1 - y0]
    return out


def to_volume(prepared: PreparedVolume, slices: np.ndarray, fill: float = 0.0) -> np.ndarray:
    """Inverse of the slicing and resize: model-space ``[N, C', S, S]`` -> ``[C', X, Y, Z]``.

    Slices that were not processed get ``fill``.
    """
    nx, ny, nz = prepared.shape
    channels = slices.shape[1]
    out = np.full((channels, nx, ny, nz), fill, dtype=np.float32)
    if slices.shape[0]:
        out[..., prepared.slice_index] = to_slices(prepared, slices, fill)
    return out
