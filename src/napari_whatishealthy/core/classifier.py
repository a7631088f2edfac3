"""The noisy-image classifier for classifier guidance (Diff-SCM's earlier method, Wolleb et al.).

A classifier ``p(y | x_t, t)`` of healthy vs unhealthy slices, trained on images noised to every
trained diffusion timestep, gives the gradient that classifier guidance adds to the unconditional
noise prediction while decoding (see :mod:`.counterfactual`):

    eps <- eps_null - sqrt(1 - alpha_bar_t) * s * grad_x log p(healthy | x_t, t)

The network is MONAI's ``DiffusionModelEncoder`` (the encoder half of the diffusion UNet with its
timestep embedding, then fully connected layers; MONAI built it after Wolleb et al.), one logit
per class.

A checkpoint is a folder in the same format as the diffusion model's (:mod:`.model`):
``model.safetensors`` (weights only: loading never unpickles) and ``spec.json``, whose ``format``
says it is a classifier, so that neither kind of checkpoint can be loaded as the other.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from .checkpoint_cache import CheckpointCache
from .errors import WhatIsHealthyError
from .model import (
    HEALTHY,
    SPEC_FILE,
    SPEC_FORMAT,
    UNHEALTHY,
    WEIGHTS_FILE,
    CheckpointError,
    JSONSpec,
    ModelSpec,
    ScheduleSpec,
    load_network,
    read_spec_json,
    spec_from_sections,
    write_checkpoint_files,
)

CLASSIFIER_FORMAT = "napari-whatishealthy/classifier-spec/1"
# Output index of each class (the data's slice labels use the same numbers).
CLASSIFIER_LABELS = {"healthy": HEALTHY, "unhealthy": UNHEALTHY}
# The scale a new classifier recommends until it is tuned. 100 was best on the calibration cases
# for the default model's classifier (AUPRC 0.770; 10: 0.694, 300: 0.762; docs/benchmarks.md) and
# is Wolleb et al.'s value; it depends on image size, steps and the classifier's confidence, so
# sweep it for a new model (benchmarks/quality.py --classifier-only --sweep on calibration cases).
DEFAULT_SCALE = 100.0

__all__ = [
    "CLASSIFIER_FORMAT",
    "ClassifierDefaults",
    "ClassifierNetworkSpec",
    "ClassifierSpec",
    "NoisyClassifier",
    "build_classifier",
    "check_compatible",
    "classifier_gradient",
    "load_classifier",
    "load_classifier_cached",
    "load_classifier_spec",
    "log_prob",
    "resolve_classifier",
    "resolve_scale",
    "save_classifier",
    "target_class",
]


@dataclass
class ClassifierNetworkSpec:
    """Hyperparameters of MONAI's DiffusionModelEncoder (2D). Every level halves the image; the
    last level's map is flattened into a 512-unit fully connected layer."""

    channels: tuple[int, ...] = (32, 64, 64, 128)
    attention_levels: tuple[bool, ...] = (False, False, False, True)
    num_res_blocks: int = 1
    num_head_channels: int = 32
    norm_num_groups: int = 16
    use_flash_attention: bool = True


@dataclass
class ClassifierDefaults:
    """What ``localize --method classifier`` uses when no ``--classifier-scale`` is given."""

    scale: float = DEFAULT_SCALE


@dataclass
class ClassifierSpec(JSONSpec):
    """Everything needed to rebuild a classifier and use it with a diffusion model (JSON).

    ``schedule`` is the diffusion process whose noisy images it was trained on; it must match the
    diffusion model's. ``max_timestep``: the largest timestep it was trained on (None: all).
    """

    FORMAT: ClassVar[str] = CLASSIFIER_FORMAT
    image_size: int = 64
    modalities: tuple[str, ...] = ("flair", "t1", "t1ce", "t2")
    labels: dict[str, int] = field(default_factory=lambda: dict(CLASSIFIER_LABELS))
    network: ClassifierNetworkSpec = field(default_factory=ClassifierNetworkSpec)
    schedule: ScheduleSpec = field(default_factory=ScheduleSpec)
    inference: ClassifierDefaults = field(default_factory=ClassifierDefaults)
    max_timestep: int | None = None
    normalisation: str = "brain-p99-to-[-1,1]"
    name: str = "unnamed-classifier"
    description: str = ""
    training: dict[str, Any] = field(default_factory=dict)

    @property
    def in_channels(self) -> int:
        return len(self.modalities)

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def trained_timesteps(self) -> torch.Tensor:
        ts = self.schedule.trained_timesteps()
        if self.max_timestep is not None:
            ts = ts[ts <= int(self.max_timestep)]
        return ts

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "") -> ClassifierSpec:
        data = dict(data)
        fmt = data.pop("format", None)
        prefix = f"{where}: " if where else ""
        if fmt == SPEC_FORMAT:
            raise CheckpointError(
                f"{prefix}this is a diffusion model checkpoint (pass it as --model), not a "
                "classifier; train a classifier with `whatishealthy train-classifier`"
            )
        if fmt != CLASSIFIER_FORMAT:
            raise CheckpointError(
                f"{prefix}unknown classifier spec format {fmt!r} (this version reads "
                f"{CLASSIFIER_FORMAT!r})"
            )
        spec = spec_from_sections(
            cls, data, ClassifierNetworkSpec, ClassifierDefaults,
            f"{prefix}the classifier spec has unknown or missing fields, or malformed ones",
        )
        if not isinstance(spec.labels, dict) or sorted(spec.labels) != sorted(CLASSIFIER_LABELS):
            raise CheckpointError(
                f"{prefix}the classifier's labels must be {sorted(CLASSIFIER_LABELS)}, got "
                f"{sorted(spec.labels) if isinstance(spec.labels, dict) else spec.labels!r}"
            )
        from .spec_check import check_classifier_spec

        check_classifier_spec(where, spec)
        return spec


class NoisyClassifier(nn.Module):
    """``logits = classifier(x_t, t)``: one logit per class (index = ``spec.labels[name]``)."""

    def __init__(self, spec: ClassifierSpec) -> None:
        super().__init__()
        from monai.networks.nets.diffusion_model_unet import DiffusionModelEncoder

        net = spec.network
        self.spec = spec
        if len(net.channels) != len(net.attention_levels):
            raise CheckpointError("the classifier needs one attention flag per channel level")
        if any(c % net.norm_num_groups for c in net.channels):
            raise CheckpointError(
                f"classifier channels {tuple(net.channels)} must be multiples of "
                f"norm_num_groups={net.norm_num_groups}"
            )
        self.encoder = DiffusionModelEncoder(
            spatial_dims=2,
            in_channels=spec.in_channels,
            out_channels=spec.num_classes,
            input_shape=(spec.image_size, spec.image_size),
            num_res_blocks=net.num_res_blocks,
            channels=tuple(net.channels),
            attention_levels=tuple(net.attention_levels),
            norm_num_groups=net.norm_num_groups,
            num_head_channels=net.num_head_channels,
            use_flash_attention=net.use_flash_attention,
        )

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.encoder(x, timesteps=t)


def build_classifier(spec: ClassifierSpec) -> NoisyClassifier:
    return NoisyClassifier(spec)


# --------------------------------------------------------------------------------------------
# Checkpoints: the diffusion model's format (safetensors + spec.json), another spec format.


def save_classifier(
    model: NoisyClassifier, directory: str | Path, spec: ClassifierSpec | None = None
) -> Path:
    """Write weights (safetensors) and spec (JSON) into ``directory``, each atomically."""
    return write_checkpoint_files(model, directory, (spec or model.spec).to_json(),
                                  CLASSIFIER_FORMAT)


def load_classifier_spec(directory: str | Path) -> ClassifierSpec:
    data = read_spec_json(directory, "classifier")
    return ClassifierSpec.from_dict(data, where=str(Path(directory)))


def load_classifier(directory: str | Path, device: str | torch.device = "cpu") -> NoisyClassifier:
    """Load a classifier checkpoint folder without executing any code from it.

    Pickles, truncated or corrupt weight files, a diffusion model checkpoint, and weights that do
    not fit the spec are refused with a ``CheckpointError`` that says what is wrong. The returned
    classifier is in eval mode with its parameters frozen (guidance needs gradients with respect
    to the input only).
    """
    model = load_network(directory, "classifier", load_classifier_spec, build_classifier, device)
    for p in model.parameters():
        p.requires_grad_(False)
    return model  # type: ignore[return-value]


def resolve_classifier(path: str | Path) -> Path:
    """The checkpoint folder meant by ``path``: the folder, one of its files, or a
    ``train-classifier --out`` folder (its ``checkpoint/`` subfolder)."""
    if path is None or str(path) == "":
        raise CheckpointError("no classifier given; pass --classifier PATH")
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(
            f"{path}: no such classifier; give the folder `whatishealthy train-classifier "
            "--out DIR` wrote (DIR or DIR/checkpoint)"
        )
    if path.is_file() and path.name in (SPEC_FILE, WEIGHTS_FILE):
        path = path.parent
    if path.is_dir() and not (path / SPEC_FILE).is_file() and (path / "checkpoint").is_dir():
        path = path / "checkpoint"
    if path.is_file():
        raise CheckpointError(
            f"{path}: a classifier is a checkpoint folder holding {SPEC_FILE} and "
            f"{WEIGHTS_FILE}, not a single file; pass the folder"
        )
    missing = [n for n in (SPEC_FILE, WEIGHTS_FILE) if not (path / n).is_file()]
    if missing:
        raise CheckpointError(
            f"{path}: not a classifier checkpoint (missing {', '.join(missing)}); it is the "
            "folder `whatishealthy train-classifier` writes as DIR/checkpoint"
        )
    return path.resolve()


_cache = CheckpointCache(2, "classifier")


def load_classifier_cached(
    path: str | Path, device: str | torch.device = "auto"
) -> tuple[NoisyClassifier, ClassifierSpec, str]:
    """``(classifier, spec, sha256)`` for a checkpoint path on ``device``, loaded once (like
    :func:`~.registry.load_model_cached`); the classifier is shared: do not modify it."""
    from .device import resolve_device

    return _cache.get(resolve_classifier(path), resolve_device(device),
                      lambda folder, dev: load_classifier(folder, device=dev))


# --------------------------------------------------------------------------------------------
# Use with a diffusion model.


def check_compatible(
    classifier_spec: ClassifierSpec,
    model_spec: ModelSpec | None,
    plan: Sequence[int] | None = None,
) -> None:
    """Refuse a classifier that does not fit the diffusion model (or the timesteps of ``plan``)."""
    c = classifier_spec
    if model_spec is not None:
        m = model_spec
        if c.image_size != m.image_size:
            raise WhatIsHealthyError(
                f"the classifier works at {c.image_size}x{c.image_size}, the diffusion model at "
                f"{m.image_size}x{m.image_size}: train the classifier at --size {m.image_size}"
            )
        if tuple(c.modalities) != tuple(m.modalities):
            raise WhatIsHealthyError(
                f"the classifier's channels {tuple(c.modalities)} differ from the diffusion "
                f"model's {tuple(m.modalities)}"
            )
        cs, ms = c.schedule, m.schedule
        if (cs.num_train_timesteps, cs.beta_schedule, cs.beta_start, cs.beta_end) != (
            ms.num_train_timesteps, ms.beta_schedule, ms.beta_start, ms.beta_end
        ):
            raise WhatIsHealthyError(
                "the classifier was trained on another noise schedule than the diffusion model "
                f"({cs.beta_schedule} {cs.beta_start}-{cs.beta_end} over "
                f"{cs.num_train_timesteps} steps vs {ms.beta_schedule} {ms.beta_start}-"
                f"{ms.beta_end} over {ms.num_train_timesteps})"
            )
    if plan is not None:
        trained = set(int(t) for t in c.trained_timesteps().tolist())
        unseen = [int(t) for t in plan if int(t) not in trained]
        if unseen:
            top = max(trained) if trained else -1
            raise WhatIsHealthyError(
                f"the classifier was not trained at timestep(s) {unseen[:5]} (its timesteps: "
                f"every {c.schedule.timestep_stride} up to {top}); lower the noise level or "
                "retrain it with a matching --timestep-stride / --max-noise"
            )


def target_class(classifier_spec: ClassifierSpec, model_spec: ModelSpec | None,
                 target_label: int) -> int:
    """The classifier's output index for the diffusion model's ``target_label``, matched by name."""
    if model_spec is None:
        name = next((k for k, v in CLASSIFIER_LABELS.items() if v == int(target_label)), None)
    else:
        name = next((k for k, v in model_spec.labels.items() if v == int(target_label)), None)
    if name is None or name not in classifier_spec.labels:
        raise WhatIsHealthyError(
            f"the target label {target_label} has no class in the classifier "
            f"({sorted(classifier_spec.labels)})"
        )
    return int(classifier_spec.labels[name])


def resolve_scale(scale: float | None, classifier: Any) -> float:
    """The guidance scale to use: ``scale``, or the classifier spec's recommended one."""
    if scale is not None:
        return float(scale)
    spec = getattr(classifier, "spec", None)
    if isinstance(spec, ClassifierSpec):
        return float(spec.inference.scale)
    return DEFAULT_SCALE


def classifier_record(
    classifier: Any, path: str | Path | None, sha256: str | None, scale: float | None
) -> dict[str, Any]:
    """What a run's provenance (and an evaluation report) records of its guiding classifier."""
    return {
        "name": getattr(getattr(classifier, "spec", None), "name", None),
        "path": str(Path(path).resolve()) if path else None,
        "sha256": sha256,
        "scale": resolve_scale(scale, classifier),
    }


def log_prob(classifier: nn.Module, x: torch.Tensor, t: torch.Tensor | int,
             class_index: int) -> torch.Tensor:
    """``log p(class | x_t, t)`` per sample ([B], float32)."""
    if not isinstance(t, torch.Tensor):
        t = torch.full((x.shape[0],), int(t), dtype=torch.long, device=x.device)
    logits = classifier(x, t).float()
    return torch.log_softmax(logits, dim=1)[:, int(class_index)]


def classifier_gradient(
    classifier: nn.Module,
    x: torch.Tensor,
    t: int,
    class_index: int,
    amp_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``grad_x log p(class | x_t, t)`` (float32, shape of ``x``): one forward and one backward
    pass. Grad mode and autocast are entered here only; ``x`` may be an inference tensor."""
    with torch.inference_mode(False), torch.enable_grad():
        x_in = x.detach().clone().float().requires_grad_(True)
        ts = torch.full((x.shape[0],), int(t), dtype=torch.long, device=x.device)
        ctx = (
            torch.autocast(device_type=x.device.type, dtype=amp_dtype)
            if amp_dtype is not None
            else nullcontext()
        )
        with ctx:
            logits = classifier(x_in, ts)
        # Samples are independent (GroupNorm, no batch statistics): the gradient of the sum is
        # each sample's own gradient.
        selected = torch.log_softmax(logits.float(), dim=1)[:, int(class_index)].sum()
        (grad,) = torch.autograd.grad(selected, x_in)
    grad = grad.detach().float()
    if not torch.isfinite(grad).all():
        raise WhatIsHealthyError(
            "the classifier's gradient is not finite (NaN/inf); try --amp off or a smaller "
            "--classifier-scale"
        )
    return grad
