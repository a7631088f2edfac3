"""Device choice: "auto" picks cuda, then mps, then cpu."""

from __future__ import annotations

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
