"""Lesion families of the synthetic cases, the random fields they share with the anatomy, and
their rendering (segmentation, blend weight, intensities); see :mod:`.synthetic` for the families.

Split out of :mod:`.synthetic` unchanged (same draws in the same order: same seeded output);
its public names stay importable from there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage

from .volume import MODALITIES

if TYPE_CHECKING:
    from .synthetic import _Anatomy

# Tumour intensities per modality: necrosis, enhancing rim, oedema.
LESION_CONTRAST = {
    "typical": {
        "flair": (0.55, 0.85, 0.92),
        "t1": (0.16, 0.42, 0.50),
        "t1ce": (0.18, 1.00, 0.52),
        "t2": (0.95, 0.72, 0.82),
    },
    # Oedema in FLAIR at or below grey matter, weak enhancement: hard for intensity thresholds.
    "subtle": {
        "flair": (0.45, 0.58, 0.56),
        "t1": (0.30, 0.55, 0.60),
        "t1ce": (0.32, 0.78, 0.60),
        "t2": (0.80, 0.58, 0.55),
    },
}
# Intensity of the single (label 2) component of the other families, per kind and modality.
# "subtle" keeps FLAIR at or below grey matter (0.58) and puts the change in T1 / T2.
FAMILY_CONTRAST = {
    "multifocal": {
        "typical": {"flair": 0.88, "t1": 0.45, "t1ce": 0.47, "t2": 0.80},
        "subtle": {"flair": 0.56, "t1": 0.48, "t1ce": 0.50, "t2": 0.72},
    },
    "wedge": {
        "typical": {"flair": 0.85, "t1": 0.38, "t1ce": 0.45, "t2": 0.85},
        "subtle": {"flair": 0.57, "t1": 0.38, "t1ce": 0.42, "t2": 0.78},
    },
    "diffuse": {
        "typical": {"flair": 0.78, "t1": 0.55, "t1ce": 0.55, "t2": 0.72},
        "subtle": {"flair": 0.55, "t1": 0.56, "t1ce": 0.57, "t2": 0.64},
    },
    # FLAIR-isointense (between white and grey matter), clearly visible in T1 and T2.
    "isointense": {
        "typical": {"flair": 0.52, "t1": 0.30, "t1ce": 0.34, "t2": 0.85},
        "subtle": {"flair": 0.50, "t1": 0.34, "t1ce": 0.36, "t2": 0.80},
    },
}
#: Lesion families and how often each is drawn for a lesion case of each kind.
FAMILIES = ("tumour", "multifocal", "wedge", "diffuse", "isointense")
FAMILY_WEIGHTS = {
    "typical": {"tumour": 0.4, "multifocal": 0.2, "wedge": 0.2, "diffuse": 0.2},
    "subtle": {"tumour": 0.3, "multifocal": 0.2, "wedge": 0.15, "diffuse": 0.15, "isointense": 0.2},
}
#: Increase this when the same seed starts giving different cases (recorded in cases.json).


@dataclass
class LesionInfo:
    family: str
    centre_mm: list[float]
    radius_mm: float  # core radius (tumour), mean focus radius (multifocal), depth (wedge), radius
    count: int = 1  # foci (multifocal)
    contrast_strength: float = 1.0
    necrosis: bool = False
    voxels: int = 0


@dataclass
class _Component:
    """One labelled part of a lesion: a hard mask inside a box, its label and intensities."""

    box: tuple[slice, slice, slice]
    mask: np.ndarray  # bool, shape of the box
    label: int  # BraTS label: 1 necrosis, 4 enhancing, 2 oedema / non-enhancing lesion
    contrast: dict[str, float]
    edge_mm: float = 0.7  # Gaussian softness of the rendered edge
    strength: float = 1.0  # 1: full lesion contrast; less: closer to the tissue it replaces


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], coarse: int, amplitude: float) -> np.ndarray:
    """A smooth random field: coarse Gaussian noise, cubic splines to 1/4 size, then trilinear.

    Two stages because a cubic zoom straight to a BraTS-size grid costs about a second a field.
    """
    import torch
    import torch.nn.functional as F

    grid = rng.normal(0.0, 1.0, size=(coarse,) * len(shape)).astype(np.float32)
    mid = tuple(max(coarse, s // 4) for s in shape)
    mid_field = ndimage.zoom(grid, [m / coarse for m in mid], order=3, mode="nearest")
    tensor = torch.from_numpy(np.ascontiguousarray(mid_field))[None, None]
    full = F.interpolate(tensor, size=tuple(shape), mode="trilinear", align_corners=True)[0, 0]
    return (full.numpy() * amplitude).astype(np.float32)


def _rotation(rng: np.random.Generator, max_deg: tuple[float, float, float]) -> np.ndarray:
    ax, ay, az = (np.deg2rad(rng.uniform(-m, m)) for m in max_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _pick(rng: np.random.Generator, candidates: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    pool = candidates if len(candidates) else fallback
    if len(pool) == 0:
        raise ValueError("no voxel to place a lesion in (is the brain empty?)")
    return pool[rng.integers(len(pool))]


def _local_box(
    centre: np.ndarray, reach_mm: float, anatomy: _Anatomy
) -> tuple[tuple[slice, slice, slice], list[np.ndarray]]:
    """A box around ``centre`` reaching ``reach_mm`` (clipped to the grid) and the mm offsets of
    its voxels from the centre per axis."""
    reach = int(np.ceil(reach_mm / anatomy.voxel_size)) + 2
    lo = np.maximum(centre - reach, 0)
    hi = np.minimum(centre + reach + 1, anatomy.shape)
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
    local = np.indices(tuple(int(h - lo_) for lo_, h in zip(lo, hi, strict=True)), dtype=np.float32)
    offsets = [(local[a] + lo[a] - centre[a]) * anatomy.voxel_size for a in range(3)]
    return box, offsets  # type: ignore[return-value]


def _wobble(rng: np.random.Generator, shape: tuple[int, ...], coarse: int, amplitude: float,
            limit: float) -> np.ndarray:
    """1 + a smooth field, kept within 1 +- ``limit`` so that a shape never reaches its box's edge."""
    return np.clip(1.0 + _smooth_field(rng, shape, coarse, amplitude), 1.0 - limit, 1.0 + limit)


def _tumour(rng: np.random.Generator, anatomy: _Anatomy, kind: str) -> tuple[list[_Component], LesionInfo]:
    """Necrotic core (1), enhancing rim (4) and oedema (2) following white matter."""
    vs = anatomy.voxel_size
    core_radius = float(rng.uniform(5.0, 20.0) if kind == "typical" else rng.uniform(5.0, 16.0))
    oedema_factor = float(rng.uniform(1.4, 2.4))
    centre = _pick(rng, np.argwhere((anatomy.depth_mm > core_radius + 6) & (anatomy.wm > 0.3)),
                   np.argwhere(anatomy.depth_mm > 3))
    # The box reaches past the largest outline the wobble allows: no flat, clipped faces.
    box, offsets = _local_box(centre, core_radius * oedema_factor * 1.3 + vs, anatomy)
    radius = np.sqrt(sum(o**2 for o in offsets))
    core_d = radius / (core_radius * _wobble(rng, radius.shape, 4, 0.18, 0.25))
    oedema_d = radius / (core_radius * oedema_factor * _wobble(rng, radius.shape, 5, 0.25, 0.25))
    necrosis = bool(rng.random() < 0.7 and core_radius > 5)
    rim_inner = rng.uniform(0.45, 0.7) if necrosis else 0.0
    local_brain = anatomy.brain[box]
    nec = (core_d < rim_inner) & local_brain
    rim = (core_d < 1.0) & ~nec & local_brain
    oed = (oedema_d < 1.0) & ~nec & ~rim & local_brain & (anatomy.wm[box] > 0.15)
    table = LESION_CONTRAST[kind]
    components = [
        _Component(box, region, label, {m: table[m][i] for m in table})
        for i, (region, label) in enumerate(((nec, 1), (rim, 4), (oed, 2)))
    ]
    info = LesionInfo("tumour", [float(c * vs) for c in centre], core_radius, necrosis=necrosis)
    return components, info


def _multifocal(rng: np.random.Generator, anatomy: _Anatomy, kind: str) -> tuple[list[_Component], LesionInfo]:
    """4-16 small ovoid foci in white matter, most next to the ventricles (MS-like)."""
    vs = anatomy.voxel_size
    to_ventricle = anatomy.to_ventricle_mm()
    white = anatomy.wm > 0.5
    near = np.argwhere(white & (to_ventricle < 10.0)) if to_ventricle is not None else np.zeros((0, 3), int)
    anywhere = np.argwhere(white & (anatomy.depth_mm > 4.0))
    fallback = np.argwhere(anatomy.depth_mm > vs)
    n = int(rng.integers(4, 17))
    strength = float(rng.uniform(0.75, 1.0))
    contrast = FAMILY_CONTRAST["multifocal"][kind]
    components, radii, first = [], [], None
    for _ in range(n):
        centre = _pick(rng, near if rng.random() < 0.7 else anywhere, fallback)
        first = centre if first is None else first
        r = float(rng.uniform(1.5, 5.0))
        radii.append(r)
        elongation = float(rng.uniform(1.0, 2.2))
        box, offsets = _local_box(centre, r * elongation + vs, anatomy)
        rot = _rotation(rng, (90.0, 90.0, 90.0))
        local = np.einsum("ij,j...->i...", rot.T, np.stack(offsets))
        d = np.sqrt((local[0] / r) ** 2 + (local[1] / r) ** 2 + (local[2] / (r * elongation)) ** 2)
        mask = (d < 1.0) & anatomy.brain[box]
        # A focus smaller than a voxel still marks its centre voxel.
        mask[tuple(int(c - s.start) for c, s in zip(centre, box, strict=True))] = True
        components.append(_Component(box, mask, 2, contrast, 0.5, strength))
    info = LesionInfo("multifocal", [float(c * vs) for c in first], float(np.mean(radii)), count=n,
                      contrast_strength=strength)
    return components, info


def _inward_direction(depth: np.ndarray, centre: np.ndarray) -> np.ndarray:
    lo = np.maximum(centre - 3, 0)
    hi = np.minimum(centre + 4, depth.shape)
    patch = ndimage.gaussian_filter(depth[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))], 1.0)
    grads = np.gradient(patch) if min(patch.shape) > 1 else [np.zeros_like(patch)] * 3
    at = tuple(int(c - a) for c, a in zip(centre, lo, strict=True))
    g = np.array([float(gr[at]) for gr in grads])
    norm = np.linalg.norm(g)
    return g / norm if norm > 1e-6 else np.array([0.0, 0.0, -1.0])


def _wedge(rng: np.random.Generator, anatomy: _Anatomy, kind: str) -> tuple[list[_Component], LesionInfo]:
    """A wedge-shaped cortical lesion (infarct-like): wide at the cortex, narrowing inwards."""
    vs = anatomy.voxel_size
    surface = _pick(rng, np.argwhere((anatomy.depth_mm > 0) & (anatomy.depth_mm <= max(3.0, 1.5 * vs))
                                     & (anatomy.gm > 0.3)), np.argwhere(anatomy.depth_mm > 0))
    inward = _inward_direction(anatomy.depth_mm, surface)
    length = float(rng.uniform(15.0, 35.0))
    half_angle = np.deg2rad(rng.uniform(18.0, 35.0))
    box, offsets = _local_box(surface, length * 1.1 + vs, anatomy)
    rel = np.stack(offsets)
    along = np.einsum("i,i...->...", inward, rel)  # depth below the surface point, mm
    perp = np.sqrt(np.maximum(sum(o**2 for o in offsets) - along**2, 0.0))
    width = (length - along) * np.tan(half_angle) * _wobble(rng, along.shape, 4, 0.15, 0.3)
    tissue = (anatomy.gm[box] + anatomy.wm[box]) > 0.3
    mask = (along > -2.0 * vs) & (along < length) & (perp < np.maximum(width, 0.0)) & tissue
    mask &= anatomy.brain[box]
    mask[tuple(int(c - s.start) for c, s in zip(surface, box, strict=True))] = True
    strength = float(rng.uniform(0.75, 1.0))
    info = LesionInfo("wedge", [float(c * vs) for c in surface], length, contrast_strength=strength)
    return [_Component(box, mask, 2, FAMILY_CONTRAST["wedge"][kind], 0.7, strength)], info


def _blob(rng: np.random.Generator, anatomy: _Anatomy, family: str, kind: str, radius: float,
          amplitude: float, edge_mm: float) -> tuple[list[_Component], LesionInfo]:
    """An irregular blob (diffuse infiltration, FLAIR-isointense lesion) mostly in white matter."""
    vs = anatomy.voxel_size
    centre = _pick(rng, np.argwhere((anatomy.depth_mm > 0.6 * radius + 4) & (anatomy.wm > 0.4)),
                   np.argwhere(anatomy.depth_mm > vs))
    limit = 0.45
    box, offsets = _local_box(centre, radius * (1 + limit) + vs, anatomy)
    d = np.sqrt(sum(o**2 for o in offsets)) / (radius * _wobble(rng, offsets[0].shape, 5, amplitude, limit))
    mask = (d < 1.0) & anatomy.brain[box] & ((anatomy.wm[box] > 0.2) | (anatomy.gm[box] > 0.5))
    mask[tuple(int(c - s.start) for c, s in zip(centre, box, strict=True))] = True
    strength = float(rng.uniform(0.7, 1.0))
    info = LesionInfo(family, [float(c * vs) for c in centre], radius, contrast_strength=strength)
    return [_Component(box, mask, 2, FAMILY_CONTRAST[family][kind], edge_mm, strength)], info


def _lesion(rng: np.random.Generator, anatomy: _Anatomy, family: str, kind: str):
    if family == "tumour":
        return _tumour(rng, anatomy, kind)
    if family == "multifocal":
        return _multifocal(rng, anatomy, kind)
    if family == "wedge":
        return _wedge(rng, anatomy, kind)
    if family == "diffuse":
        # Non-enhancing, poorly delimited: a soft edge wider than the label's.
        return _blob(rng, anatomy, "diffuse", kind, float(rng.uniform(14.0, 30.0)), 0.35, 1.6)
    if family == "isointense":
        return _blob(rng, anatomy, "isointense", kind, float(rng.uniform(6.0, 18.0)), 0.25, 0.7)
    raise ValueError(f"unknown lesion family {family!r} (known: {', '.join(FAMILIES)})")


def _draw_families(rng: np.random.Generator, kind: str, families: tuple[str, ...] | None) -> list[str]:
    weights = {f: w for f, w in FAMILY_WEIGHTS[kind].items() if families is None or f in families}
    if not weights:  # e.g. only "isointense" asked for a typical case
        weights = {f: 1.0 for f in (families or FAMILIES)}
    names = list(weights)
    p = np.array([weights[f] for f in names])
    n = 1 if rng.random() < 0.75 else 2
    return [names[int(rng.choice(len(names), p=p / p.sum()))] for _ in range(n)]


def _render_lesions(
    components: list[_Component], shape: tuple[int, int, int], voxel_size: float
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Segmentation, blend weight [0, 1] and lesion intensity per modality of all components."""
    segmentation = np.zeros(shape, dtype=np.int16)
    weight = np.zeros(shape, np.float32)
    sums = {m: np.zeros(shape, np.float32) for m in MODALITIES}
    # Necrosis wins over the enhancing rim, the rim over oedema / non-enhancing lesion.
    priority = {2: 0, 4: 1, 1: 2}
    for comp in sorted(components, key=lambda c: priority[c.label]):
        segmentation[comp.box][comp.mask] = comp.label
    for comp in components:
        if not comp.mask.any():
            continue
        soft = ndimage.gaussian_filter(comp.mask.astype(np.float32), comp.edge_mm / voxel_size)
        soft *= comp.strength
        weight[comp.box] += soft
        for m in MODALITIES:
            sums[m][comp.box] += soft * comp.contrast[m]
    intensity = {m: sums[m] / np.maximum(weight, 1e-6) for m in MODALITIES}
    return segmentation, np.clip(weight, 0.0, 1.0), intensity
