"""The one settings type of a localization, and the checks every setting goes through.

:class:`LocalizeSettings` holds every knob of one run: the diffusion part (guidance, noise
level, steps, ...), the mask (threshold, median, component size) and where and how it runs
(device, batch, autocast, seed, guidance method). Its recommended part is
:class:`~.model.InferenceDefaults`, the block a model spec stores: each default is written there
once, and :meth:`LocalizeSettings.from_spec` starts from the spec's values. The CLI flags, the
widget and ``core.counterfactual`` all read this one type (``CounterfactualSettings`` is another
name for it).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from .anomaly import contrast_signs
from .errors import WhatIsHealthyError
from .model import HEALTHY, InferenceDefaults, ModelSpec

AmpSetting = bool | Literal["auto", "bf16", "fp16"]
# Bounds (docs/cli.md): beyond them a run gives overflow, not a result, or exhausts memory.
MAX_GUIDANCE = 100.0  # the paper works at w ~ 3; w = 1e308 overflowed to NaN
MAX_CLASSIFIER_SCALE = 1e4
MAX_MEDIAN_SIZE = 15  # in-plane median window; 100000 took 10 GB
MAX_STEPS = 1000  # the diffusion length
MAX_INVERSION_REFINEMENTS = 20
MAX_EDGE_EROSION = 20  # voxels
MAX_EDGE_GUIDE_RADIUS = 16  # voxels; the calibration chose 8-12 (2-4 model pixels), wider only blurs
MAX_NOISE_LEVELS = 5  # an ensemble of noise levels; each costs a whole counterfactual
MAX_BATCH_SIZE = 4096
MAX_SEED = 2**63 - 1  # torch's seed range
METHODS = ("implicit", "classifier")
THRESHOLD_CHOICES = ("auto", "otsu")

__all__ = [
    "AmpSetting",
    "LocalizeSettings",
    "METHODS",
    "THRESHOLD_CHOICES",
    "check_noise_and_steps",
    "check_seed",
    "is_integer",
    "parse_threshold",
]


def is_integer(value: Any) -> bool:
    """An int or numpy integer, not a bool: what integer settings accept."""
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def parse_threshold(value: float | str | None) -> float | str | None:
    """A threshold setting from user text: a number >= 0, ``"auto"`` or ``"otsu"`` (None: None)."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip().lower()
        if text in THRESHOLD_CHOICES:
            return text
        try:
            number = float(text)
        except ValueError:
            raise WhatIsHealthyError(
                f"threshold {value!r} is not a number, 'auto' (the model's recommended value) "
                "or 'otsu'"
            ) from None
    elif isinstance(value, bool):
        raise WhatIsHealthyError(f"threshold must be a number, 'auto' or 'otsu', got {value!r}")
    else:
        number = float(value)
    if not math.isfinite(number) or number < 0:
        raise WhatIsHealthyError(f"threshold must be a finite number >= 0, got {value!r}")
    return number


def _check_int(name: str, value: Any, low: int, high: int | None, note: str = "") -> None:
    """Refuse ``value`` unless it is an integer in ``[low, high]`` (``high`` None: ``>= low``)."""
    if is_integer(value) and low <= value and (high is None or value <= high):
        return
    bounds = f"in [{low}, {high}]" if high is not None else f">= {low}"
    raise WhatIsHealthyError(f"{name} must be an integer {bounds}{note}, got {value!r}")


def _number_in(value: Any, low: float, high: float) -> bool:
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        return False
    return not isinstance(value, bool) and math.isfinite(number) and low <= number <= high


def check_seed(seed: Any) -> None:
    """None or an integer in [0, 2**63 - 1] (what torch accepts)."""
    if seed is not None and (not is_integer(seed) or not 0 <= seed <= MAX_SEED):
        raise WhatIsHealthyError(f"seed must be an integer in [0, 2**63 - 1], got {seed!r}")


def check_noise_and_steps(noise_level: Any, steps: Any) -> None:
    try:
        level = float(noise_level)
    except (TypeError, ValueError):
        level = float("nan")
    if not (0.0 < level <= 1.0):
        raise WhatIsHealthyError(
            "noise level must be in (0, 1] (a fraction of the diffusion length), "
            f"got {noise_level!r}"
        )
    if not is_integer(steps) or not 1 <= steps <= MAX_STEPS:
        raise WhatIsHealthyError(f"steps must be an integer in [1, {MAX_STEPS}], got {steps!r}")


def _check_method(method: Any, classifier_scale: Any) -> None:
    """The guidance method and the classifier scale (the classifier itself is checked when the
    counterfactual starts)."""
    if method not in METHODS:
        raise WhatIsHealthyError(
            f"method must be one of {', '.join(METHODS)} (implicit: classifier-free guidance; "
            f"classifier: classifier guidance), got {method!r}"
        )
    if classifier_scale is not None:
        try:
            ok = not isinstance(classifier_scale, bool) and math.isfinite(float(classifier_scale))
        except (TypeError, ValueError):
            ok = False
        if not ok or not 0.0 <= float(classifier_scale) <= MAX_CLASSIFIER_SCALE:
            raise WhatIsHealthyError(
                f"classifier_scale must be a number in [0, {MAX_CLASSIFIER_SCALE:g}], got "
                f"{classifier_scale!r}"
            )


@dataclass
class LocalizeSettings(InferenceDefaults):
    """Every knob of one localization: the model's recommended values
    (:class:`~.model.InferenceDefaults`, inherited) and the run's own.

    ``threshold``: a number (difference in normalised units), ``"auto"`` (the model spec's
    recommended threshold) or ``"otsu"`` (Otsu's threshold of the difference inside the brain of
    this volume). ``inversion_refinements``: fixed-point iterations per inversion step (0 = plain
    DDIM, the paper's method; 2-5 make the inversion round trip near exact at that many extra
    calls). ``amp``: ``"auto"`` uses bf16 autocast on CPU (about 3x faster for our UNet on this
    kind of machine), bf16 (or fp16 where bf16 is unsupported) on CUDA, and none on MPS;
    ``True`` forces autocast (fp16 on MPS), ``False`` turns it off, ``"bf16"``/``"fp16"`` pick
    the type. ``backend``: what runs the network, ``"auto"`` (OpenVINO on an x86-64 CPU where it
    is installed, 1.2x torch per slice there; torch elsewhere), ``"torch"`` or ``"openvino"``
    (:mod:`~.openvino_network`). ``batch_size``: slices per chunk (decoding feeds the network twice that); None
    picks ``counterfactual.default_batch_size`` for the device. ``seed`` seeds torch before the
    run (DDIM with eta = 0 is deterministic; the seed is recorded so that any stochastic variant
    stays reproducible). ``method``: ``"implicit"`` (classifier-free guidance with weight
    ``guidance``, the paper's method) or ``"classifier"`` (classifier guidance: ``classifier`` is
    a noisy-image classifier, :class:`~.classifier.NoisyClassifier` or any
    ``classifier(x, t) -> logits``, and ``classifier_scale`` its scale ``s``; None takes the
    classifier spec's recommended scale; ``guidance`` is then unused). ``target_label``: the
    label decoding is guided to (the spec's "healthy").
    """

    # The spec's recommended threshold is a number; a run's may also name a rule.
    threshold: float | str = "auto"
    brain_only: bool = True
    device: str = "auto"
    batch_size: int | None = None
    amp: AmpSetting = "auto"
    backend: str = "auto"
    seed: int | None = 0
    method: str = "implicit"
    classifier_scale: float | None = None
    target_label: int = HEALTHY
    classifier: Any = dataclasses.field(default=None, repr=False, compare=False)

    @classmethod
    def from_spec(cls, spec: ModelSpec, **overrides: Any) -> LocalizeSettings:
        """The spec's recommended settings with ``overrides``, checked; overrides whose value is
        None are ignored (so that a CLI can pass its optional arguments straight through)."""
        recommended = {
            f.name: getattr(spec.inference, f.name)
            for f in dataclasses.fields(InferenceDefaults)
            if f.name != "threshold"  # "auto" means the spec's number
        }
        base = cls(**recommended, target_label=spec.labels.get("healthy", HEALTHY))
        overrides = {k: v for k, v in overrides.items() if v is not None}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise WhatIsHealthyError(f"unknown setting(s) {unknown}; known: {sorted(known)}")
        if "threshold" in overrides:
            overrides["threshold"] = parse_threshold(overrides["threshold"])
        settings = dataclasses.replace(base, **overrides)
        settings.validate()
        return settings

    def validate(self) -> None:
        if not _number_in(self.guidance, 0.0, MAX_GUIDANCE):
            raise WhatIsHealthyError(
                f"guidance must be a number in [0, {MAX_GUIDANCE:g}] (the paper's is about 3), "
                f"got {self.guidance!r}"
            )
        check_noise_and_steps(self.noise_level, self.steps)
        levels = self.noise_levels
        if not isinstance(levels, (tuple, list)) or len(levels) > MAX_NOISE_LEVELS:
            raise WhatIsHealthyError(
                f"noise_levels must be a list of at most {MAX_NOISE_LEVELS} noise levels (empty: "
                f"noise_level alone), got {levels!r}"
            )
        for level in levels:
            check_noise_and_steps(level, self.steps)
        parse_threshold(self.threshold)
        _check_int("median_size", self.median_size, 1, MAX_MEDIAN_SIZE, " (1: no smoothing)")
        _check_int("min_component_voxels", self.min_component_voxels, 0, None)
        _check_int("edge_erosion", self.edge_erosion, 0, MAX_EDGE_EROSION, " (voxels)")
        _check_int("edge_guide_radius", self.edge_guide_radius, 0, MAX_EDGE_GUIDE_RADIUS,
                   " (voxels; 0: plain upsampling)")
        contrast_signs((), self.lesion_contrast)  # refuses an unknown choice
        check_seed(self.seed)
        if self.batch_size is not None:
            _check_int("batch_size", self.batch_size, 1, MAX_BATCH_SIZE,
                       " (or None: the device's default)")
        _check_int("inversion_refinements", self.inversion_refinements, 0,
                   MAX_INVERSION_REFINEMENTS)
        if self.amp not in ("auto", "bf16", "fp16", True, False):
            raise WhatIsHealthyError(
                f"amp must be auto, bf16, fp16, True or False, got {self.amp!r}"
            )
        from .openvino_network import check_backend

        check_backend(self.backend)
        _check_method(self.method, self.classifier_scale)
