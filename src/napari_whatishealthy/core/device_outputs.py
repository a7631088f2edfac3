"""The volume outputs of a run computed with torch on the network's device (a GPU).

On a GPU the network is a fraction of a second per BraTS volume, and mapping its 64 px results
back to the source grid with numpy on the host (resize, in-plane median filter, brain erosion,
masking) took longer than the network itself (docs/benchmarks.md, GPU). This module does the
same arithmetic as the numpy path in :mod:`.pipeline` (``_volume_outputs``, ``_scored_region``),
step by step, in torch on any device: the model-space maps go up once, the full-resolution
outputs come down once. It is device-agnostic so that the tests run it on the CPU against the
numpy path; the pipeline uses it where the network runs on CUDA (:func:`use_device_outputs`).

Same results as the numpy path: the same bilinear resize (torch's, which the numpy path calls
too), scipy's median filter (rank ``size * size // 2`` of the window, borders reflected as
``d c b a | a b c d``, the window offset by one for even sizes as scipy's), scipy's binary
erosion (face connectivity, outside = background). Only float rounding order can differ.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .anomaly import EDGE_GUIDE_EPS
from .device import free_memory, is_out_of_memory
from .preprocess import BACKGROUND, NORMALISED_LIMIT, PreparedVolume

__all__ = ["DeviceOutputs", "Outputs", "choose_outputs", "erode_mask_torch",
           "guided_filter_torch", "median_smooth_torch", "use_device_outputs"]

#: Maps one counterfactual's model-space slices back: healthy_s -> (difference [X, Y, Z],
#: per-channel difference [C, X, Y, Z], healthy [C, X, Y, Z]), numpy float32.
Outputs = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]

#: Device types whose runs compute their volume outputs on the device (the CPU keeps numpy:
#: scipy's median and erosion are as fast there, and nothing has to move).
DEVICE_TYPES = ("cuda",)

# The median filter's unfolded windows are made this many elements at a time (256 MiB of
# float32), so that a large volume does not need size^2 copies of itself at once.
_MEDIAN_CHUNK_ELEMENTS = 1 << 26


def use_device_outputs(device: torch.device | str) -> bool:
    """Whether a run whose network is on ``device`` computes its outputs there."""
    return torch.device(device).type in DEVICE_TYPES


class _Chosen:
    """The outputs of a run, with where they are made (``where``: ``"host"`` or the device); a
    device that runs out of memory hands over to the host for the rest of the run."""

    def __init__(self, make: Outputs, where: str, host: Callable[[], Outputs],
                 device: torch.device | str) -> None:
        self.make, self.where, self.host, self.device = make, where, host, device

    def __call__(self, healthy_s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self.where != "host":
            try:
                return self.make(healthy_s)
            except Exception as exc:
                if not is_out_of_memory(exc):
                    raise
            free_memory(torch.device(self.device))
            self.make, self.where = self.host(), "host"
        return self.make(healthy_s)


def choose_outputs(device: torch.device | str, host: Callable[[], Outputs],
                   on_device: Callable[[], Outputs]) -> Outputs:
    """A run's :data:`Outputs`: ``on_device()`` where :func:`use_device_outputs` (CUDA: there
    the numpy path took 3-4x as long as the network), ``host()`` otherwise or when the device
    runs out of memory for them. The result says which in ``where``."""
    if use_device_outputs(device):
        try:
            return _Chosen(on_device(), str(device), host, device)
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
        free_memory(torch.device(device))
    return _Chosen(host(), "host", host, device)


def _reflect_index(n: int, before: int, after: int, device: torch.device) -> torch.Tensor:
    """Indices of an axis of length ``n`` padded by ``before`` / ``after`` the way scipy's
    ``mode="reflect"`` does (``d c b a | a b c d | d c b a``, repeated for wide pads)."""
    i = torch.arange(-before, n + after, device=device)
    period = 2 * n
    i = torch.remainder(i, period)
    return torch.where(i >= n, period - 1 - i, i)


def median_smooth_torch(values: torch.Tensor, size: int) -> torch.Tensor:
    """The in-plane ``size x size`` median of a ``[N, H, W]`` stack (each slice on its own), as
    :func:`.anomaly.median_smooth` with ``slice_axis`` on the stack axis; ``size <= 1``: a copy."""
    size = int(size)
    if size <= 1 or values.numel() == 0:
        return values.clone()
    n, h, w = values.shape
    before, after = size // 2, (size - 1) // 2
    rows = _reflect_index(h, before, after, values.device)
    cols = _reflect_index(w, before, after, values.device)
    rank = size * size // 2  # scipy's rank: the (size^2 // 2)-th smallest, from 0
    out = torch.empty_like(values)
    per_slice = size * size * h * w
    step = max(1, _MEDIAN_CHUNK_ELEMENTS // per_slice)
    for start in range(0, n, step):
        part = values[start:start + step]
        padded = part.index_select(1, rows).index_select(2, cols)  # [n', H + s - 1, W + s - 1]
        windows = F.unfold(padded[:, None], kernel_size=size)  # [n', s*s, H*W]
        # A sort of each short window, not kthvalue: CUDA's kthvalue runs one block per window
        # (millions here), its sort handles many short segments per block.
        out[start:start + step] = windows.sort(dim=1).values[:, rank].reshape(-1, h, w)
    return out


def guided_filter_torch(values: torch.Tensor, guide: torch.Tensor, radius: int,
                        eps: float = EDGE_GUIDE_EPS) -> torch.Tensor:
    """:func:`.anomaly.guided_filter` of ``[N, C, H, W]`` stacks, in-plane (each slice and
    channel on its own), with scipy's ``uniform_filter`` borders (reflected, edge repeated)."""
    radius = int(radius)
    if radius <= 0:
        return values.clone()
    n, c, h, w = values.shape
    rows = _reflect_index(h, radius, radius, values.device)
    cols = _reflect_index(w, radius, radius, values.device)
    size = 2 * radius + 1

    def box(a: torch.Tensor) -> torch.Tensor:
        padded = a.index_select(2, rows).index_select(3, cols)
        return F.avg_pool2d(padded, size, stride=1)

    mean_g, mean_v = box(guide), box(values)
    var_g = (box(guide * guide) - mean_g * mean_g).clamp_min_(0.0)
    a = (box(guide * values) - mean_g * mean_v) / (var_g + eps)
    b = mean_v - a * mean_g
    return box(a) * guide + box(b)


def erode_mask_torch(mask: torch.Tensor, voxels: int) -> torch.Tensor:
    """Binary erosion of a boolean tensor by ``voxels`` (face connectivity, outside =
    background), as :func:`.anomaly.erode_mask`."""
    mask = mask.to(torch.bool)
    for _ in range(max(0, int(voxels))):
        eroded = mask.clone()
        for axis in range(mask.dim()):
            n = mask.shape[axis]
            if n > 1:
                eroded.narrow(axis, 1, n - 1).logical_and_(mask.narrow(axis, 0, n - 1))
                eroded.narrow(axis, 0, n - 1).logical_and_(mask.narrow(axis, 1, n - 1))
            eroded.narrow(axis, 0, 1).zero_()  # the neighbour outside is background
            eroded.narrow(axis, n - 1, 1).zero_()
        mask = eroded
    return mask


class DeviceOutputs:
    """The outputs of one run (one volume, one set of processed slices) on ``device``.

    Made once per run: the brain of the processed slices and the scored region (the brain less
    ``erosion`` voxels of its edge, eroded in 3D around the processed slices) are kept on the
    device; :meth:`__call__` maps one counterfactual's model-space slices back. Arrays in and
    out are numpy, as the numpy path's.
    """

    def __init__(self, data: np.ndarray, prepared: PreparedVolume, sub: PreparedVolume,
                 median_size: int, erosion: int, device: torch.device | str,
                 edge_guide_radius: int = 0, signs: np.ndarray | None = None) -> None:
        self.device = torch.device(device)
        # Each channel's lesion contrast, as the numpy path's difference_maps reads it.
        self.signs = (None if signs is None or not np.any(signs) else
                      torch.as_tensor(np.asarray(signs, np.float32), device=self.device)
                      .reshape(1, -1, 1, 1))
        self.edge_guide_radius = int(edge_guide_radius)
        self.data = data
        self.prepared = prepared
        self.sub = sub
        self.median_size = int(median_size)
        idx = sub.slice_index
        self.index = torch.as_tensor(idx, dtype=torch.long, device=self.device)
        brain = torch.from_numpy(np.ascontiguousarray(prepared.brain)).to(self.device)
        # [n, X, Y]: slices first, the layout the resize and the median work in.
        self.brain_idx = brain.index_select(2, self.index).permute(2, 0, 1)
        self.scored_idx = self.brain_idx
        if erosion > 0 and idx.size:
            lo = max(int(idx.min()) - erosion, 0)
            hi = min(int(idx.max()) + erosion + 1, brain.shape[2])
            slab = erode_mask_torch(brain[..., lo:hi], erosion)
            self.scored_idx = slab.index_select(2, self.index - lo).permute(2, 0, 1)
        del brain

    def _to_grid(self, slices: torch.Tensor) -> torch.Tensor:
        """Model-space ``[n, C', S, S]`` -> ``[n, C', X, Y]`` on the volume grid (0 outside the
        crop box), as :func:`.preprocess.to_slices` (which is ``[C', X, Y, n]``)."""
        nx, ny, _ = self.prepared.shape
        n, channels, size = slices.shape[0], slices.shape[1], slices.shape[-1]
        x0, y0, side, _ = self.prepared.box
        big = slices
        if side != size:
            big = F.interpolate(slices, size=(side, side), mode="bilinear", align_corners=False,
                                antialias=side < size)
        out = torch.zeros((n, channels, nx, ny), dtype=torch.float32, device=self.device)
        sx0, sy0 = max(x0, 0), max(y0, 0)
        sx1, sy1 = min(x0 + side, nx), min(y0 + side, ny)
        out[:, :, sx0:sx1, sy0:sy1] = big[:, :, sx0 - x0:sx1 - x0, sy0 - y0:sy1 - y0]
        return out

    def _normalised(self, source: torch.Tensor) -> torch.Tensor:
        """``[n, C, X, Y]`` source slices as :func:`.preprocess.normalise_with` maps them."""
        factor = torch.as_tensor(2.0 / np.asarray(self.prepared.scale, dtype=np.float64),
                                 dtype=torch.float32, device=source.device).reshape(1, -1, 1, 1)
        inside = (source.float() * factor - 1.0).clamp_(-NORMALISED_LIMIT, NORMALISED_LIMIT)
        return torch.where(self.brain_idx[:, None], inside, torch.full_like(inside, BACKGROUND))

    def _per_channel(self, delta: torch.Tensor) -> torch.Tensor:
        """Model-space ``[n, C, S, S]`` input - healthy -> each channel's difference:
        |delta|, or where a sign is set only the change of that sign (``max(sign * delta, 0)``)."""
        if self.signs is None:
            return delta.abs()
        return torch.where(self.signs == 0, delta.abs(), (self.signs * delta).clamp_min(0.0))

    def __call__(self, healthy_s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(difference [X, Y, Z], per-channel difference [C, X, Y, Z], healthy [C, X, Y, Z]),
        numpy float32, as the numpy path's ``_volume_outputs``."""
        data = self.data
        channels = data.shape[0]
        shape = self.prepared.shape
        idx = self.sub.slice_index
        if idx.size == 0:
            return (np.zeros(shape, np.float32), np.zeros((channels, *shape), np.float32),
                    data.copy())
        dev = self.device
        input_s = torch.from_numpy(np.ascontiguousarray(self.sub.slices)).to(dev)
        healthy_t = torch.from_numpy(np.ascontiguousarray(healthy_s, dtype=np.float32)).to(dev)
        per_idx = self._to_grid(self._per_channel(input_s - healthy_t)).clamp_min_(0.0)
        volume = torch.from_numpy(np.ascontiguousarray(data)).to(dev)  # [C, X, Y, Z]
        source = volume.index_select(3, self.index).permute(3, 0, 1, 2)  # [n, C, X, Y]
        if self.edge_guide_radius > 0:  # as the numpy path: each channel by its own image
            per_idx = guided_filter_torch(per_idx, self._normalised(source),
                                          self.edge_guide_radius).clamp_min_(0.0)
        raw = per_idx.mean(dim=1)  # the resize is linear: = the resized channel mean
        smoothed = median_smooth_torch(raw, self.median_size)
        smoothed *= self.scored_idx
        per_idx *= self.brain_idx[:, None]

        delta = self._to_grid(input_s - healthy_t)  # [n, C, X, Y], normalised units
        delta *= self.brain_idx[:, None]
        scale = torch.as_tensor(self.prepared.scale / 2.0, dtype=torch.float32, device=dev)
        delta *= scale.reshape(1, -1, 1, 1)
        changed = source - delta
        if bool(source.min() >= 0):
            changed.clamp_min_(0.0)

        z = self.index
        difference = torch.zeros(shape, dtype=torch.float32, device=dev)
        difference[..., z] = smoothed.permute(1, 2, 0)
        per_channel = torch.zeros((channels, *shape), dtype=torch.float32, device=dev)
        per_channel[..., z] = per_idx.permute(1, 2, 3, 0)
        # On the CPU ``volume`` shares the caller's array: never write into the source.
        healthy = volume.clone() if dev.type == "cpu" else volume
        healthy[..., z] = changed.permute(1, 2, 3, 0)
        return difference.cpu().numpy(), per_channel.cpu().numpy(), healthy.cpu().numpy()
