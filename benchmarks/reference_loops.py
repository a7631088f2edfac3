"""The references the speed benchmarks compare the pipeline against, as the reference code runs.

The reference code (Diff-SCM, commit cfdaddd) samples a batch of 32 slices per call, runs the
DDIM inversion with the null label, then decodes with the unguided and the guided pass of each
step as two separate forward calls (its batched guidance function exists but is unused), in
float32, under ``torch.no_grad``. It processes every axial slice it is given (no brain-slice
selection). :func:`reference_counterfactual` does exactly that with a batch size of choice:
``batch=32`` is "the reference code's structure", ``batch=1`` is the naive one-slice loop.

Both use our timestep indexing (the reference code starts decoding one level below where the
inversion ended, a bug we do not copy), so at equal settings their outputs must agree with the
pipeline's (only float rounding and the pipeline's bf16 network differ).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

#: The reference code's own inference settings: L = 0.75 on its 100-step respacing, i.e. 75
#: inversion steps and 75 guided decoding steps (225 network calls per batch).
REFERENCE_CODE_STEPS = 75
REFERENCE_CODE_NOISE = 0.75
REFERENCE_CODE_BATCH = 32


def every_axial_slice(prepared, size: int) -> np.ndarray:
    """All axial slices of a prepared volume in model space ``[Z, C, S, S]``, brain or not (the
    reference code does not pick brain slices)."""
    from napari_whatishealthy.core.preprocess import _crop, _resize

    x0, y0, side, _ = prepared.box
    return _resize(_crop(prepared.normalised, x0, y0, side, -1.0).transpose(3, 0, 1, 2), size)


def network_calls(n_slices: int, steps: int, batch: int) -> int:
    """Forward calls the reference makes for ``n_slices``: per batch, ``steps`` inversion calls and
    ``2 * steps`` decoding calls."""
    return math.ceil(n_slices / batch) * 3 * steps


def reference_counterfactual(
    model: torch.nn.Module,
    slices: np.ndarray,
    plan: Sequence[int],
    alphas: np.ndarray,
    guidance: float,
    dynamic_normalisation: bool,
    batch: int = REFERENCE_CODE_BATCH,
    device: str | torch.device = "cpu",
    synchronize: bool = False,
) -> np.ndarray:
    """Healthy slices the way the reference code makes them: ``batch`` slices per call, the null
    and the guided pass of each decoding step as separate calls, float32, ``no_grad``."""
    from napari_whatishealthy.core.counterfactual import dynamic_normalise
    from napari_whatishealthy.core.model import HEALTHY, NULL

    device = torch.device(device)
    levels = [1.0] + [float(alphas[t]) for t in plan]
    net_t = [0] + [int(t) for t in plan]
    out = []
    for start in range(0, slices.shape[0], batch):
        x = torch.from_numpy(np.ascontiguousarray(slices[start:start + batch])).to(device)
        n = x.shape[0]
        null = torch.full((n,), NULL, device=device)
        healthy = torch.full((n,), HEALTHY, device=device)
        with torch.no_grad():
            for i in range(len(plan)):  # DDIM inversion with the null label
                a, b = levels[i], levels[i + 1]
                eps = model(x, torch.full((n,), net_t[i], device=device), null)
                x0 = (x - (1 - a) ** 0.5 * eps) / a**0.5
                x = b**0.5 * x0 + (1 - b) ** 0.5 * eps
            for i in range(len(plan), 0, -1):  # guided decoding, two forward calls per step
                a, b = levels[i], levels[i - 1]
                t = torch.full((n,), plan[i - 1], device=device)
                eps_null = model(x, t, null)
                eps_healthy = model(x, t, healthy)
                eps = eps_null + guidance * (eps_healthy - eps_null)
                x0 = (x - (1 - a) ** 0.5 * eps) / a**0.5
                if dynamic_normalisation:
                    x0 = dynamic_normalise(x0)
                    eps = (x - a**0.5 * x0) / (1 - a) ** 0.5
                x = b**0.5 * x0 + (1 - b) ** 0.5 * eps
        out.append(x.cpu().numpy())
    if synchronize and device.type == "cuda":
        torch.cuda.synchronize()
    return np.concatenate(out) if out else np.zeros_like(slices)
