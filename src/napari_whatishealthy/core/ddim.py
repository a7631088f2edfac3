"""The two halves of the counterfactual on one batch: DDIM inversion with the null label and
guided DDIM decoding (classifier-free or classifier guidance), with the dynamic normalisation of
the paper. How the schedule is indexed and why is in :mod:`.counterfactual`'s docstring; the
driver there chunks the slices, picks devices and reports progress.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator, Sequence
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch

from .classifier import classifier_gradient
from .errors import WhatIsHealthyError
from .model import HEALTHY, NULL
from .steps import drain

Predictor = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def dynamic_normalise(x0: torch.Tensor, percentile: float = 99.0) -> torch.Tensor:
    """The paper's rule on a batch ``[B, C, ...]``: q = percentile of |x0| per sample and channel,
    q = max(q, 1), clip to [-q, q], divide by q. Inputs already in [-1, 1] are unchanged."""
    flat = x0.float().abs().flatten(2)
    # Linear-interpolated percentile (numpy's default) from the two order statistics around it:
    # torch.quantile refuses inputs of more than 2**24 elements, which big batches reach, and
    # only the top ``n - lo`` values are needed, not a full sort (42 of 4096 at 64 px and the
    # 99th percentile; same values, a fraction of the time).
    n = flat.shape[2]
    pos = (percentile / 100.0) * (n - 1)
    lo, frac = int(math.floor(pos)), pos - math.floor(pos)
    hi = min(lo + 1, n - 1)
    top = flat.topk(n - lo, dim=2, largest=True, sorted=True).values  # descending
    at_lo, at_hi = top[..., n - 1 - lo], top[..., n - 1 - hi]
    q = (at_lo + frac * (at_hi - at_lo)).clamp_min(1.0)
    q = q.reshape(*q.shape, *([1] * (x0.dim() - 2)))
    return torch.maximum(torch.minimum(x0.float(), q), -q) / q


# --------------------------------------------------------------------------------------------
# The two halves. Internal generators yield once after each network call so that the caller can
# report progress and stop; grad mode and autocast are entered only around each call and never
# held across a yield (they are thread-global state and would leak into the consumer's code).


def _alphas(alphas_cumprod: torch.Tensor | Sequence[float]) -> np.ndarray:
    return np.asarray(torch.as_tensor(alphas_cumprod).detach().cpu().double().numpy())


def _coefficients(a: float, b: float) -> tuple[float, float]:
    """x_b = c1 * x_a + c2 * eps, from x0 = (x_a - sqrt(1-a) eps) / sqrt(a), in float64."""
    c1 = math.sqrt(b / a)
    c2 = math.sqrt(1.0 - b) - math.sqrt(b * (1.0 - a) / a)
    return c1, c2


def _network(
    predictor: Predictor,
    x: torch.Tensor,
    t: int,
    labels: torch.Tensor,
    amp_dtype: torch.dtype | None,
) -> torch.Tensor:
    ts = torch.full((x.shape[0],), int(t), dtype=torch.long, device=x.device)
    if x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)  # matches use_channels_last
    ctx = (
        torch.autocast(device_type=x.device.type, dtype=amp_dtype)
        if amp_dtype is not None
        else nullcontext()
    )
    with ctx:
        eps = predictor(x, ts, labels)
    return eps.float()  # the DDIM arithmetic stays in float32 whatever autocast returned


def _check_plan(plan: Sequence[int], alphas: np.ndarray) -> list[int]:
    plan = [int(t) for t in plan]
    if not plan:
        raise WhatIsHealthyError("the timestep plan is empty")
    if any(b <= a for a, b in zip(plan, plan[1:], strict=False)) or plan[0] < 0:
        raise WhatIsHealthyError(f"the timestep plan must be strictly ascending and >= 0: {plan}")
    if plan[-1] >= len(alphas):
        raise WhatIsHealthyError(
            f"timestep {plan[-1]} is beyond the schedule ({len(alphas)} steps)"
        )
    return plan


def _step(x: torch.Tensor, eps: torch.Tensor, a: float, b: float,
          normalise: bool) -> torch.Tensor:
    """One DDIM move from level alpha_bar = a to b (up in inversion, down in decoding)."""
    if normalise and a < 1.0:  # a = 1 is the clean image: no x0 to predict
        # The reference's rule: normalise the predicted x0, then re-derive eps from it.
        sa, s1a = math.sqrt(a), math.sqrt(1.0 - a)
        x0 = dynamic_normalise((x - s1a * eps) / sa)
        eps = (x - sa * x0) / s1a
        return math.sqrt(b) * x0 + math.sqrt(1.0 - b) * eps
    c1, c2 = _coefficients(a, b)
    return c1 * x + c2 * eps


def _invert_iter(
    predictor: Predictor,
    x0: torch.Tensor,
    plan: Sequence[int],
    alphas_cumprod: torch.Tensor | Sequence[float],
    null_label: int,
    refinements: int,
    amp_dtype: torch.dtype | None,
    normalise: bool = False,
) -> Generator[None, None, torch.Tensor]:
    ab = _alphas(alphas_cumprod)
    plan = _check_plan(plan, ab)
    x = x0.float()

    labels = torch.full((x.shape[0],), int(null_label), dtype=torch.long, device=x.device)
    # The clean image is level alpha_bar = 1; the network sees it at its lowest timestep, 0.
    levels = [1.0] + [float(ab[t]) for t in plan]
    net_t = [0] + plan
    for i in range(len(plan)):
        a, b = levels[i], levels[i + 1]
        with torch.inference_mode():
            eps = _network(predictor, x, net_t[i], labels, amp_dtype)
            x_next = _step(x, eps, a, b, normalise)
        yield
        for _ in range(refinements):
            # Fixed point of x_next = c1 x + c2 eps(x_next, t_next): the exact inverse of the
            # decoding step, which predicts eps at x_next.
            with torch.inference_mode():
                eps = _network(predictor, x_next, net_t[i + 1], labels, amp_dtype)
                x_next = _step(x, eps, a, b, normalise)
            yield
        x = x_next
    return x


def _decode_iter(
    predictor: Predictor,
    xt: torch.Tensor,
    plan: Sequence[int],
    alphas_cumprod: torch.Tensor | Sequence[float],
    guidance: float,
    target_label: int,
    null_label: int,
    dynamic_normalisation: bool,
    batched_guidance: bool,
    amp_dtype: torch.dtype | None,
    classifier: Any = None,
    classifier_scale: float = 0.0,
    classifier_class: int = HEALTHY,
) -> Generator[None, None, torch.Tensor]:
    ab = _alphas(alphas_cumprod)
    plan = _check_plan(plan, ab)
    x = xt.float()
    n = x.shape[0]
    dev = x.device
    w = float(guidance)
    s = float(classifier_scale)
    null = torch.full((n,), int(null_label), dtype=torch.long, device=dev)
    target = torch.full((n,), int(target_label), dtype=torch.long, device=dev)
    both = torch.cat([null, target])
    levels = [1.0] + [float(ab[t]) for t in plan]  # levels[0]: the clean image
    for i in range(len(plan), 0, -1):
        a, b = levels[i], levels[i - 1]
        t = plan[i - 1]
        if classifier is not None and s != 0.0:
            # grad_x log p(target | x_t, t) at the point the step starts from: one forward and
            # one backward pass of the classifier, grad mode entered inside only.
            grad = classifier_gradient(classifier, x, t, classifier_class, amp_dtype)
        with torch.inference_mode():
            if classifier is not None:  # classifier guidance: the null pass, shifted by the grad
                eps = _network(predictor, x, t, null, amp_dtype)
                if s != 0.0:
                    eps = eps - math.sqrt(1.0 - a) * s * grad
            elif w == 0.0:
                eps = _network(predictor, x, t, null, amp_dtype)  # guidance off: null pass only
            else:
                if batched_guidance:  # one doubled batch: [null half; target half]
                    out = _network(predictor, torch.cat([x, x]), t, both, amp_dtype)
                    eps_null, eps_target = out[:n], out[n:]
                else:
                    eps_null = _network(predictor, x, t, null, amp_dtype)
                    eps_target = _network(predictor, x, t, target, amp_dtype)
                eps = eps_null + w * (eps_target - eps_null)
            x = _step(x, eps, a, b, dynamic_normalisation)
        yield
    return x


def invert(
    predictor: Predictor,
    x0: torch.Tensor,
    plan: Sequence[int],
    alphas_cumprod: torch.Tensor | Sequence[float],
    *,
    null_label: int = NULL,
    refinements: int = 0,
    amp_dtype: torch.dtype | None = None,
    normalise: bool = False,
) -> torch.Tensor:
    """DDIM inversion (eta = 0) of clean ``x0`` through the levels of ``plan``; returns x_{t_K}.
    ``normalise``: dynamic normalisation of the predicted x0 at each step (the reference's)."""
    return drain(
        _invert_iter(predictor, x0, plan, alphas_cumprod, null_label, refinements, amp_dtype,
                     normalise)
    )


def decode(
    predictor: Predictor,
    xt: torch.Tensor,
    plan: Sequence[int],
    alphas_cumprod: torch.Tensor | Sequence[float],
    *,
    guidance: float,
    target_label: int = HEALTHY,
    null_label: int = NULL,
    dynamic_normalisation: bool = True,
    batched_guidance: bool = True,
    amp_dtype: torch.dtype | None = None,
    classifier: Any = None,
    classifier_scale: float = 0.0,
    classifier_class: int = HEALTHY,
) -> torch.Tensor:
    """Guided DDIM decoding of ``xt`` (at level ``plan[-1]``) down to the clean image.

    ``batched_guidance=False`` runs the null and target passes one after the other (for tests).
    With ``classifier`` (``classifier(x, t) -> logits``), classifier guidance toward output
    ``classifier_class`` at scale ``classifier_scale`` replaces classifier-free guidance
    (``guidance`` is then unused).
    """
    return drain(
        _decode_iter(
            predictor, xt, plan, alphas_cumprod, guidance, target_label, null_label,
            dynamic_normalisation, batched_guidance, amp_dtype,
            classifier, classifier_scale, classifier_class,
        )
    )
