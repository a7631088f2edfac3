"""The bundled sample: one synthetic BraTS-like case (2 mm, 120 x 120 x 78) with its ground truth.

Made once with ``core.synthetic.make_case('Sample', seed=1, kind='typical', voxel_size=2.0)`` and
``write_case`` (stored as BraTS stores files: LPS-flipped axes, int16); ``sample/sample.json``
records the call. It is synthetic (MNI152 template anatomy, simulated tumour), not a patient.
"""

from __future__ import annotations

from pathlib import Path

from ._layers import LayerDataTuple, read_case_folder, read_paths
from .core.sample import SAMPLE_DIR


def sample_case_path() -> Path:
    """The sample case folder (``Sample_{flair,t1,t1ce,t2,seg}.nii.gz``)."""
    return SAMPLE_DIR


def make_sample_data() -> list[LayerDataTuple]:
    """Layers of the sample case, as the reader gives them (four modalities and ``seg``)."""
    from ._writer import prefer_this_writer

    prefer_this_writer()
    return read_case_folder(SAMPLE_DIR, sample=True)


def make_flair_sample_data() -> list[LayerDataTuple]:
    """The single-volume workflow: only the sample's FLAIR file (and its ``seg``), opened as the
    reader opens lone files. The widget's automatic model choice then picks the FLAIR model."""
    from ._writer import prefer_this_writer

    prefer_this_writer()
    layers = read_paths([SAMPLE_DIR / "Sample_flair.nii.gz", SAMPLE_DIR / "Sample_seg.nii.gz"])
    for _, kwargs, _ in layers:
        kwargs["metadata"]["sample"] = True
        if kwargs["metadata"].get("modality") == "seg":
            kwargs["name"] = "seg"  # so that the widget offers it as the ground truth
    return layers
