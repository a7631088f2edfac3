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
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .classifier import (
    ClassifierNetworkSpec,
    ClassifierSpec,
    NoisyClassifier,
    build_classifier,
    save_classifier,
)
from .data import SliceSet, load_slice_set
from .errors import WhatIsHealthyError
from .model import count_parameters
from .progress import interval_line, is_live, progress_bar
from .train import (
    CACHE_FILE,
    CHECKPOINT_DIR,
    LOG_FILE,
    STATE_FILE,
    BalancedSampler,
    _autocast,
    _load_data,
    _split_cases,
    _stop_on_sigterm,
    resume_errors,
    save_state_atomic,
)

__all__ = ["ClassifierTrainConfig", "classifier_loss", "evaluate_classifier", "train_classifier"]

NOISE_BANDS = ((0, 250), (250, 500), (500, 750), (750, 1000))


@dataclass
class ClassifierTrainConfig:
    data: str
    out: str
    size: int = 64
    modalities: tuple[str, ...] = ("flair", "t1", "t1ce", "t2")
    steps: int = 3000
    batch: int = 32
    lr: float = 3e-4
    weight_decay: float = 0.05
    warmup: int = 100
    val_fraction: float = 0.1  # the diffusion model's default: the same held-out cases
    seed: int = 0
    amp: str = "auto"  # auto | on | off
    device: str = "auto"
    log_every: int = 25
    val_every: int = 250
    checkpoint_every: int = 250
    time_limit_min: float | None = None
    resume: bool = False
    network: ClassifierNetworkSpec = field(default_factory=ClassifierNetworkSpec)
    timestep_stride: int = 10
    max_noise: float = 1.0  # train on timesteps up to max_noise * T
    slices: str | None = None  # reuse a slices.npz (e.g. the diffusion run's) instead of DATA
    store: str | None = None  # slice store folder (None: DIR/slice_store), as in train
    workers: int | None = None
    rebuild_store: bool = False
    in_memory: bool = False
    name: str = "whatishealthy-classifier"


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
    pick = torch.randint(0, len(timesteps), (x0.shape[0],), generator=generator)
    t_cpu = timesteps[pick]
    t = t_cpu.to(x0.device)
    noise = torch.randn(x0.shape, generator=generator).to(x0.device)
    # Indexed on the CPU, where the table is: CUDA timesteps cannot index a CPU tensor.
    ab = alphas_cumprod[t_cpu].to(x0.device, torch.float32).view(-1, 1, 1, 1)
    xt = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
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
        with _autocast(device, amp):
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


def _load_slices(config: ClassifierTrainConfig, log: Callable[[str], None]) -> SliceSet:
    if config.slices is None:
        return _load_data(config, _Main(), log)  # DATA -> the slice store, as `train` does
    path = Path(config.slices)
    from .slice_store import INDEX_FILE, SliceStore
    from .train import STORE_DIR

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


class _Main:
    """The single-process stand-in for train.DistInfo (this trainer is not distributed)."""

    is_main = True


def train_classifier(
    config: ClassifierTrainConfig,
    log: Callable[[str], None] = print,
    show_progress: bool = True,
) -> Path:
    """Train (or resume) the classifier and return its checkpoint folder; SIGTERM and Ctrl-C
    stop the run after saving a resumable state."""
    with _stop_on_sigterm():
        return _train(config, log, show_progress)


def _train(config: ClassifierTrainConfig, log: Callable[[str], None],
           show_progress: bool) -> Path:
    from .device import resolve_device
    from .runtime import tune_allocator

    tune_allocator()
    if not 0.0 < config.max_noise <= 1.0:
        raise WhatIsHealthyError(f"max_noise must be in (0, 1], got {config.max_noise}")
    device = resolve_device(config.device)
    out = Path(config.out)
    state_path = out / STATE_FILE
    if state_path.exists() and not config.resume:
        raise WhatIsHealthyError(
            f"{out}: holds a training run already; pass --resume to continue it or choose "
            "another --out"
        )
    torch.manual_seed(config.seed)
    slice_set = _load_slices(config, log)
    train_cases, val_cases = _split_cases(len(slice_set.cases), config.val_fraction, config.seed,
                                          log)
    train_set, val_set = slice_set.subset(train_cases), slice_set.subset(val_cases)
    log(f"slices: train {train_set.counts()} from {len(train_cases)} cases, "
        f"validation {val_set.counts()} from {len(val_cases)} cases")

    spec = ClassifierSpec(
        image_size=config.size,
        modalities=tuple(config.modalities),
        network=copy.deepcopy(config.network),
        name=config.name,
    )
    spec.schedule.timestep_stride = config.timestep_stride
    if config.max_noise < 1.0:
        spec.max_timestep = int(round(config.max_noise * spec.schedule.num_train_timesteps))
    timesteps = spec.trained_timesteps()
    if len(timesteps) == 0:
        raise WhatIsHealthyError("no trained timesteps at or below --max-noise")
    model: NoisyClassifier = build_classifier(spec).to(device)
    optimiser = torch.optim.AdamW(model.parameters(), lr=config.lr,
                                  weight_decay=config.weight_decay)
    sampler = BalancedSampler(train_set.labels, config.seed)
    generator = torch.Generator().manual_seed(config.seed * 1000 + 17)
    step = 0
    elapsed_before = 0.0
    if config.resume and state_path.exists():
        with resume_errors(state_path):
            state = torch.load(state_path, map_location="cpu", weights_only=True)
            model.load_state_dict(state["model"])
            optimiser.load_state_dict(state["optimiser"])
            step = int(state["step"])
            elapsed_before = float(state["elapsed_s"])
            sampler.set_state(json.loads(state["sampler"]))
            generator.set_state(state["generator"])
            log(f"resumed at step {step}")
    alphas_cumprod = spec.schedule.alphas_cumprod().to(torch.float32)
    log(f"classifier: {count_parameters(model) / 1e6:.2f} M parameters on {device}")
    last_val: dict = {}

    def save(final: bool = False) -> None:
        spec.training = {
            "steps": step,
            "batch": config.batch,
            "wall_time_s": round(elapsed_before + time.time() - started, 1),
            "data": str(config.slices or config.data),
            "cases": {"train": len(train_cases), "validation": len(val_cases)},
            "slices": {"train": train_set.counts(), "validation": val_set.counts()},
            "lr": config.lr,
            "max_noise": config.max_noise,
            "device": str(device),
            "torch": torch.__version__,
            **({"validation": last_val} if last_val else {}),
        }
        model.eval()
        save_classifier(model, out / CHECKPOINT_DIR, spec)
        model.train()
        state = {
            "model": model.state_dict(),
            "optimiser": optimiser.state_dict(),
            "step": step,
            "elapsed_s": elapsed_before + time.time() - started,
            "sampler": json.dumps(sampler.state()),
            "generator": generator.get_state(),
            "config": json.dumps(asdict(config)),
        }
        save_state_atomic(state, state_path)
        if final:
            log(f"classifier checkpoint: {out / CHECKPOINT_DIR}")

    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    progress = progress_bar(config.steps, initial=step, unit="step") if show_progress else None
    # Without a live bar (a log file, a pipe, --no-progress) each log interval is one line.
    log_lines = not is_live(progress)
    model.train()
    window_loss, window_acc, window_n, window_t = 0.0, 0.0, 0, time.time()
    with open(out / LOG_FILE, "a") as log_file:
        try:
            while step < config.steps:
                if (config.time_limit_min is not None
                        and (time.time() - started) / 60 > config.time_limit_min):
                    log(f"time limit of {config.time_limit_min} min reached at step {step}")
                    break
                index = sampler.sample(config.batch)
                x0 = torch.from_numpy(train_set.read(index).astype(np.float32))
                if torch.rand((), generator=generator) < 0.5:
                    x0 = x0.flip(-2)  # left-right flip, as for the diffusion model
                labels = torch.from_numpy(train_set.labels[index].copy())
                x0, labels = x0.to(device), labels.to(device)
                lr = config.lr * min(1.0, (step + 1) / max(1, config.warmup))
                for group in optimiser.param_groups:
                    group["lr"] = lr
                with _autocast(device, config.amp):
                    loss, logits, _ = classifier_loss(model, x0, labels, alphas_cumprod,
                                                      timesteps, generator)
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimiser.step()
                step += 1
                window_loss += loss.item()
                window_acc += float((logits.argmax(1) == labels).float().mean())
                window_n += 1
                if progress is not None:
                    progress.update(1)
                if step % config.log_every == 0 or step == config.steps:
                    now = time.time()
                    record = {
                        "step": step,
                        "loss": window_loss / window_n,
                        "acc": window_acc / window_n,
                        "lr": lr,
                        "slices_per_s": window_n * config.batch / (now - window_t),
                        "elapsed_s": round(elapsed_before + now - started, 1),
                    }
                    if step % config.val_every == 0 or step == config.steps:
                        last_val = evaluate_classifier(model, val_set, alphas_cumprod,
                                                       timesteps, device, config.amp)
                        record.update(last_val)
                    if progress is not None:
                        progress.set_postfix(loss=f"{record['loss']:.3f}",
                                             acc=f"{record['acc']:.2f}")
                    if log_lines:
                        log(interval_line(record, config.steps))
                    log_file.write(json.dumps(record) + "\n")
                    log_file.flush()
                    window_loss, window_acc, window_n, window_t = 0.0, 0.0, 0, time.time()
                if step % config.checkpoint_every == 0:
                    save()
        finally:
            if progress is not None:
                progress.close()
            save(final=True)
    return out / CHECKPOINT_DIR


def is_finite_log(records: list[dict]) -> bool:
    return all(math.isfinite(r["loss"]) for r in records)
