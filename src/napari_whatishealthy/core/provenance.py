"""Provenance: what produced an output (model and its hash, settings, versions, device, time).

Written next to every ``localize`` output as ``<case>_provenance.json`` so that a mask can be
traced back to the exact checkpoint and settings that made it.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import platform
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

FORMAT = "napari-whatishealthy/provenance/1"

__all__ = ["FORMAT", "make_provenance", "versions", "jsonable"]


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        return None


def versions() -> dict[str, str | None]:
    """Versions of this package and of the libraries that shape its results."""
    import numpy
    import torch

    return {
        "napari-whatishealthy": _version("napari-whatishealthy"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "monai": _version("monai"),
        "numpy": numpy.__version__,
        "scipy": _version("scipy"),
        "nibabel": _version("nibabel"),
        "openvino": _version("openvino"),  # None where not installed (torch ran the network)
        "platform": f"{sys.platform}-{platform.machine()}",
    }


def jsonable(value: Any) -> Any:
    """Dataclasses, paths, numpy scalars and arrays, tuples -> plain JSON values."""
    import numpy as np

    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, float) and value != value:  # NaN is not JSON
        return None
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def make_provenance(
    *,
    settings: Any,
    device: str,
    model_path: str | Path | None = None,
    model_hash: str | None = None,
    model_name: str | None = None,
    inputs: Iterable[str | Path] = (),
    threshold_used: float | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A JSON-able record of one run."""
    record: dict[str, Any] = {
        "format": FORMAT,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "model": {
            "name": model_name,
            "path": str(Path(model_path).resolve()) if model_path is not None else None,
            "sha256": model_hash,
        },
        "settings": jsonable(settings),
        "threshold_used": threshold_used,
        "device": str(device),
        "inputs": [str(Path(p).resolve()) for p in inputs],
        "versions": versions(),
    }
    if extra:
        record.update(jsonable(dict(extra)))
    return record
