"""A localization's files: their names next to a case, the checks made before any work (never
over an input, existing files only with ``overwrite``, room on the disk), and writing them on the
source grid as one set through :mod:`.output`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from .pipeline import LocalizeResult


def output_paths(
    out_dir: str | Path,
    case: str,
    modalities: Sequence[str] = (),
    all_channels: bool = False,
    uncertainty: bool = False,
) -> dict[str, Path]:
    """Where :func:`write_outputs` writes a case: keys ``healthy``, ``difference``, ``mask``,
    ``provenance``, with ``all_channels`` ``healthy_<modality>`` for every channel, and with
    ``uncertainty`` (a run over several noise levels) ``uncertainty``."""
    out = Path(out_dir)
    paths = {
        "healthy": out / f"{case}_healthy.nii.gz",
        "difference": out / f"{case}_difference.nii.gz",
        "mask": out / f"{case}_mask.nii.gz",
        "provenance": out / f"{case}_provenance.json",
    }
    if all_channels:
        for m in modalities:
            paths[f"healthy_{m}"] = out / f"{case}_healthy_{m}.nii.gz"
    if uncertainty:
        paths["uncertainty"] = out / f"{case}_uncertainty.nii.gz"
    return paths


def output_bytes(paths: dict[str, Path], voxels: int) -> int:
    """An upper bound on the bytes :func:`write_outputs` writes for a source grid of ``voxels``
    voxels (float32 maps and a uint8 mask, before compression), for the free-space check."""
    floats = sum(1 for key in paths
                 if key.startswith("healthy") or key in ("difference", "uncertainty"))
    return voxels * (4 * floats + 1) + 64 * 1024


def check_outputs(
    paths: dict[str, Path], protected: Iterable[str | Path] = (), overwrite: bool = False,
    voxels: int = 0,
) -> None:
    """Refuse, before any work, outputs that would replace an input or (without overwrite) an
    existing file, names the file system cannot hold, a folder that cannot be written, and
    (given the source grid's ``voxels``) a disk without room for the outputs."""
    from .output import OutputSet, check_folder

    checker = OutputSet(protected, overwrite)
    for path in paths.values():
        checker.check(path)
    for folder in {p.parent for p in paths.values()}:
        check_folder(folder, output_bytes(paths, voxels) if voxels else 0)


def write_outputs(
    result: LocalizeResult,
    volume: Any,
    out_dir: str | Path,
    case: str | None = None,
    overwrite: bool = False,
    all_channels: bool = False,
    inputs: Iterable[str | Path] = (),
) -> dict[str, Path]:
    """Write a result on its volume's source grid (see :func:`output_paths` for the names), as
    one set.

    ``volume`` is the :class:`~napari_whatishealthy.core.volume.Volume` the result came from;
    its files and ``inputs`` (the model's, say) are never written over.
    ``<case>_healthy.nii.gz`` is the healthy image of the first model channel (FLAIR for the
    default model); ``all_channels`` adds one file per channel. All files are written to
    temporary names and then renamed together, the provenance (with every output's SHA-256)
    last (see :mod:`.output`): an error, Ctrl-C or SIGTERM leaves the previous set whole.
    """
    import nibabel as nib

    from .output import OutputSet, json_text, sha256_file
    from .volume import on_source_grid

    case = case or volume.name
    paths = output_paths(out_dir, case, result.modalities, all_channels,
                         uncertainty=result.uncertainty is not None)
    protected = (*volume.input_paths, *inputs)
    check_outputs(paths, protected, overwrite)
    arrays: list[tuple[str, np.ndarray, type]] = [
        ("healthy", result.healthy[0], np.float32),
        ("difference", result.difference, np.float32),
        ("mask", result.mask, np.uint8),
    ]
    for i, m in enumerate(result.modalities):
        if f"healthy_{m}" in paths:
            arrays.append((f"healthy_{m}", result.healthy[i], np.float32))
    if result.uncertainty is not None:
        arrays.append(("uncertainty", result.uncertainty, np.float32))
    with OutputSet(protected, overwrite) as outputs:
        digests: dict[str, str] = {}
        for key, array, dtype in arrays:
            img = on_source_grid(array, volume, dtype)
            temp = outputs.stage(paths[key], lambda tmp, img=img: nib.save(img, tmp))
            digests[key] = sha256_file(temp)
        provenance = dict(result.provenance)
        provenance["outputs"] = {k: str(p.resolve()) for k, p in paths.items()}
        provenance["output_sha256"] = digests
        provenance["healthy_channel"] = result.modalities[0] if result.modalities else None
        text = json_text(provenance)
        outputs.stage(paths["provenance"], lambda tmp: Path(tmp).write_text(text))
        outputs.commit()
    return paths
