"""Which layers feed a run: image layers matched to the model's modalities, the modalities that
choose the automatic model, and the ground truth; without Qt."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .core.volume import MODALITIES, modality_from_name

RESULT_ROLES = ("healthy", "difference", "mask", "uncertainty")


@dataclass(frozen=True)
class LayerInfo:
    name: str
    metadata: dict[str, Any]
    shape: tuple[int, ...]


def is_result_layer(metadata: dict[str, Any] | None) -> bool:
    return bool(metadata) and metadata.get("role") in RESULT_ROLES


def _layer_modality(info: LayerInfo) -> str | None:
    modality = info.metadata.get("modality")
    if modality:
        return str(modality)
    lowered = info.name.strip().lower()
    if lowered in MODALITIES:
        return lowered
    return modality_from_name(lowered.replace(" ", "_") + ".nii")


def match_modalities(
    modalities: Sequence[str], layers: Sequence[LayerInfo]
) -> dict[str, str | None]:
    """Modality -> layer name, matched by the layer's metadata or its name; each layer used once.

    Exact names win over metadata, metadata over a suffix in the name (``case_flair``); a model
    with one channel takes the only image there is.
    """
    candidates = [info for info in layers if not is_result_layer(info.metadata)]
    chosen: dict[str, str | None] = {m: None for m in modalities}
    used: set[str] = set()
    rules = (
        lambda m, info: info.name.strip().lower() == m.lower(),
        lambda m, info: info.metadata.get("modality") == m,
        lambda m, info: _layer_modality(info) == m,
    )
    for rule in rules:
        for m in modalities:
            if chosen[m] is not None:
                continue
            for info in candidates:
                if info.name not in used and rule(m, info):
                    chosen[m] = info.name
                    used.add(info.name)
                    break
    if len(modalities) == 1 and chosen[modalities[0]] is None and len(candidates) == 1:
        chosen[modalities[0]] = candidates[0].name
    return chosen


@dataclass(frozen=True)
class AutoModelInput:
    """What the open image layers say for automatic model choice.

    ``available``: the modalities to choose a model for (empty: none known yet); ``ask_about``:
    the image layer whose modality the user must give (no layer says its modality, and the
    user has not answered yet), else None.
    """

    available: tuple[str, ...]
    ask_about: str | None


def auto_model_input(layers: Sequence[LayerInfo], answer: str | None) -> AutoModelInput:
    """Modalities of the open images, by metadata or name; an answer (the widget's Modality
    choice) is used only when no image says its modality. Never guesses."""
    candidates = [info for info in layers if not is_result_layer(info.metadata)]
    known = tuple(dict.fromkeys(
        m for m in (_layer_modality(info) for info in candidates) if m in MODALITIES
    ))
    if known or not candidates:
        return AutoModelInput(known, None)
    if answer:
        return AutoModelInput((answer,), None)
    return AutoModelInput((), candidates[0].name)


def pick_ground_truth(labels: Sequence[LayerInfo], shape: tuple[int, ...] | None) -> str | None:
    """A Labels layer that looks like the case's segmentation (``seg`` of the same shape)."""
    for info in labels:
        if is_result_layer(info.metadata):
            continue
        if info.metadata.get("modality") == "seg" or info.name.lower() in ("seg", "ground truth"):
            if shape is None or tuple(info.shape) == tuple(shape):
                return info.name
    return None



def layer_type_name(layer: Any) -> str:
    # ``__class__``, not ``type()``: the manifest-docked widget gets napari's PublicOnlyProxy of
    # a layer from ``viewer.layers[name]``, whose type() is the proxy's.
    return layer.__class__.__name__


def layer_named(viewer: Any, name: str) -> Any:
    """The layer itself (not a proxy) called ``name``, or None."""
    return next((layer for layer in viewer.layers if layer.name == name), None)
