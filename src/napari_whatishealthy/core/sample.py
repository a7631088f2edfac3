"""The sample case: the one bundled with the package, or one synthetic case made once into the
user cache where the package was installed without it."""

from __future__ import annotations

import sys
from pathlib import Path

from .runtime import user_cache_dir

#: The bundled sample (``Sample_{flair,t1,t1ce,t2,seg}.nii.gz``; see ``_sample_data``).
SAMPLE_DIR = Path(__file__).resolve().parent.parent / "sample"
SAMPLE_SEED = 7

__all__ = ["SAMPLE_DIR", "sample_case_path"]


def sample_case_path() -> Path:
    """The bundled sample case folder, or one synthetic case made once into the user cache
    (voxel size 2 mm, a typical lesion)."""
    if SAMPLE_DIR.is_dir():
        return SAMPLE_DIR
    from .synthetic import synthesise
    from .volume import is_case_folder

    root = user_cache_dir() / "sample-synthetic-v1"
    folder = root / f"Synth_{SAMPLE_SEED:04d}_0000"
    if not is_case_folder(folder):
        print(f"making a synthetic sample case in {root} (once)", file=sys.stderr)
        synthesise(root, 1, seed=SAMPLE_SEED, healthy_fraction=0.0, subtle_fraction=0.0,
                   voxel_size=2.0, overwrite=True)
    return folder
