"""Healthy counterfactuals: DDIM inversion with the null label, guided DDIM decoding to "healthy".

The method of "What is Healthy?" (Sanchez et al. 2022) as abduction, action, prediction:

1. abduction: deterministic DDIM inversion (eta = 0) of the clean slice ``x_0`` up to noise level
   ``L`` with the null (unconditional) label;
2. action: the label becomes ``target_label`` (healthy);
3. prediction: DDIM decoding from exactly where inversion ended back to the clean image with
   classifier-free guidance ``eps = eps_null + w * (eps_target - eps_null)``.

Schedule indexing (the reference code and the MONAI tutorial get this wrong)
--------------------------------------------------------------------------
A *plan* ``[t_1, ..., t_K]`` holds trained timesteps only (see :func:`timestep_plan`). The clean
image has ``alpha_bar = 1`` (call it ``t = -1``); it is *not* timestep 0, which already carries a
little noise (``alpha_bar_0 = 1 - beta_0``). Inversion walks the levels

    clean -> t_1 -> t_2 -> ... -> t_K

and decoding walks them back, starting at ``t_K`` (where inversion ended, not one level below):

    t_K -> t_{K-1} -> ... -> t_1 -> clean.

Each step from level ``a`` to level ``b`` is the DDIM update with eps predicted at the point the
step starts from, at its own timestep. The clean image has no network timestep; when inversion
needs eps there it asks the network at the lowest trained timestep (``t = 0``), the closest level
the network knows.

Plain DDIM inversion is a first-order scheme: predicting eps at the current point on the way up
and at the next point on the way down makes the round trip shrink the image a little (by a known
factor for Gaussian data, see the tests). ``inversion_refinements > 0`` adds that many fixed-point
iterations per inversion step, re-predicting eps at the new point, which converges to the exact
inverse of the decoding step (one extra network call per iteration and step).

Dynamic normalisation (Imagen-style thresholding, the paper's rule) is applied to the predicted
``x_0`` at every *decoding* step, and eps is then re-derived from the normalised ``x_0`` (as the
reference code, built on guided-diffusion, does). By default it is not applied during inversion,
so that inversion stays the inverse of unnormalised decoding; the reference code applies it
during inversion too, which ``inversion_normalisation=True`` does (except at the first step,
from the clean image, where there is no predicted ``x_0`` to normalise). The two were measured
against each other: see docs/benchmarks.md.

All DDIM coefficient arithmetic is done on float32 tensors with float64 scalar coefficients,
whatever autocast does to the network; only the network call runs under autocast.

Classifier guidance (``method="classifier"``, Diff-SCM's earlier method)
-------------------------------------------------------------------------
Instead of the second (target-label) pass, decoding asks a noisy-image classifier
(:mod:`.classifier`) for ``g = grad_x log p(target | x_t, t)`` at the point each step starts
from and uses ``eps = eps_null - sqrt(1 - alpha_bar_t) * s * g`` (one backward pass of the
classifier per decoding step). Inversion is the same null-label DDIM inversion. With ``s = 0``
the classifier is not called and decoding is the unguided (``w = 0``) decoding, exactly.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Generator
from typing import Any

import numpy as np
import torch

from .classifier import check_compatible, resolve_scale, target_class
from .ddim import Predictor, _decode_iter, _invert_iter, decode, dynamic_normalise, invert
from .device import free_memory, is_out_of_memory, resolve_device
from .errors import WhatIsHealthyError
from .inference_network import describe_network, network_for
from .model import NULL, ModelSpec, ScheduleSpec
from .openvino_network import choose_backend
from .settings import METHODS, AmpSetting, LocalizeSettings, check_noise_and_steps
from .steps import Progress, drain, relay

_log = logging.getLogger(__name__)


__all__ = [
    "CounterfactualSettings",
    "METHODS",
    "Progress",
    "autocast_dtype",
    "chunk_bounds",
    "counterfactual",
    "decode",
    "default_batch_size",
    "describe_inference",
    "drain",
    "dynamic_normalise",
    "invert",
    "AmpSetting",
    "is_out_of_memory",
    "iter_counterfactual",
    "network_description",
    "timestep_plan",
    "use_channels_last",
]


# The counterfactual reads the one settings type (core.settings); this name is kept for callers
# of the counterfactual alone.
CounterfactualSettings = LocalizeSettings


def timestep_plan(schedule: ScheduleSpec, noise_level: float, steps: int) -> list[int]:
    """The DDIM timesteps ``[t_1, ..., t_K]`` (ascending) from the clean image up to level L.

    Only trained timesteps are used (``schedule.trained_timesteps()``). The last one is the
    trained timestep nearest ``noise_level * num_train_timesteps`` (the lower one on a tie); the
    ``steps`` timesteps are evenly spaced over the trained ones, counting up from the clean image:
    with stride 10, L = 0.5 and 10 steps the plan is ``[50, 100, ..., 500]``. If fewer trained
    timesteps than ``steps`` lie at or below that level, all of them are used (``[0, 10, ...]``).
    """
    check_noise_and_steps(noise_level, steps)
    trained = schedule.trained_timesteps().cpu().numpy().astype(np.int64)
    if trained.size == 0:
        raise WhatIsHealthyError("the schedule has no trained timesteps")
    target = float(noise_level) * schedule.num_train_timesteps
    last = int(np.argmin(np.abs(trained - target)))  # first minimum: the lower one on a tie
    if steps >= last + 1:
        return [int(t) for t in trained[: last + 1]]
    # Positions i * last / steps for i = 1..steps: spacing >= 1, so rounding keeps them distinct;
    # round half up (not numpy's half-to-even) so that the plan does not wobble.
    positions = np.floor(np.arange(1, steps + 1) * (last / steps) + 0.5).astype(np.int64)
    return [int(t) for t in trained[positions]]


#: Slices per chunk when ``batch_size`` is None. On a CPU the network is fastest per slice with
#: 16-48 slices per call (measured on the default model with bf16 and channels-last on a 2-core
#: AMX Xeon: 6.4-6.7 ms/slice at 16-48, 7.9 at 64, 9.3 at 96: bigger batches fall out of cache);
#: decoding calls the network with twice the chunk. Accelerators want all slices of a volume in
#: one or two calls.
CPU_BATCH_SIZE = 24
ACCELERATOR_BATCH_SIZE = 256


def default_batch_size(device: torch.device | str) -> int:
    """Slices per chunk on ``device`` when the settings leave it to us."""
    return CPU_BATCH_SIZE if torch.device(device).type == "cpu" else ACCELERATOR_BATCH_SIZE


def chunk_bounds(n: int, batch: int) -> list[tuple[int, int]]:
    """``n`` slices in the fewest chunks of at most ``batch``, as even as possible: 145 slices at
    24 are 7 chunks of 20-21, not 6 of 24 and one of 1 (a tiny last chunk wastes a whole
    network call per step on one slice)."""
    if n <= 0:
        return []
    count = math.ceil(n / batch)
    edges = [round(i * n / count) for i in range(count + 1)]
    return list(zip(edges[:-1], edges[1:], strict=True))


def use_channels_last(model: Any) -> None:
    """Put a 2D network's weights in channels-last layout (NHWC). oneDNN on CPUs and cuDNN's
    tensor-core kernels are faster that way (default model, bf16, CPU: 6.7 against 11.9 ms per
    slice at 32 slices per call); results are the same up to float rounding order."""
    if isinstance(model, torch.nn.Module):
        model.to(memory_format=torch.channels_last)


def autocast_dtype(amp: AmpSetting, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype that ``amp`` means on ``device`` (None: no autocast)."""
    kind = torch.device(device).type
    if amp is False:
        return None
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        return torch.float16
    if amp == "auto" and kind == "mps":
        return None  # autocast on MPS is young; off unless forced
    if amp not in ("auto", True):
        raise WhatIsHealthyError(f"amp must be auto, bf16, fp16, True or False, got {amp!r}")
    if kind == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if kind == "mps":
        return torch.float16
    if amp is True:
        return torch.bfloat16
    # "auto" on a CPU: bf16 only where the CPU computes it natively (AMX or AVX512_BF16). Without
    # it oneDNN emulates bf16 and the network got slower, not faster (default model, 32 slices
    # per call, one thread, oneDNN limited to each instruction set on an AMD EPYC: bf16 against
    # float32 took 7x as long with AVX2 only, 2.5x with AVX-512 without BF16, and 0.4-0.7x with
    # AVX512_BF16; docs/benchmarks.md).
    from .hardware import cpu_info

    return torch.bfloat16 if cpu_info().native_bf16 else None


def describe_inference(device: torch.device | str, settings: Any = None) -> str:
    """What the network runs as on ``device`` with ``settings`` (amp, backend, batch_size): one line for
    logs and benchmarks, e.g. ``torch, bf16 autocast, 24 slices per chunk, channels-last``."""
    amp = getattr(settings, "amp", "auto")
    batch = getattr(settings, "batch_size", None) or default_batch_size(device)
    dtype = autocast_dtype(amp, device)
    backend = choose_backend(getattr(settings, "backend", "auto"), device, dtype)
    if backend == "openvino":
        text = f"openvino, {'bf16' if dtype is not None else 'float32'}, {batch} slices per chunk"
    else:
        text = f"{describe_network(None, dtype)}, {batch} slices per chunk, channels-last"
    if torch.device(device).type == "cpu":
        from .hardware import cpu_info

        text += f", {torch.get_num_threads()} threads ({cpu_info().describe()})"
    return text


def network_description(model: Any, settings: Any, device: torch.device | str) -> str:
    """What runs ``model``'s network with ``settings`` (amp, backend) on ``device``, e.g.
    ``openvino 2026.4.1, bf16, 2 threads in 2 streams``: the network is made here if it is not
    yet (the first OpenVINO run of a model on a machine converts it, seconds) and kept."""
    amp_dtype = autocast_dtype(settings.amp, device)
    return describe_network(network_for(model, amp_dtype, device, settings.backend), amp_dtype)


# --------------------------------------------------------------------------------------------
# The public driver.


def model_device(model: Any) -> torch.device | None:
    """The device of a module's parameters (None: not a module, or no parameters)."""
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            return p.device
    return None


def iter_counterfactual(
    model: Predictor,
    slices: np.ndarray | torch.Tensor,
    settings: CounterfactualSettings | None = None,
    *,
    schedule: ScheduleSpec | None = None,
    null_label: int | None = None,
) -> Generator[Progress, None, np.ndarray]:
    """Healthy counterfactuals of ``slices`` (float32 ``[N, C, S, S]`` in [-1, 1]), step by step.

    ``model(x, t, labels) -> eps`` is a :class:`ConditionalUNet` (its ``.spec`` gives schedule,
    labels and defaults) or any predictor with ``schedule=`` given. Slices are processed in chunks
    of at most ``settings.batch_size`` (decoding feeds the network ``2 * chunk``). The generator
    yields a :class:`Progress` after every network call and *returns* the healthy slices
    (float32 numpy, same shape) as its ``StopIteration`` value. Closing it (``gen.close()``) stops
    at the current step: nothing is returned and nothing raises. Bad input is refused here, at
    call time, not at the first ``next()``.

    Out of memory (``torch.OutOfMemoryError``, or a ``RuntimeError`` saying so, on any device):
    the chunk's tensors and the allocator cache are freed and the chunk is redone with half the
    batch, which then stays halved; a chunk that fails with one slice raises
    :class:`WhatIsHealthyError` saying what to do. Results do not depend on the batch size
    (beyond float rounding: the network's kernels are chosen per batch size).

    ``settings.method == "classifier"`` decodes with classifier guidance by
    ``settings.classifier``; a :class:`~.classifier.NoisyClassifier` is checked here against the
    model's spec and the timestep plan (image size, channels, schedule, trained timesteps).
    """
    spec: ModelSpec | None = getattr(model, "spec", None)
    if settings is None:
        settings = LocalizeSettings.from_spec(spec) if spec is not None else LocalizeSettings()
    settings.validate()
    if schedule is None:
        if spec is None:
            raise WhatIsHealthyError("a predictor without a .spec needs schedule=ScheduleSpec(...)")
        schedule = spec.schedule
    if null_label is None:
        null_label = spec.labels.get("null", NULL) if spec is not None else NULL

    if isinstance(slices, torch.Tensor):
        data = slices.detach().to("cpu", torch.float32).numpy()
    else:
        data = np.asarray(slices, dtype=np.float32)
    if data.ndim != 4:
        raise WhatIsHealthyError(f"slices must be [N, C, S, S], got shape {data.shape}")
    if spec is not None:
        if data.shape[1] != spec.in_channels:
            raise WhatIsHealthyError(
                f"the model expects {spec.in_channels} channels {tuple(spec.modalities)}, "
                f"the slices have {data.shape[1]}"
            )
        if data.shape[2:] != (spec.image_size, spec.image_size):
            raise WhatIsHealthyError(
                f"the model works at {spec.image_size}x{spec.image_size}, the slices are "
                f"{data.shape[2]}x{data.shape[3]}: resample them first"
            )
    if data.size and not np.isfinite(data).all():
        raise WhatIsHealthyError("the slices contain NaN or infinite values")

    model_dev = model_device(model)
    if settings.device == "auto" and model_dev is not None:
        device = model_dev
    else:
        device = resolve_device(settings.device)
        if model_dev is not None and model_dev != device and not (
            model_dev.type == device.type and device.index is None
        ):
            raise WhatIsHealthyError(
                f"the model is on {model_dev} but settings.device is {settings.device!r}; load it "
                "with load_checkpoint(..., device=...) or move it with model.to(...)"
            )
    amp_dtype = autocast_dtype(settings.amp, device)
    plan = timestep_plan(schedule, settings.noise_level, settings.steps)
    alphas = schedule.alphas_cumprod()
    guide = _classifier_guide(settings, spec, plan, device)
    use_channels_last(model)
    # The same outputs with less work per call (see .inference_network), kept between runs;
    # compiled by OpenVINO where settings.backend chooses it (see .openvino_network).
    network = network_for(model, amp_dtype, device, settings.backend)
    return _iterate(network, data, settings, plan, alphas, int(null_label), device, amp_dtype,
                    guide)


def _classifier_guide(
    settings: CounterfactualSettings,
    spec: ModelSpec | None,
    plan: list[int],
    device: torch.device,
) -> tuple[Any, float, int] | None:
    """``(classifier, scale, class index)`` for classifier guidance, checked; None otherwise."""
    if settings.method != "classifier":
        return None
    from .classifier import ClassifierSpec

    classifier = settings.classifier
    if classifier is None:
        raise WhatIsHealthyError(
            "method 'classifier' needs a noisy-image classifier (--classifier PATH; train one "
            "with `whatishealthy train-classifier`)"
        )
    cspec = getattr(classifier, "spec", None)
    if isinstance(cspec, ClassifierSpec):
        check_compatible(cspec, spec, plan)
        index = target_class(cspec, spec, settings.target_label)
    else:
        index = int(settings.target_label)
    classifier_dev = model_device(classifier)
    if classifier_dev is not None and classifier_dev != device and not (
        classifier_dev.type == device.type and device.index is None
    ):
        raise WhatIsHealthyError(
            f"the classifier is on {classifier_dev} but the diffusion model runs on {device}; "
            "load both on the same device"
        )
    return classifier, resolve_scale(settings.classifier_scale, classifier), index


def _out_of_memory_at_one(device: torch.device, first_batch: int) -> WhatIsHealthyError:
    return WhatIsHealthyError(
        f"out of memory on {device} even with one slice per batch (started at {first_batch}); "
        "free memory used by other programs, or run on the CPU (--device cpu), or use a model "
        "with a smaller image size"
    )


def _iterate(
    model: Predictor,
    data: np.ndarray,
    settings: CounterfactualSettings,
    plan: list[int],
    alphas: torch.Tensor,
    null_label: int,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    guide: tuple[Any, float, int] | None = None,
) -> Generator[Progress, None, np.ndarray]:
    """Chunks of at most ``batch`` slices; on out-of-memory the chunk is freed and redone with
    half the batch (which then stays halved), down to one slice, then a clear error.

    Progress stays monotonic: calls spent on a chunk that ran out of memory are counted, and
    ``total`` grows by the calls needed to redo it.
    """
    n = data.shape[0]
    out = np.empty_like(data)
    if n == 0:
        return out
    batch = int(settings.batch_size or default_batch_size(device))
    first_batch = batch
    k = len(plan)
    per_chunk = k * (1 + settings.inversion_refinements) + k
    total = math.ceil(n / batch) * per_chunk
    done = 0

    def count(phase: Any) -> Callable[[None], Progress]:
        def step(_: None) -> Progress:
            nonlocal done
            done += 1
            return Progress(done, total, phase)
        return step

    start = 0
    while start < n:
        # Even chunks over what is left (at most ``batch`` each); after an out-of-memory halving
        # the rest is re-split with the new batch.
        stop = start + chunk_bounds(n - start, batch)[0][1]
        failure: str | None = None
        try:
            x0 = torch.from_numpy(data[start:stop]).to(device)
            xt = yield from relay(
                _invert_iter(model, x0, plan, alphas, null_label,
                             settings.inversion_refinements, amp_dtype,
                             bool(settings.inversion_normalisation)),
                count("invert"),
            )
            del x0
            healthy = yield from relay(
                _decode_iter(model, xt, plan, alphas, settings.guidance, settings.target_label,
                             null_label, settings.dynamic_normalisation, True, amp_dtype,
                             *(guide or ())),
                count("decode"),
            )
            del xt
            out[start:stop] = healthy.to("cpu", torch.float32).numpy()
            del healthy
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            if batch == 1:
                raise _out_of_memory_at_one(device, first_batch) from exc
            failure = " ".join(str(exc).split())[:200] or type(exc).__name__
        if failure is None:
            start = stop
            continue
        # Out of the except block: the traceback (and the tensors its frames hold) is gone.
        x0 = xt = healthy = None  # drop our own references too
        free_memory(device)
        old, batch = batch, max(1, batch // 2)
        total = done + math.ceil((n - start) / batch) * per_chunk
        _log.warning(
            "out of memory on %s with a batch of %d slices (%s); retrying with %d",
            device, old, failure, batch,
        )
    return out


def counterfactual(
    model: Predictor,
    slices: np.ndarray | torch.Tensor,
    settings: CounterfactualSettings | None = None,
    progress_callback: Callable[[Progress], Any] | None = None,
    *,
    schedule: ScheduleSpec | None = None,
    null_label: int | None = None,
) -> np.ndarray:
    """Run :func:`iter_counterfactual` to the end; ``progress_callback`` gets each Progress."""
    gen = iter_counterfactual(model, slices, settings, schedule=schedule, null_label=null_label)
    return drain(gen, progress_callback)
