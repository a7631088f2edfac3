"""Training the class-conditional diffusion model from image-level labels.

Balanced healthy/unhealthy slice sampling, label dropout to the null label (one network learns
the conditional and the unconditional noise predictor, as classifier-free guidance needs),
AdamW, EMA weights, autocast (bf16 on CPU and CUDA), validation loss on held-out cases,
checkpoints and exact resume. Runs unchanged under ``torchrun`` (DistributedDataParallel, gloo on
CPU and nccl on GPU); only rank 0 writes.

Output folder layout:
    DIR/checkpoint/           EMA weights + spec: what ``localize`` loads
    DIR/train_state.pt        raw weights, EMA, optimiser and step, for ``--resume``
                              (read back with ``torch.load(weights_only=True)``)
    DIR/train_log.jsonl       one line per log interval: step, loss, val loss, throughput
    DIR/slice_store/          the model-space slices and labels of the cases (unless
                              ``store`` names another folder): see :mod:`.slice_store`;
                              built once in parallel, reused by a resume and by later runs
                              (runs of earlier versions kept DIR/slices.npz, still read)

Data: every rank reads its batches' rows from the one on-disk store (rank 0 builds it, the
others wait for it), so a rank's memory does not grow with the cohort; ``in_memory`` loads the
store into RAM on every rank instead (the earlier behaviour).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .data import SliceSet
from .errors import WhatIsHealthyError
from .model import NULL, ConditionalUNet, ModelSpec, NetworkSpec, build_model, save_checkpoint
from .slice_store import SliceStore
from .trainer import (
    STATE_FILE,
    BalancedSampler,
    DistInfo,
    Objective,
    RunConfig,
    autocast,
    load_data,
    noised,
    read_log,
    run_training,
    store_info,
)


@dataclass
class TrainConfig(RunConfig):
    """The diffusion model's run: the shared options and its own."""

    ema_decay: float = 0.999
    label_dropout: float = 0.15
    # A bundled model's name or a checkpoint folder whose weights start this run (fine-tuning).
    init_from: str | None = None
    network: NetworkSpec = field(default_factory=NetworkSpec)


def diffusion_loss(
    model: torch.nn.Module,
    x0: torch.Tensor,
    labels: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    timesteps: torch.Tensor,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Epsilon-prediction MSE at timesteps drawn from the trained set."""
    xt, t, noise = noised(x0, alphas_cumprod, timesteps, generator)
    pred = model(xt, t, labels)
    return F.mse_loss(pred.float(), noise)


def _init_spec_mismatch(base: ModelSpec, spec: ModelSpec) -> list[str]:
    """What differs between the model to start from and the one this run trains (empty: fits)."""
    differences = []
    if tuple(base.modalities) != tuple(spec.modalities):
        differences.append(f"modalities {','.join(base.modalities)} (this run: {','.join(spec.modalities)})")
    if base.image_size != spec.image_size:
        differences.append(f"size {base.image_size} (this run: {spec.image_size})")
    if asdict(base.network) != asdict(spec.network):
        differences.append("network (--channels / --attention / --res-blocks)")
    if base.labels != spec.labels:
        differences.append(f"labels {base.labels}")
    if asdict(base.schedule) != asdict(spec.schedule):
        differences.append("noise schedule (--timestep-stride)")
    return differences


def load_initial_weights(init_from: str, spec: ModelSpec) -> tuple[dict[str, torch.Tensor], ModelSpec, Path]:
    """Weights, spec and folder of the model named by ``init_from`` (bundled name or folder),
    refused with one line saying what differs when it does not fit ``spec``."""
    from .model import load_spec, read_safetensors
    from .registry import resolve_model

    folder = resolve_model(init_from)
    base = load_spec(folder)
    differences = _init_spec_mismatch(base, spec)
    if differences:
        hint = f" (e.g. --modalities {','.join(base.modalities)} --size {base.image_size})"
        raise WhatIsHealthyError(
            f"--init-from {init_from}: that model does not fit this run: it has "
            f"{'; '.join(differences)}{hint}"
        )
    return read_safetensors(folder / "model.safetensors"), base, folder


def ema_average(decay: float) -> Callable[..., None]:
    """The EMA of :class:`torch.optim.swa_utils.AveragedModel` with a warm-up: the decay of the
    k-th update is ``min(decay, (1 + k) / (10 + k))``, so that a short run's EMA is not
    dominated by the random initial weights."""

    def update(averaged: list[torch.Tensor], current: list[torch.Tensor],
               num_averaged: torch.Tensor) -> None:
        k = int(num_averaged) - 1  # the average starts as a copy, counted as one update
        torch._foreach_lerp_(averaged, current, 1.0 - min(decay, (1 + k) / (10 + k)))

    return update


@torch.no_grad()
def validation_loss(
    model: torch.nn.Module,
    val: SliceSet | SliceStore,
    alphas_cumprod: torch.Tensor,
    timesteps: torch.Tensor,
    device: torch.device,
    amp: str,
    max_slices: int = 256,
    batch: int = 64,
) -> float:
    """Loss on held-out cases with fixed noise and timesteps, so that values are comparable."""
    if len(val) == 0:
        return float("nan")
    generator = torch.Generator().manual_seed(1234)
    index = np.random.default_rng(0).permutation(len(val))[:max_slices]
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(index), batch):
        part = index[start : start + batch]
        x0 = torch.from_numpy(val.read(part).astype(np.float32)).to(device)
        labels = torch.from_numpy(val.labels[part]).to(device)
        with autocast(device, amp):
            loss = diffusion_loss(model, x0, labels, alphas_cumprod, timesteps, generator)
        total += float(loss) * len(part)
        count += len(part)
    model.train()
    return total / count


class DiffusionObjective(Objective):
    """Noise prediction with label dropout to the null label; the checkpoint holds the EMA."""

    what = "model"

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.init_record: dict[str, Any] = {}

    def build(self, log: Callable[[str], None]) -> None:
        config = self.config
        self.spec = spec = ModelSpec(image_size=config.size, modalities=tuple(config.modalities),
                                     network=copy.deepcopy(config.network), name=config.name)
        spec.schedule.timestep_stride = config.timestep_stride
        self.model = build_model(spec)
        resuming = config.resume and (Path(config.out) / STATE_FILE).exists()
        if config.init_from and not resuming:
            self._init_from(log)
        self.alphas_cumprod = spec.schedule.alphas_cumprod().to(torch.float32)
        self.timesteps = spec.schedule.trained_timesteps()

    def _init_from(self, log: Callable[[str], None]) -> None:
        from .model import checkpoint_hash, load_state_strict

        name = self.config.init_from
        weights, base, folder = load_initial_weights(name, self.spec)
        load_state_strict(self.model, weights,
                          f"--init-from {name}: the weights do not match its spec")
        # Until the new weights are tuned, the starting model's recommended settings are the
        # best guess.
        self.spec.inference = copy.deepcopy(base.inference)
        before = int(base.training.get("total_steps", base.training.get("steps", 0)))
        self.init_record = {"model": str(name), "sha256": checkpoint_hash(folder), "steps": before}
        log(f"starting from {name} ({folder}, {before} steps)")

    def load_slices(self, dist_info: DistInfo, log: Callable[[str], None],
                    show_progress: bool) -> SliceSet | SliceStore:
        return load_data(self.config, dist_info, log, show_progress)

    def on_device(self, device: torch.device) -> None:
        from torch.optim.swa_utils import AveragedModel

        self.ema = AveragedModel(self.model, multi_avg_fn=ema_average(self.config.ema_decay))
        self.ema.n_averaged.fill_(1)  # it starts as a copy of the model
        self.ema.eval()

    def labels(self, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        drop = torch.rand(labels.shape, generator=generator,
                          device=generator.device) < self.config.label_dropout
        labels[drop] = NULL
        return labels

    def loss(self, net: torch.nn.Module, x0: torch.Tensor, labels: torch.Tensor,
             generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        return diffusion_loss(net, x0, labels, self.alphas_cumprod, self.timesteps,
                              generator), {}

    def after_step(self, step: int) -> None:
        self.ema.update_parameters(self.model)

    def validate(self, run: Any) -> dict[str, Any]:
        return {"val_loss": validation_loss(self.ema.module, run.val_set, self.alphas_cumprod,
                                            self.timesteps, run.device, self.config.amp)}

    def training_record(self, run: Any) -> dict[str, Any]:
        config = self.config
        record = {
            "steps": run.step,
            "batch": config.batch * run.dist.world,
            "wall_time_s": round(run.elapsed(), 1),
            "data": str(config.data),
            "image_size": config.size,
            "modalities": list(config.modalities),
            "slice_store": store_info(run.slices),
            "cases": {"train": len(run.train_cases), "validation": len(run.val_cases)},
            "slices": {"train": run.train_set.counts(), "validation": run.val_set.counts()},
            "label_dropout": config.label_dropout,
            "lr": config.lr,
            "ema_decay": config.ema_decay,
            "device": str(run.device),
            "world_size": run.dist.world,
            "torch": torch.__version__,
        }
        if self.init_record:
            record["init_from"] = self.init_record
            record["total_steps"] = self.init_record["steps"] + run.step
        return record

    def save_checkpoint(self, folder: Path, run: Any) -> None:
        self.spec.training = self.training_record(run)
        save_checkpoint(self.ema.module, folder, self.spec)

    def extra_state(self) -> dict[str, Any]:
        import json

        return {"ema": self.ema.module.state_dict(), "init_from": json.dumps(self.init_record)}

    def load_extra_state(self, state: dict[str, Any], step: int) -> None:
        import json

        self.ema.module.load_state_dict(state["ema"])
        self.ema.n_averaged.fill_(step + 1)
        self.init_record = json.loads(state.get("init_from", "{}"))


def train(config: TrainConfig, log: Callable[[str], None] = print, show_progress: bool = True) -> Path:
    """Train (or resume) and return the checkpoint folder; see the module docstring for files.

    SIGTERM and Ctrl-C stop the run after saving a resumable state.
    """
    return run_training(config, DiffusionObjective(config), log, show_progress)


__all__ = ["BalancedSampler", "ConditionalUNet", "TrainConfig", "diffusion_loss", "read_log",
           "train"]
