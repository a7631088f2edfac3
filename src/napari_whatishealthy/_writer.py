"""napari writer: a Labels layer to ``.nii.gz`` / ``.nii``, voxel for voxel on its source grid.

When the layer carries the metadata of the image it came from (layers opened by this plugin's
reader and the widget's ``<image> mask`` layers do), the mask is mapped back from napari's
``(S, A, R)`` order to the source file's own orientation and written with the source affine and
header, so that it overlays the source in any viewer. Without that metadata the layer's scale,
translate (rotate, shear, affine) become a RAS affine. Values are written as uint8, through a
temporary file and a rename; a file the layer was read from is never overwritten.

File > Save Selected Layers offers one file type per compatible writer and uses the one selected
in the dialog, whatever the typed name says; its default is the first writer npe2 lists, which
for labels is napari's built-in TIFF writer (it refuses ``.nii.gz``). npe2 orders writers of
equal specificity by registration and the manifest cannot change that, so
:func:`prefer_this_writer` puts this writer first once the plugin is in use, and
:func:`write_labels` hands a name with another writer's file type (``.tif``) to that writer.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ._layers import write_mask
from .core.volume import is_nifti_path

log = logging.getLogger(__name__)

PLUGIN = "napari-whatishealthy"


def write_labels(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    """npe2 single-layer writer: returns the path written.

    A name that ends with another writer's file type (``.tif``...) goes to that writer, as if
    this one were not the dialog's default; any other name is written as NIfTI (``.nii.gz`` is
    added when missing).
    """
    if not is_nifti_path(path):
        other = _writer_for_suffix(path)
        if other is not None:
            written = other.exec(args=(path, data, meta))
            return [written] if isinstance(written, str) else list(written or [])
    return [str(write_mask(path, data, meta))]


def _writer_for_suffix(path: str) -> Any:
    """Another plugin's labels writer that claims the suffix of ``path`` (None: none does)."""
    if not Path(path).suffix:
        return None
    from npe2 import PluginManager

    name = Path(path).name.lower()
    for writer in PluginManager.instance().iter_compatible_writers(["labels"]):
        if writer.plugin_name == PLUGIN:
            continue
        if any(name.endswith(e.lower()) for e in writer.filename_extensions):
            return writer
    return None


def prefer_this_writer() -> bool:
    """Make this plugin's labels writer the first file type of napari's save dialog (see the
    module docstring). Returns whether it is first now. Uses npe2's writer index, which has no
    public way to set an order; if that changes, the dialog keeps npe2's order (and picking
    "What is Healthy NIfTI mask" as the file type still works)."""
    try:
        from npe2 import PluginManager

        index = PluginManager.instance()._contrib
        writers = list(index._writers)
        ours = [entry for entry in writers if entry[3].plugin_name == PLUGIN]
        if ours and writers[: len(ours)] != ours:
            index._writers = ours + [entry for entry in writers if entry[3].plugin_name != PLUGIN]
        return bool(ours)
    except Exception as exc:  # npe2 internals moved: keep its order
        log.debug("could not put the NIfTI writer first: %s", exc)
        return False


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
