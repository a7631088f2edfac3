"""Synthetic BraTS-like cases built from nilearn's packaged MNI152 template (offline, real anatomy).

Each case is the MNI152 2009 template and its grey/white-matter maps, deformed per subject
(affine scaling and rotation plus a smooth elastic field), with healthy variation (enlarged
ventricles, cortical atrophy with wider sulci), rendered in four modalities with BraTS-like
contrasts, a bias field and noise.

A lesion case holds one lesion family (a quarter of them two), drawn from:

- ``tumour``: necrotic core (BraTS label 1), enhancing rim (4) and oedema (2), 1 per family draw;
- ``multifocal``: 4-16 small ovoid white-matter foci (1.5-5 mm), most next to the ventricles
  (MS-like), label 2;
- ``wedge``: a wedge-shaped cortical lesion, wide at the cortex and narrowing inwards over
  15-35 mm (infarct-like), label 2;
- ``diffuse``: a large (14-30 mm) irregular non-enhancing lesion with a soft edge, label 2;
- ``isointense`` (subtle cases only): FLAIR-isointense, visible as T1 darkening and T2
  brightening, label 2.

The case's kind sets the contrast: "typical" lesions are bright in FLAIR/T2; "subtle" ones are
no brighter than grey matter in FLAIR (the change is in T1/T2, weak enhancement), because a
FLAIR intensity threshold is a strong baseline on bright lesions. Each non-tumour lesion has a
contrast strength in [0.7, 1] (1: the table's intensity; less: closer to the tissue it replaces).
Healthy controls have no lesion.

Cases are written in the BraTS layout, stored as BraTS stores them (LPS-flipped axes, int16),
and ``cases.json`` lists what each case holds (kind, families, lesions, anatomy variation).
Generation is seeded: the same seed gives the same files for one ``GENERATOR_VERSION``. Version 2
(lesion families, healthy variation, oedema no longer clipped by its box) gives other cases than
version 1 for the same seed; the kind of each case (healthy / typical / subtle) is unchanged.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from .output import OutputSet, write_json
from .volume import MODALITIES, canonical_to_source

# Mean intensity of each tissue per modality, relative (BraTS-like contrasts).
#                 csf    gm     wm
TISSUE_CONTRAST = {
    "flair": (0.12, 0.58, 0.46),
    "t1": (0.18, 0.48, 0.70),
    "t1ce": (0.20, 0.50, 0.68),
    "t2": (0.95, 0.55, 0.38),
}
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
GENERATOR_VERSION = 2


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
class CaseInfo:
    name: str
    kind: str  # healthy | typical | subtle
    seed: int
    families: list[str] = field(default_factory=list)
    lesions: list[LesionInfo] = field(default_factory=list)
    lesion_voxels: int = 0
    ventricle_dilation_mm: float = 0.0
    atrophy: float = 0.0
    shape: list[int] = field(default_factory=list)
    voxel_size_mm: float = 1.0


@dataclass
class _Component:
    """One labelled part of a lesion: a hard mask inside a box, its label and intensities."""

    box: tuple[slice, slice, slice]
    mask: np.ndarray  # bool, shape of the box
    label: int  # BraTS label: 1 necrosis, 4 enhancing, 2 oedema / non-enhancing lesion
    contrast: dict[str, float]
    edge_mm: float = 0.7  # Gaussian softness of the rendered edge
    strength: float = 1.0  # 1: full lesion contrast; less: closer to the tissue it replaces


_TEMPLATE_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}


@lru_cache(maxsize=1)
def _templates() -> dict[str, np.ndarray]:
    """MNI152 T1 template, GM/WM probabilities and brain mask at 1 mm (RAS), plus their affine.

    Read straight from the files nilearn ships, as ``nilearn.datasets.load_mni152_*`` reads
    them (each divided by its maximum; brain = T1 > 0.2), without importing
    ``nilearn.datasets``, which pulls in ``requests`` for its downloaders.
    """
    import importlib.util

    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the synthetic cases need nilearn's MNI152 template files: pip install nilearn")
    data_dir = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"
    out: dict[str, np.ndarray] = {}
    for key, filename in _TEMPLATE_FILES.items():
        img = nib.load(data_dir / filename)
        array = np.asarray(img.dataobj, dtype=np.float32)
        out[key] = array / array.max()
        out["affine"] = img.affine.astype(np.float64)
    out["brain"] = (out["t1"] > 0.2).astype(np.float32)
    return out


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


def grid_for(voxel_size: float) -> tuple[tuple[int, int, int], np.ndarray]:
    """BraTS-size field of view (240 x 240 x 155 mm) at the given voxel size, RAS affine."""
    fov = np.array([240.0, 240.0, 155.0])
    shape = tuple(int(round(f / voxel_size)) for f in fov)
    affine = np.diag([voxel_size, voxel_size, voxel_size, 1.0])
    # Centre the field of view on the template brain (MNI centre is near the origin).
    affine[:3, 3] = np.array([-120.0, -138.0, -62.0]) + voxel_size / 2
    return shape, affine  # type: ignore[return-value]


def _sample_coordinates(
    rng: np.random.Generator, shape: tuple[int, int, int], affine: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Template voxel coordinates for every output voxel under a random subject deformation."""
    tpl = _templates()
    scale = rng.uniform(0.9, 1.1, size=3)
    rotation = _rotation(rng, (4.0, 4.0, 8.0))
    shift = rng.uniform(-5, 5, size=3)
    centre = np.array([0.0, -18.0, 18.0])  # approximate centre of the MNI brain, mm
    # world_out = R S (world_tpl - centre) + centre + shift  =>  invert for world_tpl.
    forward = rotation @ np.diag(scale)
    inverse = np.linalg.inv(forward)
    tpl_inv = np.linalg.inv(tpl["affine"])
    # out voxel -> out world -> template world -> template voxel, as one affine.
    m_world = np.eye(4)
    m_world[:3, :3] = inverse
    m_world[:3, 3] = centre - inverse @ (centre + shift)
    total = tpl_inv @ m_world @ affine
    coarse_shape = tuple(max(4, s // 8) for s in shape)
    elastic = [_smooth_field(rng, coarse_shape, 5, 2.5) for _ in range(3)]
    idx = np.indices(shape, dtype=np.float32).reshape(3, -1)
    coords = (total[:3, :3].astype(np.float32) @ idx) + total[:3, 3:4].astype(np.float32)
    import torch
    import torch.nn.functional as F

    # Trilinear upsampling of the three displacement fields at once (scipy's zoom took ~2 s).
    stacked = torch.from_numpy(np.stack(elastic))[None]
    disp = F.interpolate(stacked, size=tuple(shape), mode="trilinear", align_corners=True)[0].numpy()
    coords += disp.reshape(3, -1)
    return coords, forward


def _warp(array: np.ndarray, coords: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    return ndimage.map_coordinates(array, coords, order=1, mode="constant", cval=0.0).reshape(shape)


@dataclass
class _Anatomy:
    """Tissue maps of one subject plus the derived maps that lesion placement needs."""

    brain: np.ndarray  # bool
    csf: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    depth_mm: np.ndarray  # distance to the brain's outside, mm
    ventricles: np.ndarray  # bool: deep CSF
    voxel_size: float
    _to_ventricle: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.brain.shape)  # type: ignore[return-value]

    def to_ventricle_mm(self) -> np.ndarray | None:
        """Distance (mm) to the nearest ventricle voxel inside the brain, inf outside; computed
        once (of the template's ventricles, before any enlargement). None without ventricles."""
        if not self.ventricles.any():
            return None
        if self._to_ventricle is None:
            distance = _distance_mm(~self.ventricles, self.voxel_size, _brain_box(self.brain))
            distance[~self.brain] = np.inf
            self._to_ventricle = distance
        return self._to_ventricle


def _brain_box(brain: np.ndarray, margin: int = 2) -> tuple[slice, ...]:
    hits = np.argwhere(brain)
    if hits.size == 0:
        return tuple(slice(0, s) for s in brain.shape)
    lo = np.maximum(hits.min(axis=0) - margin, 0)
    hi = np.minimum(hits.max(axis=0) + margin + 1, brain.shape)
    return tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))


def _distance_mm(mask: np.ndarray, voxel_size: float, box: tuple[slice, ...]) -> np.ndarray:
    """Distance (mm) from each voxel of ``mask`` to the nearest voxel outside it, within ``box``."""
    out = np.zeros(mask.shape, np.float32)
    out[box] = ndimage.distance_transform_edt(mask[box]) * voxel_size
    return out


def _ventricles(csf: np.ndarray, depth_mm: np.ndarray, voxel_size: float) -> np.ndarray:
    """Deep CSF thicker than about 5 mm: the ventricles, not the interhemispheric fissure or
    deep sulci (an opening removes those thin sheets). Empty on coarse grids."""
    deep = (csf > 0.5) & (depth_mm > 15.0)
    iterations = int(np.ceil(2.5 / voxel_size))
    if voxel_size > 2.5 or not deep.any():
        return np.zeros_like(deep)
    return ndimage.binary_opening(deep, iterations=iterations)


def _vary_anatomy(rng: np.random.Generator, anatomy: _Anatomy, info: CaseInfo) -> None:
    """Healthy variation: enlarged ventricles and cortical atrophy (wider sulci), in place."""
    vs = anatomy.voxel_size
    atrophy = float(rng.uniform(0.0, 0.5)) if rng.random() < 0.6 else 0.0
    dilation = (float(rng.uniform(0.0, 4.0)) if rng.random() < 0.6 else 0.0) + 4.0 * atrophy
    to_ventricle = anatomy.to_ventricle_mm()
    if dilation > 0 and to_ventricle is not None:
        # Soft growth over about one voxel; never up to the cortex.
        grow = np.clip((dilation - to_ventricle) / max(vs, 1.0) + 0.5, 0.0, 1.0)
        grow *= anatomy.depth_mm > 8.0
        anatomy.csf = np.maximum(anatomy.csf, grow)
        anatomy.gm *= 1.0 - grow
        anatomy.wm *= 1.0 - grow
    if atrophy > 0:
        # Sulcal widening: a regionally varying share of the outer cortex becomes CSF.
        regional = np.clip(0.6 + _smooth_field(rng, anatomy.shape, 4, 0.5), 0.0, 1.0)
        outer = np.clip(1.0 - anatomy.depth_mm / 12.0, 0.0, 1.0)
        lost = atrophy * regional * outer * anatomy.gm
        anatomy.gm -= lost
        anatomy.csf += lost
    info.ventricle_dilation_mm = round(dilation, 2)
    info.atrophy = round(atrophy, 3)


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


def _subject(rng: np.random.Generator, voxel_size: float) -> tuple[_Anatomy, np.ndarray, np.ndarray]:
    """One deformed template subject: its tissue maps, T1 template image and RAS affine."""
    shape, affine = grid_for(voxel_size)
    tpl = _templates()
    coords, _ = _sample_coordinates(rng, shape, affine)
    brain = _warp(tpl["brain"], coords, shape) > 0.5
    gm = _warp(tpl["gm"], coords, shape) * brain
    wm = _warp(tpl["wm"], coords, shape) * brain
    t1_tpl = _warp(tpl["t1"], coords, shape) * brain
    csf = np.clip(1.0 - gm - wm, 0.0, 1.0) * brain
    depth = _distance_mm(brain, voxel_size, _brain_box(brain))
    anatomy = _Anatomy(brain, csf, gm, wm, depth, _ventricles(csf, depth, voxel_size), voxel_size)
    return anatomy, t1_tpl, affine


def make_case(
    name: str,
    seed: int,
    kind: str,
    voxel_size: float = 1.0,
    families: tuple[str, ...] | None = None,
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, CaseInfo]:
    """One case in canonical RAS: ({modality: float array}, segmentation, RAS affine, info).

    ``families`` restricts the lesion families drawn (default: all that suit ``kind``).
    """
    if kind not in ("healthy", "typical", "subtle"):
        raise ValueError(f"unknown case kind {kind!r}")
    if families is not None:
        unknown = sorted(set(families) - set(FAMILIES))
        if unknown:
            raise ValueError(f"unknown lesion families {unknown} (known: {', '.join(FAMILIES)})")
    rng = np.random.default_rng(seed)
    anatomy, t1_tpl, affine = _subject(rng, voxel_size)
    shape = anatomy.shape
    info = CaseInfo(name=name, kind=kind, seed=seed, shape=list(shape), voxel_size_mm=voxel_size)
    _vary_anatomy(rng, anatomy, info)
    total = anatomy.gm + anatomy.wm + anatomy.csf + 1e-6
    tissues = [anatomy.csf / total, anatomy.gm / total, anatomy.wm / total]
    # Fine anatomical texture from the real template, shared across modalities.
    detail = t1_tpl - ndimage.gaussian_filter(t1_tpl, 2.0 / voxel_size)

    components: list[_Component] = []
    if kind != "healthy":
        info.families = _draw_families(rng, kind, families)
        for family in info.families:
            parts, lesion_info = _lesion(rng, anatomy, family, kind)
            lesion_info.voxels = int(sum(int(p.mask.sum()) for p in parts))
            components += parts
            info.lesions.append(lesion_info)
    segmentation, lesion_weight, lesion_intensity = _render_lesions(components, shape, voxel_size)
    info.lesion_voxels = int((segmentation > 0).sum())

    bias_shared = _smooth_field(rng, shape, 4, 0.08)
    images: dict[str, np.ndarray] = {}
    for modality in MODALITIES:
        jitter = 1.0 + rng.normal(0.0, 0.04, size=3)
        base = sum(p * mu * j for p, mu, j in zip(tissues, TISSUE_CONTRAST[modality], jitter, strict=True))
        texture_sign = -1.0 if modality in ("t2", "flair") else 1.0
        image = base + texture_sign * 0.35 * detail
        if modality == "t1":
            image = 0.6 * image + 0.4 * t1_tpl * 0.75
        if components:
            lesion_int = lesion_intensity[modality] * (1.0 + rng.normal(0.0, 0.05))
            # Lesion tissue keeps some texture of the anatomy it replaced.
            image = (1 - lesion_weight) * image + lesion_weight * (lesion_int + 0.15 * detail)
        bias = np.exp(bias_shared + _smooth_field(rng, shape, 3, 0.05))
        image = image * bias
        image = image + rng.normal(0.0, 0.025, size=shape).astype(np.float32)
        image = np.clip(image, 0.0, None) * anatomy.brain
        scale = rng.uniform(600.0, 1200.0)
        images[modality] = (image * scale).astype(np.float32)
    return images, segmentation, affine, info


def brats_storage_affine(ras_affine: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """The affine of the same grid stored as BraTS files are (x and y axes flipped, LPS-like)."""
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[0, 3] = shape[0] - 1
    flip[1, 3] = shape[1] - 1
    return ras_affine @ flip


def write_case(
    out: Path,
    name: str,
    images: dict[str, np.ndarray],
    segmentation: np.ndarray,
    ras_affine: np.ndarray,
    overwrite: bool = False,
) -> Path:
    folder = Path(out) / name
    shape = segmentation.shape
    affine = brats_storage_affine(ras_affine, shape)
    arrays = {**images, "seg": segmentation}
    with OutputSet(overwrite=overwrite) as outputs:  # the case's files appear together
        for key, array in arrays.items():
            stored = canonical_to_source(array, affine)
            dtype = np.uint8 if key == "seg" else np.int16
            img = nib.Nifti1Image(np.rint(stored).astype(dtype), affine)
            img.set_data_dtype(dtype)
            img.header.set_xyzt_units("mm", "sec")
            img.header.set_qform(affine, code=1)
            img.header.set_sform(affine, code=1)
            outputs.stage(folder / f"{name}_{key}.nii.gz", lambda tmp, img=img: nib.save(img, tmp))
        outputs.commit()
    return folder


def case_kinds(n_cases: int, healthy_fraction: float, subtle_fraction: float, rng: np.random.Generator) -> list[str]:
    n_healthy = int(round(n_cases * healthy_fraction))
    n_subtle = int(round((n_cases - n_healthy) * subtle_fraction))
    kinds = ["healthy"] * n_healthy + ["subtle"] * n_subtle
    kinds += ["typical"] * (n_cases - len(kinds))
    rng.shuffle(kinds)
    return kinds


def plan_cases(
    cases: int, seed: int, healthy_fraction: float = 0.2, subtle_fraction: float = 0.3,
    prefix: str = "Synth",
) -> list[tuple[str, str, int]]:
    """(name, kind, case seed) of each case that ``synthesise`` with these arguments makes."""
    rng = np.random.default_rng(seed)
    kinds = case_kinds(cases, healthy_fraction, subtle_fraction, rng)
    case_seeds = rng.integers(0, 2**31 - 1, size=cases)
    return [(f"{prefix}_{seed:04d}_{i:04d}", kind, int(case_seed))
            for i, (kind, case_seed) in enumerate(zip(kinds, case_seeds, strict=True))]


def synthesise(
    out: str | Path,
    cases: int,
    seed: int = 0,
    healthy_fraction: float = 0.2,
    subtle_fraction: float = 0.3,
    voxel_size: float = 1.0,
    prefix: str = "Synth",
    overwrite: bool = False,
    progress=None,
    families: tuple[str, ...] | None = None,
) -> list[CaseInfo]:
    """Write ``cases`` BraTS-layout case folders and ``cases.json`` into ``out``.

    ``families`` restricts the lesion families (default: all, see the module docstring).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    infos = []
    for i, (name, kind, case_seed) in enumerate(plan_cases(cases, seed, healthy_fraction,
                                                           subtle_fraction, prefix)):
        images, seg, affine, info = make_case(name, case_seed, kind, voxel_size, families)
        write_case(out, name, images, seg, affine, overwrite=overwrite)
        infos.append(info)
        if progress is not None:
            progress(i + 1, cases, info)
    manifest = {
        "generator": "napari-whatishealthy synthetic",
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "families": list(families or FAMILIES),
        "voxel_size_mm": voxel_size,
        "healthy_fraction": healthy_fraction,
        "subtle_fraction": subtle_fraction,
        "cases": [asdict(i) for i in infos],
    }
    write_json(manifest, out / "cases.json", overwrite=True)
    return infos
