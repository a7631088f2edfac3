"""Bundled models and the model cache shared by the command line and the napari widget.

Bundled checkpoints live inside the package at ``napari_whatishealthy/models/<name>/`` (a folder
holding ``spec.json`` and ``model.safetensors``); ``"default"`` is the one used when no model is
given. Anything else is a path: a checkpoint folder, one of its two files, or a ``train --out``
folder (its ``checkpoint/`` subfolder is used).

Loaded models are cached by (resolved path, modification times and sizes of the two files,
device), so that a retrained checkpoint written to the same folder is reloaded, and a second run
in the widget starts at once.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint_cache import CheckpointCache
from .device import resolve_device
from .model import (
    SPEC_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    ConditionalUNet,
    ModelSpec,
    load_checkpoint,
)

MODELS_DIR = Path(__file__).resolve().parent.parent / "models"
DEFAULT_MODEL = "default"
_CACHE_SIZE = 2  # models kept in memory (a widget comparing two checkpoints needs two)

__all__ = [
    "DEFAULT_MODEL",
    "MODELS_DIR",
    "bundled_models",
    "clear_model_cache",
    "is_checkpoint",
    "load_model_cached",
    "resolve_model",
]


def is_checkpoint(path: str | Path) -> bool:
    """A folder holding both ``spec.json`` and ``model.safetensors``."""
    path = Path(path)
    return path.is_dir() and (path / SPEC_FILE).is_file() and (path / WEIGHTS_FILE).is_file()


def bundled_models() -> dict[str, Path]:
    """Name -> checkpoint folder for every model shipped in the package (only those present)."""
    if not MODELS_DIR.is_dir():
        return {}
    return {p.name: p for p in sorted(MODELS_DIR.iterdir()) if is_checkpoint(p)}


def resolve_model(name_or_path: str | Path | None = None) -> Path:
    """The checkpoint folder meant by a bundled model's name or a path (None: ``"default"``)."""
    if name_or_path is None or str(name_or_path) == "":
        name_or_path = DEFAULT_MODEL
    text = str(name_or_path)
    bundled = bundled_models()
    if text in bundled and not Path(text).exists():
        return bundled[text].resolve()
    path = Path(text).expanduser()
    if not path.exists():
        if text == DEFAULT_MODEL:
            raise CheckpointError(
                f"the default model is not bundled in this installation (expected a checkpoint "
                f"folder at {MODELS_DIR / DEFAULT_MODEL}); train one with `whatishealthy train "
                "DATA --out DIR` and pass --model DIR/checkpoint"
            )
        names = ", ".join(sorted(bundled)) or "none"
        raise CheckpointError(
            f"{text}: no such model; give a checkpoint folder (spec.json + model.safetensors) "
            f"or a bundled model name (bundled: {names})"
        )
    if path.is_file() and path.name in (SPEC_FILE, WEIGHTS_FILE):
        path = path.parent
    if path.is_dir() and not is_checkpoint(path) and is_checkpoint(path / "checkpoint"):
        path = path / "checkpoint"  # a `train --out` folder
    if not is_checkpoint(path):
        if path.is_file():
            raise CheckpointError(
                f"{path}: a model is a checkpoint folder holding {SPEC_FILE} and {WEIGHTS_FILE}, "
                "not a single file; pass the folder"
            )
        missing = [n for n in (SPEC_FILE, WEIGHTS_FILE) if not (path / n).is_file()]
        raise CheckpointError(
            f"{path}: not a model checkpoint (missing {', '.join(missing)}); a checkpoint is "
            f"the folder `whatishealthy train` writes as DIR/checkpoint"
        )
    return path.resolve()


_cache = CheckpointCache(_CACHE_SIZE, "checkpoint")


def load_model_cached(
    path: str | Path | None = None, device: str | torch.device = "auto"
) -> tuple[ConditionalUNet, ModelSpec, str]:
    """``(model, spec, sha256)`` for a model name or path on ``device``, loaded once.

    The model is in eval mode and must not be modified by the caller (it is shared). The hash is
    :func:`~napari_whatishealthy.core.model.checkpoint_hash`, for provenance.
    """
    folder = resolve_model(path)
    return _cache.get(folder, resolve_device(device),
                      lambda f, dev: load_checkpoint(f, device=dev))


def clear_model_cache() -> None:
    _cache.clear()
