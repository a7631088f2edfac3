"""The schema of a checkpoint's ``spec.json``, with bounds, and the check of its weights file
against it: a model file is untrusted input.

Every value of a spec is checked for type and range before a network is built (a spec with
``"channels": [4096, 4096, 4096]`` would otherwise allocate tens of GB), and the tensor shapes
in ``model.safetensors`` are read from its header (no tensor is loaded) and compared with the
shapes the spec's network would have, built on PyTorch's ``meta`` device (no memory). Every
failure is one :class:`~.model.CheckpointError` line naming the file and the field.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .errors import WhatIsHealthyError
from .model import CheckpointError, refuse_pickle

# Bounds of a spec (docs/cli.md, "Model files").
MAX_LEVELS = 6
MAX_CHANNELS = 1024
MAX_RES_BLOCKS = 8
MAX_EMBEDDING = 1024
IMAGE_SIZE_RANGE = (8, 1024)
MAX_MODALITIES = 8
MAX_TIMESTEPS = 10_000
MAX_PARAMETERS = 200_000_000  # 800 MB of float32 weights; the bundled models have < 10 M
BETA_SCHEDULES = ("linear_beta", "scaled_linear_beta", "sigmoid_beta", "cosine")


def _fail(where: str, message: str) -> CheckpointError:
    return CheckpointError(f"{where}: {message}" if where else message)


def _int_in(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _check_int(where: str, name: str, value: Any, low: int, high: int) -> None:
    if not _int_in(value, low, high):
        raise _fail(where, f"{name} must be an integer in [{low}, {high}], got {value!r}")


def check_network(where: str, net: Any, image_size: Any, needs_embedding: bool = True) -> None:
    """Channels, attention levels, groups, heads, blocks (and the label embedding)."""
    channels, attention = net.channels, net.attention_levels
    if not isinstance(channels, tuple | list) or not 1 <= len(channels) <= MAX_LEVELS:
        raise _fail(where, f"network.channels must be a list of 1 to {MAX_LEVELS} integers, got "
                    f"{channels!r}")
    for c in channels:
        _check_int(where, "network.channels", c, 1, MAX_CHANNELS)
    if (not isinstance(attention, tuple | list) or len(attention) != len(channels)
            or not all(isinstance(a, bool) for a in attention)):
        raise _fail(where, f"network.attention_levels must be {len(channels)} booleans (one per "
                    f"level), got {attention!r}")
    _check_int(where, "network.norm_num_groups", net.norm_num_groups, 1, MAX_CHANNELS)
    if any(c % net.norm_num_groups for c in channels):
        raise _fail(where, f"network.norm_num_groups {net.norm_num_groups} must divide every "
                    f"channel count {tuple(channels)}")
    _check_int(where, "network.num_head_channels", net.num_head_channels, 1, MAX_CHANNELS)
    if any(a and c % net.num_head_channels for c, a in zip(channels, attention, strict=True)):
        raise _fail(where, f"network.num_head_channels {net.num_head_channels} must divide the "
                    "channel count of every attention level")
    _check_int(where, "network.num_res_blocks", net.num_res_blocks, 1, MAX_RES_BLOCKS)
    if needs_embedding:
        _check_int(where, "network.label_embedding_dim", net.label_embedding_dim, 1,
                   MAX_EMBEDDING)
    if not isinstance(getattr(net, "use_flash_attention", True), bool):
        raise _fail(where, "network.use_flash_attention must be true or false")
    _check_int(where, "image_size", image_size, *IMAGE_SIZE_RANGE)
    if image_size % 2 ** (len(channels) - 1):
        raise _fail(where, f"image_size {image_size} must be divisible by "
                    f"{2 ** (len(channels) - 1)} ({len(channels)} levels halve it)")
    estimate = sum(9 * c * c * (4 * net.num_res_blocks + 4) for c in channels)
    if estimate > MAX_PARAMETERS:
        raise _fail(where, f"the network would have about {estimate / 1e6:.0f} M parameters, "
                    f"more than the {MAX_PARAMETERS / 1e6:.0f} M this tool loads")


def check_schedule(where: str, schedule: Any) -> None:
    _check_int(where, "schedule.num_train_timesteps", schedule.num_train_timesteps, 2,
               MAX_TIMESTEPS)
    if schedule.beta_schedule not in BETA_SCHEDULES:
        raise _fail(where, f"schedule.beta_schedule must be one of {', '.join(BETA_SCHEDULES)}, "
                    f"got {schedule.beta_schedule!r}")
    for name in ("beta_start", "beta_end"):
        value = getattr(schedule, name)
        if isinstance(value, bool) or not isinstance(value, int | float) or not (
                math.isfinite(value) and 0.0 < value < 1.0):
            raise _fail(where, f"schedule.{name} must be a number in (0, 1), got {value!r}")
    if schedule.beta_start > schedule.beta_end:
        raise _fail(where, "schedule.beta_start must not exceed schedule.beta_end")
    _check_int(where, "schedule.timestep_stride", schedule.timestep_stride, 1,
               schedule.num_train_timesteps - 1)


def check_common(where: str, spec: Any, label_names: tuple[str, ...]) -> None:
    """Modalities, labels, name and description: fields both kinds of spec have."""
    modalities = spec.modalities
    if (not isinstance(modalities, tuple | list) or not 1 <= len(modalities) <= MAX_MODALITIES
            or not all(isinstance(m, str) and m for m in modalities)
            or len(set(modalities)) != len(modalities)):
        raise _fail(where, f"modalities must be a list of 1 to {MAX_MODALITIES} distinct names, "
                    f"got {modalities!r}")
    labels = spec.labels
    if not isinstance(labels, dict) or sorted(labels) != sorted(label_names):
        raise _fail(where, f"labels must name exactly {', '.join(label_names)}, got "
                    f"{sorted(labels) if isinstance(labels, dict) else labels!r}")
    values = list(labels.values())
    if sorted(values) != list(range(len(values))) or not all(isinstance(v, int) for v in values):
        raise _fail(where, f"labels must be the numbers 0..{len(values) - 1}, each once, got "
                    f"{labels}")
    for name in ("name", "description", "normalisation"):
        if not isinstance(getattr(spec, name), str):
            raise _fail(where, f"{name} must be a string")
    if not isinstance(spec.training, dict):
        raise _fail(where, "training must be an object")


def check_model_spec(where: str, spec: Any) -> None:
    """A diffusion model's spec (:class:`~.model.ModelSpec`), every field."""
    from .model import DEFAULT_LABELS

    check_common(where, spec, tuple(DEFAULT_LABELS))
    check_network(where, spec.network, spec.image_size)
    check_schedule(where, spec.schedule)
    from .settings import LocalizeSettings

    try:
        LocalizeSettings.from_spec(spec).validate()
        threshold = spec.inference.threshold
        if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not (
                math.isfinite(threshold) and threshold >= 0):
            raise ValueError(f"threshold must be a number >= 0, got {threshold!r}")
    except (ValueError, TypeError, WhatIsHealthyError) as exc:
        raise _fail(where, f"inference settings: {exc}") from None


def check_classifier_spec(where: str, spec: Any) -> None:
    """A noisy-image classifier's spec (:class:`~.classifier.ClassifierSpec`), every field."""
    from .classifier import CLASSIFIER_LABELS

    check_common(where, spec, tuple(CLASSIFIER_LABELS))
    check_network(where, spec.network, spec.image_size, needs_embedding=False)
    check_schedule(where, spec.schedule)
    if spec.max_timestep is not None:
        _check_int(where, "max_timestep", spec.max_timestep, 0,
                   spec.schedule.num_train_timesteps - 1)
    scale = spec.inference.scale
    if isinstance(scale, bool) or not isinstance(scale, int | float) or not (
            math.isfinite(scale) and 0 <= scale <= 1e4):
        raise _fail(where, f"inference.scale must be a number in [0, 10000], got {scale!r}")


def check_weights_fit(weights: Path, build: Callable[[], torch.nn.Module], what: str) -> None:
    """Compare the tensor names and shapes in a safetensors header with the network ``build``
    makes, built on the ``meta`` device (no memory, no weights read)."""
    from safetensors import SafetensorError, safe_open

    refuse_pickle(weights, what)
    try:
        with safe_open(str(weights), framework="pt") as fh:
            stored = {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{weights}: not a readable safetensors file ({exc})") from exc
    with torch.device("meta"):
        network = build()
    expected = {k: tuple(v.shape) for k, v in network.state_dict().items()}
    missing = sorted(set(expected) - set(stored))
    extra = sorted(set(stored) - set(expected))
    wrong = sorted(k for k in set(expected) & set(stored) if expected[k] != stored[k])
    if missing or extra or wrong:
        detail = (f"{len(missing)} missing, {len(extra)} unexpected, {len(wrong)} of another "
                  "shape")
        example = wrong[0] if wrong else (missing or extra)[0]
        shown = (f"; e.g. {example}: file {stored.get(example)}, spec {expected.get(example)}")
        raise CheckpointError(f"{weights}: the weights do not match the spec.json of the "
                              f"{what} ({detail}{shown}); the spec or the weights were changed")
