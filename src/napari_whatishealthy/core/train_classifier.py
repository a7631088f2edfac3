"""Training the noisy-image classifier that classifier guidance needs.

The same data pipeline as the diffusion model (:mod:`.train`): BraTS-layout cases, image-level
slice labels, the same case split (same seed and validation fraction give the same held-out
cases), balanced healthy/unhealthy batches, left-right flips, and the slice store. Each
clean slice is noised to a timestep drawn from the diffusion schedule's trained timesteps
(``x_t = sqrt(ab) x_0 + sqrt(1 - ab) eps``) and the classifier learns ``p(label | x_t, t)`` with
cross-entropy, as in Dhariwal & Nichol and Wolleb et al.

Output folder layout (like ``train``):
    DIR/checkpoint/           weights + spec: what ``--classifier DIR`` loads
    DIR/train_state.pt        weights, optimiser and step for ``--resume`` (weights_only load)
    DIR/train_log.jsonl       step, loss, accuracy, validation loss and accuracy per noise band
    DIR/slice_store/          model-space slices and labels (unless ``store`` or ``slices``
                              names one, e.g. the diffusion run's: see :mod:`.slice_store`)
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .classifier import (
    ClassifierNetworkSpec,
    ClassifierSpec,
    build_classifier,
    save_classifier,
)
from .data import SliceSet, load_slice_set
from .errors import WhatIsHealthyError
from .slice_store import SliceStore
from .trainer import (
    CACHE_FILE,
    STORE_DIR,
    DistInfo,
    Objective,
    RunConfig,
    autocast,
    load_data,
    noised,
    run_training,
)

__all__ = ["ClassifierTrainConfig", "classifier_loss", "evaluate_classifier", "train_classifier"]

NOISE_BANDS = ((0, 250), (250, 500), (500, 750), (750, 1000))


@dataclass
class ClassifierTrainConfig(RunConfig):
    """The classifier's run: the shared options (its own defaults) and its own."""

    steps: int = 3000
    lr: float = 3e-4
    weight_decay: float = 0.05
    warmup: int = 100
    name: str = "whatishealthy-classifier"
    network: ClassifierNetworkSpec = field(default_factory=ClassifierNetworkSpec)
    max_noise: float = 1.0  # train on timesteps up to max_noise * T
    slices: str | None = None  # reuse a slices.npz (e.g. the diffusion run's) instead of DATA


def classifier_loss(
    model: torch.nn.Module,
    x0: torch.Tensor,
    labels: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    timesteps: torch.Tensor,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cross-entropy of the classifier on ``x0`` noised to random trained timesteps.

    Returns ``(loss, logits, t)``."""
    xt, t, _ = noised(x0, alphas_cumprod, timesteps, generator)
    logits = model(xt, t).float()
    return F.cross_entropy(logits, labels), logits, t


@torch.no_grad()
def evaluate_classifier(
    model: torch.nn.Module,
    val: SliceSet,
    alphas_cumprod: torch.Tensor,
    timesteps: torch.Tensor,
    device: torch.device,
    amp: str = "off",
    max_slices: int = 512,
    batch: int = 64,
) -> dict[str, float | dict[str, float | None] | None]:
    """Loss and accuracy on held-out slices with fixed noise and timesteps (comparable across
    evaluations), and accuracy per noise band ``t in [lo, hi)``."""
    if len(val) == 0:
        return {"val_loss": None, "val_acc": None, "val_acc_by_t": {}}
    generator = torch.Generator().manual_seed(4321)
    index = np.random.default_rng(0).permutation(len(val))[:max_slices]
    was_training = model.training
    model.eval()
    losses, correct, ts = [], [], []
    for start in range(0, len(index), batch):
        part = index[start : start + batch]
        x0 = torch.from_numpy(val.read(part).astype(np.float32)).to(device)
        labels = torch.from_numpy(val.labels[part]).to(device)
        with autocast(device, amp):
            _, logits, t = classifier_loss(model, x0, labels, alphas_cumprod, timesteps,
                                           generator)
        losses.append(F.cross_entropy(logits.float(), labels, reduction="none").cpu())
        correct.append((logits.argmax(1) == labels).cpu())
        ts.append(t.cpu())
    if was_training:
        model.train()
    loss = torch.cat(losses)
    ok = torch.cat(correct).float()
    t_all = torch.cat(ts)
    by_t: dict[str, float | None] = {}
    for lo, hi in NOISE_BANDS:
        sel = (t_all >= lo) & (t_all < hi)
        by_t[f"{lo}-{hi}"] = float(ok[sel].mean()) if sel.any() else None
    return {"val_loss": float(loss.mean()), "val_acc": float(ok.mean()), "val_acc_by_t": by_t}


def _load_slices(config: ClassifierTrainConfig, dist_info: DistInfo, log: Callable[[str], None],
                 show_progress: bool = True) -> SliceSet | SliceStore:
    if config.slices is None:
        return load_data(config, dist_info, log, show_progress)  # DATA -> the slice store
    path = Path(config.slices)
    from .slice_store import INDEX_FILE

    for folder in (path, path / STORE_DIR):  # a store, or a `train --out` folder holding one
        if (folder / INDEX_FILE).is_file():
            store = SliceStore(folder)
            _check_shape(folder, store.shape, config)
            log(f"using the slice store {folder}")
            return store
    if path.is_dir():
        path = path / CACHE_FILE
    if not path.is_file():
        raise WhatIsHealthyError(f"{path}: no slice store (index.json) or slices.npz here")
    try:
        slice_set = load_slice_set(path)
    except (OSError, ValueError, KeyError) as exc:
        raise WhatIsHealthyError(f"{path}: not a readable slices cache ({exc})") from exc
    _check_shape(path, slice_set.slices.shape, config)
    log(f"using the cached slices in {path}")
    return slice_set


def _check_shape(path: Path, shape: tuple[int, ...], config: ClassifierTrainConfig) -> None:
    if tuple(shape[1:]) != (len(config.modalities), config.size, config.size):
        raise WhatIsHealthyError(
            f"{path}: its slices are {shape[1]} channels at {shape[2]}x{shape[3]}, the "
            f"classifier is asked for {len(config.modalities)} at {config.size}x{config.size}"
        )


class ClassifierObjective(Objective):
    """Cross-entropy of the noisy-image classifier at random trained timesteps."""

    what = "classifier"
    checkpoint_label = "classifier checkpoint"
    seed_offset = 17
    noise_on_device = False  # classifier_loss draws its noise on the CPU

    def __init__(self, config: ClassifierTrainConfig) -> None:
        if not 0.0 < config.max_noise <= 1.0:
            raise WhatIsHealthyError(f"max_noise must be in (0, 1], got {config.max_noise}")
        self.config = config
        self.last_val: dict[str, Any] = {}

    def build(self, log: Callable[[str], None]) -> None:
        config = self.config
        self.spec = spec = ClassifierSpec(image_size=config.size,
                                          modalities=tuple(config.modalities),
                                          network=copy.deepcopy(config.network), name=config.name)
        spec.schedule.timestep_stride = config.timestep_stride
        if config.max_noise < 1.0:
            spec.max_timestep = int(round(config.max_noise * spec.schedule.num_train_timesteps))
        self.timesteps = spec.trained_timesteps()
        if len(self.timesteps) == 0:
            raise WhatIsHealthyError("no trained timesteps at or below --max-noise")
        self.model = build_classifier(spec)
        self.alphas_cumprod = spec.schedule.alphas_cumprod().to(torch.float32)

    def load_slices(self, dist_info: DistInfo, log: Callable[[str], None],
                    show_progress: bool) -> SliceSet | SliceStore:
        return _load_slices(self.config, dist_info, log, show_progress)

    def loss(self, net: torch.nn.Module, x0: torch.Tensor, labels: torch.Tensor,
             generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        loss, logits, _ = classifier_loss(net, x0, labels, self.alphas_cumprod, self.timesteps,
                                          generator)
        return loss, {"acc": float((logits.argmax(1) == labels).float().mean())}

    def validate(self, run: Any) -> dict[str, Any]:
        self.last_val = evaluate_classifier(self.model, run.val_set, self.alphas_cumprod,
                                            self.timesteps, run.device, self.config.amp)
        return self.last_val

    def save_checkpoint(self, folder: Path, run: Any) -> None:
        config = self.config
        self.spec.training = {
            "steps": run.step,
            "batch": config.batch * run.dist.world,
            "wall_time_s": round(run.elapsed(), 1),
            "data": str(config.slices or config.data),
            "cases": {"train": len(run.train_cases), "validation": len(run.val_cases)},
            "slices": {"train": run.train_set.counts(), "validation": run.val_set.counts()},
            "lr": config.lr,
            "max_noise": config.max_noise,
            "device": str(run.device),
            "torch": torch.__version__,
            **({"validation": self.last_val} if self.last_val else {}),
        }
        self.model.eval()
        save_classifier(self.model, folder, self.spec)
        self.model.train()


def train_classifier(
    config: ClassifierTrainConfig,
    log: Callable[[str], None] = print,
    show_progress: bool = True,
) -> Path:
    """Train (or resume) the classifier and return its checkpoint folder; SIGTERM and Ctrl-C
    stop the run after saving a resumable state."""
    return run_training(config, ClassifierObjective(config), log, show_progress)
