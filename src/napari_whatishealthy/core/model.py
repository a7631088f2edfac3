"""The model: a JSON-serialisable spec, the network built from it, and safe checkpoints.

A checkpoint is a folder holding ``model.safetensors`` (weights only: loading never unpickles)
and ``spec.json``. The network is MONAI's ``DiffusionModelUNet`` conditioned on the image-level
label twice, as in "What is Healthy?": a class embedding added to the timestep embedding, and a
label token fed to the attention blocks as cross-attention context. The null label (used for
classifier-free guidance and for DDIM inversion) has a context token fixed at zero.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from .errors import WhatIsHealthyError

WEIGHTS_FILE = "model.safetensors"
SPEC_FILE = "spec.json"
SPEC_FORMAT = "napari-whatishealthy/model-spec/1"

# Label convention, stored in every spec so that checkpoints say what their labels mean.
HEALTHY = 0
UNHEALTHY = 1
NULL = 2
DEFAULT_LABELS = {"healthy": HEALTHY, "unhealthy": UNHEALTHY, "null": NULL}


class CheckpointError(WhatIsHealthyError):
    """A checkpoint is missing, corrupt, unsafe, or does not fit its spec or the input."""


@dataclass
class NetworkSpec:
    """Hyperparameters of MONAI's DiffusionModelUNet (2D)."""

    channels: tuple[int, ...] = (32, 64, 128)
    attention_levels: tuple[bool, ...] = (False, False, True)
    num_res_blocks: int = 1
    num_head_channels: int = 32
    norm_num_groups: int = 16
    label_embedding_dim: int = 64
    # SDPA halves the attention cost on CPU (see docs/engine.md).
    use_flash_attention: bool = True


@dataclass
class ScheduleSpec:
    """The diffusion process the network was trained on."""

    num_train_timesteps: int = 1000
    beta_schedule: str = "linear_beta"  # MONAI scheduler name
    beta_start: float = 1e-4
    beta_end: float = 2e-2
    # Training samples t from {0, stride, 2*stride, ...}; inference uses only those timesteps.
    timestep_stride: int = 10

    def trained_timesteps(self) -> torch.Tensor:
        return torch.arange(0, self.num_train_timesteps, self.timestep_stride, dtype=torch.long)

    def alphas_cumprod(self) -> torch.Tensor:
        """alpha_bar_t for t = 0 .. T-1 (float64), from MONAI's DDIM scheduler."""
        from monai.networks.schedulers import DDIMScheduler

        scheduler = DDIMScheduler(
            num_train_timesteps=self.num_train_timesteps,
            schedule=self.beta_schedule,
            beta_start=self.beta_start,
            beta_end=self.beta_end,
        )
        return scheduler.alphas_cumprod.to(torch.float64)


@dataclass
class InferenceDefaults:
    """A model's recommended settings, stored in its spec: what `localize` and the widget use
    when the user gives none. Every default of these settings is written here, once; the
    settings type of a run (``core.settings.LocalizeSettings``) extends this one."""

    guidance: float = 3.0
    noise_level: float = 0.5
    steps: int = 10
    threshold: float = 0.15
    dynamic_normalisation: bool = True
    median_size: int = 3
    min_component_voxels: int = 20
    # Fixed-point iterations per DDIM inversion step (0 = plain DDIM, the paper's method).
    inversion_refinements: int = 0
    # Dynamic normalisation of the predicted x0 during inversion too (the reference code's
    # choice); False: only while decoding, so that inversion is the inverse of plain decoding.
    inversion_normalisation: bool = False
    # Several noise levels per run: the anomaly map is the mean of their difference maps and the
    # per-voxel spread (standard deviation) across them is the uncertainty map. Empty: the one
    # ``noise_level``. Costs one counterfactual per level.
    noise_levels: tuple[float, ...] = ()
    # Voxels of the brain's edge (3D erosion of the brain mask) where the score is set to 0,
    # so that the border of the skull stripping is never called a lesion; 0: none.
    edge_erosion: int = 0
    # Edge-aware upsampling of the difference map: radius (voxels) of a guided filter that fits
    # each channel's upsampled 64 px difference to that channel's full-resolution image, so that
    # lesion edges follow the image instead of a bilinear ramp; 0: plain bilinear upsampling.
    edge_guide_radius: int = 0
    # Which change counts in each modality: "any" (|input - healthy|, the paper's) or "expected"
    # (only the change a lesion makes there: brighter on FLAIR and T2, darker on T1; see
    # core.anomaly.LESION_CONTRAST).
    lesion_contrast: str = "any"


class JSONSpec:
    """``to_dict`` / ``to_json`` of a spec dataclass: its fields plus ``format`` (``FORMAT``)."""

    FORMAT: ClassVar[str]

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)  # type: ignore[call-overload]
        data["format"] = self.FORMAT
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


@dataclass
class ModelSpec(JSONSpec):
    """Everything needed to rebuild a model and use it correctly, serialisable to JSON."""

    FORMAT: ClassVar[str] = SPEC_FORMAT

    image_size: int = 64
    modalities: tuple[str, ...] = ("flair", "t1", "t1ce", "t2")
    labels: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_LABELS))
    network: NetworkSpec = field(default_factory=NetworkSpec)
    schedule: ScheduleSpec = field(default_factory=ScheduleSpec)
    inference: InferenceDefaults = field(default_factory=InferenceDefaults)
    normalisation: str = "brain-p99-to-[-1,1]"
    name: str = "unnamed"
    description: str = ""
    training: dict[str, Any] = field(default_factory=dict)

    @property
    def in_channels(self) -> int:
        return len(self.modalities)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "") -> ModelSpec:
        """A spec from its JSON object, every field checked against the schema of
        :mod:`.spec_check` (types and bounds); errors start with ``where``."""
        from .spec_check import check_model_spec

        prefix = f"{where}: " if where else ""
        data = dict(data)
        fmt = data.pop("format", SPEC_FORMAT)
        if fmt != SPEC_FORMAT:
            raise CheckpointError(f"{prefix}unknown spec format {fmt!r} (this version reads "
                                  f"{SPEC_FORMAT!r})")
        spec = spec_from_sections(cls, data, NetworkSpec, InferenceDefaults,
                                  f"{prefix}the model spec has unknown, missing or malformed fields")
        check_model_spec(where, spec)
        return spec


def lists_to_tuples(d: dict[str, Any]) -> dict[str, Any]:
    """A spec section read from JSON with its lists as tuples (the dataclasses' field types)."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


def spec_from_sections(cls: type, data: dict[str, Any], network_cls: type, inference_cls: type, error: str):
    """``cls`` (a model or classifier spec) built from its JSON object (``format`` already
    removed): the network, schedule and inference sections as their dataclasses, lists as
    tuples. Unknown, missing or malformed fields raise :class:`CheckpointError` ``error (why)``."""
    data = dict(data)
    try:
        network = network_cls(**lists_to_tuples(data.pop("network", {})))
        schedule = ScheduleSpec(**data.pop("schedule", {}))
        inference = inference_cls(**lists_to_tuples(data.pop("inference", {})))
        if "modalities" in data:
            data["modalities"] = tuple(data["modalities"])
        return cls(network=network, schedule=schedule, inference=inference, **data)
    except (TypeError, AttributeError, ValueError) as exc:
        raise CheckpointError(f"{error} ({exc})") from None


class ConditionalUNet(nn.Module):
    """DiffusionModelUNet plus the label embedding that gives it its cross-attention context."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        from monai.networks.nets import DiffusionModelUNet

        net = spec.network
        self.spec = spec
        self.null_label = spec.labels["null"]
        n_labels = len(spec.labels)
        # Null label -> zero context token: the unconditional model of classifier-free guidance.
        self.label_embedding = nn.Embedding(
            n_labels, net.label_embedding_dim, padding_idx=self.null_label
        )
        self.unet = DiffusionModelUNet(
            spatial_dims=2,
            in_channels=spec.in_channels,
            out_channels=spec.in_channels,
            num_res_blocks=net.num_res_blocks,
            channels=tuple(net.channels),
            attention_levels=tuple(net.attention_levels),
            norm_num_groups=net.norm_num_groups,
            num_head_channels=net.num_head_channels,
            with_conditioning=True,
            cross_attention_dim=net.label_embedding_dim,
            num_class_embeds=n_labels,
            use_flash_attention=net.use_flash_attention,
        )

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Predict the noise in ``x`` at timesteps ``t`` given labels (healthy/unhealthy/null)."""
        context = self.label_embedding(labels)[:, None, :]
        return self.unet(x, timesteps=t, context=context, class_labels=labels)


def build_model(spec: ModelSpec) -> ConditionalUNet:
    return ConditionalUNet(spec)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def save_checkpoint(model: ConditionalUNet, directory: str | Path, spec: ModelSpec | None = None) -> Path:
    """Write weights (safetensors) and spec (JSON) into ``directory``, each atomically."""
    return write_checkpoint_files(model, directory, (spec or model.spec).to_json(), SPEC_FORMAT)


def write_checkpoint_files(
    network: torch.nn.Module, directory: str | Path, spec_json: str, weights_format: str,
    inputs: Iterable[str | Path] = (),
) -> Path:
    """The checkpoint writer of every network (diffusion model, classifier): the weights as
    safetensors tagged with ``weights_format``, then ``spec_json``, written as one set (see
    :mod:`.output`): a checkpoint is never half old, half new. ``inputs`` are never written
    over."""
    from safetensors.torch import save_file

    from .output import OutputSet

    directory = Path(directory)
    state = {k: v.detach().to("cpu").contiguous() for k, v in network.state_dict().items()}
    with OutputSet(inputs, overwrite=True) as outputs:
        outputs.stage(directory / WEIGHTS_FILE,
                      lambda tmp: save_file(state, str(tmp), metadata={"format": weights_format}))
        outputs.stage(directory / SPEC_FILE, lambda tmp: Path(tmp).write_text(spec_json))
        outputs.commit()
    return directory


def checkpoint_hash(directory: str | Path) -> str:
    """SHA-256 of the weights file then the spec file: identifies a checkpoint in provenance."""
    directory = Path(directory)
    digest = hashlib.sha256()
    for name in (WEIGHTS_FILE, SPEC_FILE):
        with open(directory / name, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def load_spec(directory: str | Path) -> ModelSpec:
    data = read_spec_json(directory, "model")
    return ModelSpec.from_dict(data, where=str(Path(directory) / SPEC_FILE))


def _checkpoint(what: str) -> str:
    """What a checkpoint of ``what`` (``"model"`` or ``"classifier"``) is called in messages."""
    return "checkpoint" if what == "model" else f"{what} checkpoint"


def read_spec_json(directory: str | Path, what: str) -> dict[str, Any]:
    """The JSON object of checkpoint folder ``directory``'s spec file (``what``: ``"model"`` or
    ``"classifier"``); a missing, unreadable, invalid, too deeply nested or oversized file is one
    CheckpointError line."""
    path = Path(directory) / SPEC_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: no {what} spec here; a {_checkpoint(what)} is a folder "
                              f"with {SPEC_FILE} and {WEIGHTS_FILE}")
    try:
        if path.stat().st_size > 1 << 20:
            raise CheckpointError(f"{path}: a {what} spec is a small JSON file; this one is "
                                  f"{path.stat().st_size >> 20} MiB")
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, OSError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise CheckpointError(f"{path}: the {what} spec is not valid JSON ({reason})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: the {what} spec must be a JSON object")
    return data


def load_checkpoint(directory: str | Path, device: str | torch.device = "cpu") -> ConditionalUNet:
    """Load a checkpoint folder without executing any code from it.

    Pickles, truncated or corrupt weight files, and weights that do not fit the spec are refused
    with a ``CheckpointError`` that says what is wrong.
    """
    return load_network(directory, "model", load_spec, build_model, device)  # type: ignore[return-value]


def load_network(directory: str | Path, what: str, load_spec_of: Callable[[Path], Any],
                 build: Callable[[Any], nn.Module], device: str | torch.device) -> nn.Module:
    """The network of checkpoint folder ``directory`` (``what``: ``"model"`` or
    ``"classifier"``), in eval mode on ``device``: its spec (``load_spec_of``), the weight file's
    tensor shapes checked against the spec before the network (``build``) takes any memory, then
    the weights, read without executing code and loaded strictly."""
    directory = Path(directory)
    if directory.is_file():
        raise CheckpointError(f"{directory}: expected a {_checkpoint(what)} folder holding "
                              f"{SPEC_FILE} and {WEIGHTS_FILE}")
    from .spec_check import check_weights_fit

    spec = load_spec_of(directory)
    check_weights_fit(directory / WEIGHTS_FILE, lambda: build(spec), what)
    state = read_safetensors(directory / WEIGHTS_FILE, _checkpoint(what))
    network = build(spec)
    load_state_strict(network, state, f"{directory}: the {what} weights do not match the spec")
    network.eval()
    return network.to(device)


def refuse_pickle(weights: Path, what: str = "checkpoint") -> None:
    """A missing weights file, or a pickle or zip (which could execute code), is refused before
    anything is parsed."""
    if not weights.is_file():
        raise CheckpointError(f"{weights}: weights file missing from the {what}")
    with open(weights, "rb") as fh:
        head = fh.read(2)
    if head[:1] == b"\x80" or head == b"PK":
        raise CheckpointError(
            f"{weights}: this is a pickle/zip file, not safetensors; pickled checkpoints are "
            "refused because loading them can execute code. Convert it with safetensors."
        )


def read_safetensors(weights: Path, what: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file; a pickle or zip is refused before anything is parsed."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    refuse_pickle(weights, what)
    try:
        return load_file(str(weights))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{weights}: not a readable safetensors file ({exc})") from exc


def load_state_strict(module: nn.Module, state: dict[str, torch.Tensor], mismatch: str) -> None:
    """Load every tensor or none; a mismatch becomes a CheckpointError starting ``mismatch``."""
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0:3]
        raise CheckpointError(f"{mismatch} ({' '.join(first)})") from exc
