"""napari writer: a Labels layer to ``.nii.gz`` / ``.nii``, voxel for voxel on its source grid.

When the layer carries the metadata of the image it came from (layers opened by this plugin's
reader and the widget's ``<image> mask`` layers do), the mask is mapped back from napari's
``(S, A, R)`` order to the source file's own orientation and written with the source affine and
header, so that it overlays the source in any viewer. Without that metadata the layer's scale,
translate (rotate, shear, affine) become a RAS affine. Values are written as uint8, through a
temporary file and a rename; a file the layer was read from is never overwritten.
"""

from __future__ import annotations

from typing import Any

from ._layers import write_mask


def write_labels(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    """npe2 single-layer writer: returns the path written."""
    return [str(write_mask(path, data, meta))]


def layer_meta(layer: Any) -> dict[str, Any]:
    """The ``meta`` napari passes to a writer, from a layer's public attributes."""
    return {
        "name": layer.name,
        "metadata": dict(layer.metadata),
        "scale": tuple(layer.scale),
        "translate": tuple(layer.translate),
        "rotate": layer.rotate,
        "shear": layer.shear,
        "affine": layer.affine.affine_matrix,
    }


def save_layer(layer: Any, path: str) -> list[str]:
    """Save a Labels layer through this writer (what the widget's Save button calls)."""
    return write_labels(path, layer.data, layer_meta(layer))
