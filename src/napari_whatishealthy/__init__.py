"""napari-whatishealthy: lesion localization from a healthy counterfactual made by a
class-conditional diffusion model ("What is Healthy?").

The maths lives in :mod:`napari_whatishealthy.core` (no Qt, no napari); the napari plugin is
``napari.yaml`` with ``_reader``, ``_writer``, ``_sample_data`` and ``_widget``. Importing this
package imports neither napari nor torch.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "sample_case_path"]


def sample_case_path():
    """The bundled sample case folder (a synthetic BraTS-like case with its ground truth)."""
    from ._sample_data import sample_case_path as _path

    return _path()
