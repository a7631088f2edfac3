"""Phantom cohorts for the scale benchmarks: made in seconds, without nilearn's template.

A phantom case is an ellipsoid "brain" with a smooth texture, a darker "ventricle" and, in most
cases, one or two bright blobs labelled as lesion, in the BraTS layout (four modalities and
``_seg``, written by the project's own case writer). They are not anatomy: they exercise
reading, preprocessing, the slice store and training at a chosen grid size, which is what the
scale benchmarks measure. Larger cohorts are made from a few unique cases by hard links under
new case names (each is still read, hashed and prepared as a case of its own).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

MODALITIES = ("flair", "t1", "t1ce", "t2")


def phantom_case(shape: tuple[int, int, int], rng: np.random.Generator,
                 lesion: bool) -> tuple[dict[str, np.ndarray], np.ndarray]:
    from scipy import ndimage

    grids = np.meshgrid(*[np.linspace(-1, 1, n, dtype=np.float32) for n in shape], indexing="ij")
    radii = rng.uniform(0.75, 0.9, 3)
    r2 = sum((g / r) ** 2 for g, r in zip(grids, radii, strict=True))
    brain = r2 < 1.0
    ventricle = sum((g / r) ** 2 for g, r in zip(grids, radii * 0.25, strict=True)) < 1.0
    texture = ndimage.zoom(rng.normal(0, 1, [max(2, n // 8) for n in shape]).astype(np.float32),
                           [n / max(2, n // 8) for n in shape], order=1)[: shape[0], : shape[1],
                                                                        : shape[2]]
    seg = np.zeros(shape, np.uint8)
    if lesion:
        for _ in range(int(rng.integers(1, 3))):
            centre = rng.uniform(-0.4, 0.4, 3)
            size = rng.uniform(0.1, 0.2)
            blob = sum((g - c) ** 2 for g, c in zip(grids, centre, strict=True)) < size ** 2
            seg[blob & brain] = 2
    images = {}
    for i, m in enumerate(MODALITIES):
        base = 400 + 60 * i + 40 * texture
        image = np.where(brain, base, 0).astype(np.float32)
        image[ventricle & brain] *= 0.5 if m != "t2" else 1.6
        image[seg > 0] *= 1.8 if m in ("flair", "t2") else 0.8
        images[m] = np.clip(image, 0, None)
    return images, seg


def make_cohort(root: Path, n_cases: int, shape: tuple[int, int, int] = (120, 120, 78),
                unique: int = 20, seed: int = 0) -> list[Path]:
    """``root/<case>/`` for ``n_cases`` cases (made once; existing cases are kept)."""
    from napari_whatishealthy.core.synthetic import write_case

    root.mkdir(parents=True, exist_ok=True)
    affine = np.diag([240 / shape[0], 240 / shape[1], 155 / shape[2], 1.0])
    rng = np.random.default_rng(seed)
    originals = []
    for i in range(min(unique, n_cases)):
        name = f"Phantom_{i:04d}"
        originals.append(root / name)
        if not (root / name / f"{name}_seg.nii.gz").exists():
            images, seg = phantom_case(shape, rng, lesion=i % 5 != 0)
            write_case(root, name, images, seg, affine, overwrite=True)
        else:
            rng.normal(size=1)
    cases = list(originals)
    for i in range(len(originals), n_cases):
        source = originals[i % len(originals)]
        name = f"Phantom_{i:04d}"
        folder = root / name
        folder.mkdir(exist_ok=True)
        for part in ("seg", *MODALITIES):
            target = folder / f"{name}_{part}.nii.gz"
            if not target.exists():
                os.link(source / f"{source.name}_{part}.nii.gz", target)
        cases.append(folder)
    return cases


def subset(root: Path, cases: list[Path], n: int) -> Path:
    """A folder of symbolic links to the first ``n`` cases (a smaller cohort, no copies)."""
    root.mkdir(parents=True, exist_ok=True)
    for case in cases[:n]:
        link = root / case.name
        if not link.exists():
            link.symlink_to(case.resolve(), target_is_directory=True)
    return root
