"""Synthetic BraTS-like cases built from nilearn's packaged MNI152 template (offline, real anatomy).

Each case is the MNI152 2009 template and its grey/white-matter maps, deformed per subject
(affine scaling and rotation plus a smooth elastic field), rendered in four modalities with
BraTS-like contrasts, a bias field and noise, with 0-2 tumours: necrotic core (BraTS label 1),
enhancing rim (4) and oedema (2). Lesions are "typical" (bright in FLAIR/T2, enhancing rim) or
"subtle" (FLAIR no brighter than grey matter, weak enhancement), because a FLAIR intensity
threshold is a strong baseline on bright lesions. Healthy controls have no lesion.

Cases are written in the BraTS layout, stored as BraTS stores them (LPS-flipped axes, int16),
and ``cases.json`` lists what each case holds. Generation is seeded: the same seed gives the same
files.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from .output import OutputSet
from .volume import MODALITIES, canonical_to_source

# Mean intensity of each tissue per modality, relative (BraTS-like contrasts).
#                 csf    gm     wm
TISSUE_CONTRAST = {
    "flair": (0.12, 0.58, 0.46),
    "t1": (0.18, 0.48, 0.70),
    "t1ce": (0.20, 0.50, 0.68),
    "t2": (0.95, 0.55, 0.38),
}
# Lesion intensities per modality: necrosis, enhancing rim, oedema.
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


@dataclass
class LesionInfo:
    centre_mm: list[float]
    core_radius_mm: float
    oedema_factor: float
    necrosis: bool
    voxels: int = 0


@dataclass
class CaseInfo:
    name: str
    kind: str  # healthy | typical | subtle
    seed: int
    lesions: list[LesionInfo] = field(default_factory=list)
    lesion_voxels: int = 0
    shape: list[int] = field(default_factory=list)
    voxel_size_mm: float = 1.0


@lru_cache(maxsize=1)
def _templates() -> dict[str, np.ndarray]:
    """MNI152 T1 template, GM/WM probabilities and brain mask at 1 mm (RAS), plus their affine."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from nilearn import datasets

        t1 = datasets.load_mni152_template(resolution=1)
        gm = datasets.load_mni152_gm_template(resolution=1)
        wm = datasets.load_mni152_wm_template(resolution=1)
        mask = datasets.load_mni152_brain_mask(resolution=1)
    out = {
        "t1": np.asarray(t1.dataobj, dtype=np.float32),
        "gm": np.asarray(gm.dataobj, dtype=np.float32),
        "wm": np.asarray(wm.dataobj, dtype=np.float32),
        "brain": np.asarray(mask.dataobj, dtype=np.float32),
        "affine": t1.affine.astype(np.float64),
    }
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
    zoom = [s / c for s, c in zip(shape, coarse_shape, strict=True)]
    for axis in range(3):
        disp = ndimage.zoom(elastic[axis], zoom, order=1)[: shape[0], : shape[1], : shape[2]]
        coords[axis] += disp.reshape(-1) / np.float32(1.0)
    return coords, forward


def _warp(array: np.ndarray, coords: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    return ndimage.map_coordinates(array, coords, order=1, mode="constant", cval=0.0).reshape(shape)


def _tumour_regions(
    rng: np.random.Generator,
    shape: tuple[int, int, int],
    voxel_size: float,
    brain: np.ndarray,
    wm: np.ndarray,
    kind: str,
) -> tuple[np.ndarray, LesionInfo]:
    """Soft maps [3, X, Y, Z] of necrosis, enhancing rim and oedema for one tumour."""
    # Centre: deep enough in the brain (distance transform) and preferably in white matter.
    inside = ndimage.distance_transform_edt(brain) * voxel_size
    core_radius = float(rng.uniform(5.0, 20.0) if kind == "typical" else rng.uniform(5.0, 16.0))
    oedema_factor = float(rng.uniform(1.4, 2.4))
    candidates = np.argwhere((inside > core_radius + 6) & (wm > 0.3))
    if candidates.size == 0:
        candidates = np.argwhere(inside > 3)
    centre = candidates[rng.integers(len(candidates))]
    reach = int(np.ceil(core_radius * oedema_factor * 1.5 / voxel_size)) + 3
    lo = np.maximum(centre - reach, 0)
    hi = np.minimum(centre + reach + 1, shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    local = np.indices(tuple(hi - lo), dtype=np.float32)
    offsets = [(local[a] + lo[a] - centre[a]) * voxel_size for a in range(3)]
    radius = np.sqrt(sum(o**2 for o in offsets))
    # Irregular outline: the radius is modulated by a smooth field.
    wobble = 1.0 + _smooth_field(rng, radius.shape, 4, 0.18)
    core_d = radius / (core_radius * wobble)
    oedema_wobble = 1.0 + _smooth_field(rng, radius.shape, 5, 0.25)
    oedema_d = radius / (core_radius * oedema_factor * oedema_wobble)
    necrosis = bool(rng.random() < 0.7 and core_radius > 5)
    rim_inner = rng.uniform(0.45, 0.7) if necrosis else 0.0
    regions = np.zeros((3,) + tuple(shape), dtype=np.float32)
    local_brain = brain[box] > 0
    nec = (core_d < rim_inner) & local_brain
    rim = (core_d < 1.0) & ~nec & local_brain
    # Oedema follows white matter more than grey matter.
    oed = (oedema_d < 1.0) & ~nec & ~rim & local_brain & (wm[box] > 0.15)
    for i, region in enumerate((nec, rim, oed)):
        regions[(i,) + box] = region
    info = LesionInfo(
        centre_mm=[float(c * voxel_size) for c in centre],
        core_radius_mm=core_radius,
        oedema_factor=oedema_factor,
        necrosis=necrosis,
        voxels=int(nec.sum() + rim.sum() + oed.sum()),
    )
    return regions, info


def make_case(
    name: str, seed: int, kind: str, voxel_size: float = 1.0
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, CaseInfo]:
    """One case in canonical RAS: ({modality: float array}, segmentation, RAS affine, info)."""
    if kind not in ("healthy", "typical", "subtle"):
        raise ValueError(f"unknown case kind {kind!r}")
    rng = np.random.default_rng(seed)
    shape, affine = grid_for(voxel_size)
    tpl = _templates()
    coords, _ = _sample_coordinates(rng, shape, affine)
    brain = _warp(tpl["brain"], coords, shape) > 0.5
    gm = _warp(tpl["gm"], coords, shape) * brain
    wm = _warp(tpl["wm"], coords, shape) * brain
    t1_tpl = _warp(tpl["t1"], coords, shape) * brain
    csf = np.clip(1.0 - gm - wm, 0.0, 1.0) * brain
    total = gm + wm + csf + 1e-6
    tissues = [csf / total, gm / total, wm / total]
    # Fine anatomical texture from the real template, shared across modalities.
    detail = t1_tpl - ndimage.gaussian_filter(t1_tpl, 2.0 / voxel_size)

    info = CaseInfo(name=name, kind=kind, seed=seed, shape=list(shape), voxel_size_mm=voxel_size)
    lesion = np.zeros((3,) + tuple(shape), dtype=np.float32)
    if kind != "healthy":
        n_tumours = 1 if rng.random() < 0.7 else 2
        for _ in range(n_tumours):
            regions, lesion_info = _tumour_regions(rng, shape, voxel_size, brain, wm, kind)
            lesion = np.maximum(lesion, regions)
            info.lesions.append(lesion_info)
        # Hard labels before smoothing: necrosis wins over rim, rim over oedema.
    segmentation = np.zeros(shape, dtype=np.int16)
    segmentation[lesion[2] > 0] = 2
    segmentation[lesion[1] > 0] = 4
    segmentation[lesion[0] > 0] = 1
    info.lesion_voxels = int((segmentation > 0).sum())
    soft = np.stack([ndimage.gaussian_filter(m, 0.7 / voxel_size) for m in lesion]) if kind != "healthy" else lesion
    lesion_weight = np.clip(soft.sum(axis=0), 0.0, 1.0)

    bias_shared = _smooth_field(rng, shape, 4, 0.08)
    images: dict[str, np.ndarray] = {}
    for modality in MODALITIES:
        jitter = 1.0 + rng.normal(0.0, 0.04, size=3)
        base = sum(p * mu * j for p, mu, j in zip(tissues, TISSUE_CONTRAST[modality], jitter, strict=True))
        texture_sign = -1.0 if modality in ("t2", "flair") else 1.0
        image = base + texture_sign * 0.35 * detail
        if modality == "t1":
            image = 0.6 * image + 0.4 * t1_tpl * 0.75
        if kind != "healthy":
            contrast = LESION_CONTRAST[kind][modality]
            jitter_l = 1.0 + rng.normal(0.0, 0.05, size=3)
            lesion_int = sum(s * c * j for s, c, j in zip(soft, contrast, jitter_l, strict=True)) / np.maximum(
                soft.sum(axis=0), 1e-6
            )
            # Lesion tissue keeps some texture of the anatomy it replaced.
            image = (1 - lesion_weight) * image + lesion_weight * (lesion_int + 0.15 * detail)
        bias = np.exp(bias_shared + _smooth_field(rng, shape, 3, 0.05))
        image = image * bias
        image = image + rng.normal(0.0, 0.025, size=shape).astype(np.float32)
        image = np.clip(image, 0.0, None) * brain
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
) -> list[CaseInfo]:
    """Write ``cases`` BraTS-layout case folders and ``cases.json`` into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    kinds = case_kinds(cases, healthy_fraction, subtle_fraction, rng)
    case_seeds = rng.integers(0, 2**31 - 1, size=cases)
    infos = []
    for i, (kind, case_seed) in enumerate(zip(kinds, case_seeds, strict=True)):
        name = f"{prefix}_{seed:04d}_{i:04d}"
        images, seg, affine, info = make_case(name, int(case_seed), kind, voxel_size)
        write_case(out, name, images, seg, affine, overwrite=overwrite)
        infos.append(info)
        if progress is not None:
            progress(i + 1, cases, info)
    manifest = {
        "generator": "napari-whatishealthy synthetic",
        "seed": seed,
        "voxel_size_mm": voxel_size,
        "healthy_fraction": healthy_fraction,
        "subtle_fraction": subtle_fraction,
        "cases": [asdict(i) for i in infos],
    }
    (out / "cases.json").write_text(json.dumps(manifest, indent=2))
    return infos
