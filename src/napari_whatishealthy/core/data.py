"""Training data: BraTS-layout case discovery and axial slices with image-level labels."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InputError
from .model import HEALTHY, UNHEALTHY
from .preprocess import prepare
from .volume import is_case_folder, load_volume


def discover_cases(root: str | Path) -> list[Path]:
    """Case folders under ``root`` (the folder itself, its children, or grandchildren)."""
    root = Path(root)
    if not root.exists():
        raise InputError(f"{root}: no such folder")
    if is_case_folder(root):
        return [root]
    found = sorted(p for p in root.iterdir() if is_case_folder(p))
    if not found:
        found = sorted(q for p in root.iterdir() if p.is_dir() for q in p.iterdir() if is_case_folder(q))
    if not found:
        raise InputError(
            f"{root}: no BraTS-layout case folders found (<case>/<case>_flair.nii.gz ...); "
            "make some with `whatishealthy synth`"
        )
    return found


def slice_labels(segmentation: np.ndarray, slice_index: np.ndarray) -> np.ndarray:
    """Image-level label per axial slice: unhealthy if the slice holds any lesion voxel."""
    has_lesion = (segmentation > 0).any(axis=(0, 1))
    return np.where(has_lesion[slice_index], UNHEALTHY, HEALTHY).astype(np.int64)


@dataclass
class SliceSet:
    """Model-space slices of many cases with their image-level labels (the masks are not kept)."""

    slices: np.ndarray  # [N, C, S, S] float16 to halve memory
    labels: np.ndarray  # [N] HEALTHY / UNHEALTHY
    case_of_slice: np.ndarray  # [N] index into cases
    cases: list[str]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.slices.shape)

    def read(self, index: np.ndarray) -> np.ndarray:
        """Slices ``index`` as a new array (the interface :class:`.slice_store.SliceStore` has)."""
        return self.slices[np.asarray(index, dtype=np.int64)]

    def subset(self, case_ids: np.ndarray) -> SliceSet:
        keep = np.isin(self.case_of_slice, case_ids)
        return SliceSet(self.slices[keep], self.labels[keep], self.case_of_slice[keep], self.cases)

    def counts(self) -> dict[str, int]:
        return {
            "healthy": int((self.labels == HEALTHY).sum()),
            "unhealthy": int((self.labels == UNHEALTHY).sum()),
        }


def build_slice_set(
    case_dirs: list[Path],
    modalities: tuple[str, ...],
    size: int,
    progress: Callable[[int, int], None] | None = None,
) -> SliceSet:
    """Load, normalise and slice every case; the segmentation only gives the slice labels."""
    all_slices, all_labels, owners, names = [], [], [], []
    for i, case in enumerate(case_dirs):
        volume = load_volume(case).select(modalities)
        if volume.segmentation is None:
            raise InputError(
                f"{case}: no segmentation (<case>_seg.nii.gz); training needs it for the "
                "image-level labels (healthy / unhealthy slice)"
            )
        prepared = prepare(volume.data, size)
        all_slices.append(prepared.slices.astype(np.float16))
        all_labels.append(slice_labels(volume.segmentation, prepared.slice_index))
        owners.append(np.full(len(prepared.slice_index), i, dtype=np.int64))
        names.append(volume.name)
        if progress is not None:
            progress(i + 1, len(case_dirs))
    channels = len(modalities)
    return SliceSet(
        slices=np.concatenate(all_slices) if all_slices else np.zeros((0, channels, size, size), np.float16),
        labels=np.concatenate(all_labels) if all_labels else np.zeros(0, np.int64),
        case_of_slice=np.concatenate(owners) if owners else np.zeros(0, np.int64),
        cases=names,
    )


def save_slice_set(slice_set: SliceSet, path: str | Path) -> None:
    np.savez(path, slices=slice_set.slices, labels=slice_set.labels,
             case_of_slice=slice_set.case_of_slice, cases=np.array(slice_set.cases))


def load_slice_set(path: str | Path) -> SliceSet:
    with np.load(path, allow_pickle=False) as data:
        return SliceSet(data["slices"], data["labels"], data["case_of_slice"], [str(c) for c in data["cases"]])
