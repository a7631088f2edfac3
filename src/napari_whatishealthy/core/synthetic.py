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
from .synthetic_lesions import (  # noqa: F401  (re-exported: the lesion families' public names)
    FAMILIES,
    FAMILY_CONTRAST,
    FAMILY_WEIGHTS,
    LESION_CONTRAST,
    LesionInfo,
    _Component,
    _draw_families,
    _lesion,
    _render_lesions,
    _rotation,
    _smooth_field,
    _tumour,
)
from .volume import MODALITIES, canonical_to_source

# Mean intensity of each tissue per modality, relative (BraTS-like contrasts).
#                 csf    gm     wm
TISSUE_CONTRAST = {
    "flair": (0.12, 0.58, 0.46),
    "t1": (0.18, 0.48, 0.70),
    "t1ce": (0.20, 0.50, 0.68),
    "t2": (0.95, 0.55, 0.38),
}
GENERATOR_VERSION = 2


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
