"""Device choice ("auto" picks cuda, then mps, then cpu) and running out of memory on one."""

from __future__ import annotations

import gc

import torch

from .errors import WhatIsHealthyError


def available_devices() -> list[str]:
    devices = ["auto", "cpu"]
    if torch.cuda.is_available():
        devices.append("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        devices.append("mps")
    return devices


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    name = str(name)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if "mps" in available_devices():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise WhatIsHealthyError("device 'cuda' was asked for but no CUDA GPU is available; use --device cpu or auto")
    if name == "mps" and "mps" not in available_devices():
        raise WhatIsHealthyError("device 'mps' was asked for but is not available; use --device cpu or auto")
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise WhatIsHealthyError(f"unknown device {name!r}: use auto, cpu, cuda or mps") from exc


_OOM_TYPES: tuple[type[BaseException], ...] = tuple(
    t for t in (getattr(torch, "OutOfMemoryError", None),
                getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None),
                MemoryError)
    if isinstance(t, type)
)
_OOM_PHRASES = ("out of memory", "can't allocate memory", "cannot allocate memory",
                "failed to allocate")


def is_out_of_memory(exc: BaseException) -> bool:
    """An allocation failure of torch (CUDA, MPS, CPU) or numpy, by type or by message."""
    if isinstance(exc, _OOM_TYPES):
        return True
    if isinstance(exc, RuntimeError):
        text = str(exc).lower()
        return any(phrase in text for phrase in _OOM_PHRASES)
    return False


def free_memory(device: torch.device) -> None:
    """Drop Python garbage and the device's allocator cache (best effort)."""
    gc.collect()
    try:
        if device.type == "cuda" and torch.cuda.is_available():
            torch.cuda.empty_cache()
        elif device.type == "mps" and hasattr(torch, "mps"):
            torch.mps.empty_cache()
    except Exception:  # freeing the cache is best effort
        pass
