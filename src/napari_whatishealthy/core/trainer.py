"""The one training loop of every network (the diffusion model, the noisy-image classifier).

:func:`run_training` does what any run needs: torchrun / DistributedDataParallel (gloo on CPU,
nccl on GPU; only rank 0 writes), the slice data and its case split, balanced healthy/unhealthy
batches with left-right flips, AdamW with a linear warm-up (``torch.optim.lr_scheduler``),
autocast, gradient clipping, the log (``train_log.jsonl``), validation, checkpoints, exact
resume from ``train_state.pt`` (``torch.load(weights_only=True)``), a time limit, and SIGTERM /
Ctrl-C stopping after a resumable save. What differs between networks is an :class:`Objective`:
the network, its loss, what happens after a step (the diffusion model's EMA), validation and
the checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .data import SliceSet, discover_cases, load_slice_set
from .errors import WhatIsHealthyError
from .model import HEALTHY, UNHEALTHY, count_parameters
from .progress import interval_line, is_live, progress_bar
from .slice_store import SliceStore, resident_on_device

_STARTED = time.time()  # a rebuilt store must be newer than this process (other ranks wait)
STATE_FILE = "train_state.pt"
LOG_FILE = "train_log.jsonl"
CACHE_FILE = "slices.npz"  # the in-RAM cache of earlier versions (still read on resume)
STORE_DIR = "slice_store"
CHECKPOINT_DIR = "checkpoint"

__all__ = ["BalancedSampler", "DistInfo", "Objective", "RunConfig", "read_log", "run_training"]


@dataclass
class RunConfig:
    """The options of every training run (each network's config adds its own and its
    defaults)."""

    data: str
    out: str
    size: int = 64
    modalities: tuple[str, ...] = ("flair", "t1", "t1ce", "t2")
    steps: int = 5000
    batch: int = 32
    lr: float = 2e-4
    weight_decay: float = 0.01
    warmup: int = 200
    val_fraction: float = 0.1  # the same seed and fraction hold out the same cases for every net
    seed: int = 0
    amp: str = "auto"  # auto | on | off
    device: str = "auto"
    log_every: int = 25
    val_every: int = 250
    checkpoint_every: int = 250
    time_limit_min: float | None = None
    resume: bool = False
    timestep_stride: int = 10
    name: str = "whatishealthy"
    store: str | None = None  # slice store folder (None: DIR/slice_store)
    workers: int | None = None  # processes building the store (None: the cores, at most 8)
    rebuild_store: bool = False
    in_memory: bool = False  # load the store into RAM on every rank


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str) -> tuple[DistInfo, torch.device]:
    """This process's rank under torchrun (one process otherwise) and its device."""
    from .device import resolve_device

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(), resolve_device(device_name)
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name)
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return DistInfo(rank, world, local_rank), device


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    if amp == "auto" and device.type == "cpu":
        # As for inference (counterfactual.autocast_dtype): bf16 only where the CPU has it
        # natively (AMX or AVX512_BF16); emulated bf16 is several times slower than float32.
        from .hardware import cpu_info

        enabled = cpu_info().native_bf16
    else:
        enabled = amp == "on" or (amp == "auto" and device.type == "cuda")
    if not enabled or device.type not in ("cpu", "cuda"):
        return contextlib.nullcontext()
    # bf16 needs no loss scaling; on a CPU with AMX it made training steps about 3x faster.
    return torch.autocast(device.type, dtype=torch.bfloat16)


class BalancedSampler:
    """Batches with equal numbers of healthy and unhealthy slices (with replacement)."""

    def __init__(self, labels: np.ndarray, seed: int) -> None:
        self.healthy = np.flatnonzero(labels == HEALTHY)
        self.unhealthy = np.flatnonzero(labels == UNHEALTHY)
        if len(self.healthy) == 0 or len(self.unhealthy) == 0:
            raise WhatIsHealthyError(
                f"training needs both healthy and unhealthy slices; found {len(self.healthy)} "
                f"healthy and {len(self.unhealthy)} unhealthy. Add cases with lesions and controls."
            )
        self.rng = np.random.default_rng(seed)

    def sample(self, batch: int) -> np.ndarray:
        half = batch // 2
        return np.concatenate(
            [self.rng.choice(self.healthy, half), self.rng.choice(self.unhealthy, batch - half)]
        )

    def state(self) -> dict:
        return self.rng.bit_generator.state

    def set_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state


def noised(x0: torch.Tensor, alphas_cumprod: torch.Tensor, timesteps: torch.Tensor,
           generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_t, t, noise)``: ``x0`` noised to timesteps drawn from ``timesteps``,
    ``x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) noise``. The draws come from ``generator`` on its
    own device (a CUDA generator keeps them on the GPU)."""
    where = generator.device if generator is not None else torch.device("cpu")
    pick = torch.randint(0, len(timesteps), (x0.shape[0],), generator=generator, device=where)
    t = timesteps.to(where)[pick].to(x0.device)
    noise = torch.randn(x0.shape, generator=generator, device=where).to(x0.device)
    # Index on the timesteps' device: a CPU table indexed by CUDA timesteps is an error.
    ab = alphas_cumprod.to(x0.device, torch.float32)[t].view(-1, 1, 1, 1)
    return ab.sqrt() * x0 + (1 - ab).sqrt() * noise, t, noise


def split_cases(
    n_cases: int, val_fraction: float, seed: int, log: Callable[[str], None] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(training, validation) case indices: the same seed and fraction, the same held-out
    cases for every network. ``log`` hears when no case is left for validation."""
    order = np.random.default_rng(seed).permutation(n_cases)
    n_val = int(round(n_cases * val_fraction)) if n_cases > 1 else 0
    n_val = min(max(n_val, 1 if n_cases >= 4 and val_fraction > 0 else 0), n_cases - 1)
    if n_val == 0 and log is not None:
        log(f"warning: {n_cases} case(s) leave none for validation: no validation loss will be "
            "measured; give at least 4 cases to hold one out")
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def load_data(config: Any, dist_info: DistInfo, log: Callable[[str], None],
              show_progress: bool = True) -> SliceSet | SliceStore:
    """The training slices: the slice store (built by rank 0 once; the other ranks wait for
    it), or the in-RAM cache of a run made by an earlier version."""
    from .slice_store import Preprocessing, open_or_build, wait_for_store

    out = Path(config.out)
    legacy = out / CACHE_FILE
    if legacy.exists():
        return load_slice_set(legacy)
    cases = discover_cases(config.data)
    prep = Preprocessing(int(config.size), tuple(config.modalities))
    folder = Path(config.store) if getattr(config, "store", None) else out / STORE_DIR
    rebuild = bool(getattr(config, "rebuild_store", False))
    if dist_info.is_main:
        store = open_or_build(folder, cases, prep, workers=getattr(config, "workers", None),
                              rebuild=rebuild, log=log, show_progress=show_progress)
    else:
        store = wait_for_store(folder, cases, prep, not_before=_STARTED if rebuild else None)
    if getattr(config, "in_memory", False):
        return SliceSet(store.load(), store.labels, store.case_of_slice, store.cases)
    return store


def store_info(slices: SliceSet | SliceStore) -> dict[str, Any]:
    """What the model card says of the training slices: where, how many, how large."""
    if isinstance(slices, SliceStore):
        return {"path": str(slices.path.resolve()), "slices": len(slices),
                "mib": round(slices.nbytes / 2**20, 1)}
    return {"path": None, "slices": len(slices), "mib": round(slices.slices.nbytes / 2**20, 1)}


def save_state_atomic(state: dict, path: Path) -> None:
    """Write a resumable training state through a temporary file: an interrupted save keeps the
    previous state intact (read back with ``torch.load(weights_only=True)``)."""
    from .output import write_file

    write_file(path, lambda tmp: torch.save(state, tmp), overwrite=True)


@contextlib.contextmanager
def resume_errors(path: Path) -> Iterator[None]:
    """A training state that cannot be read back (a pickle with code, a truncated or foreign
    file, another network's weights) becomes one line, not a traceback."""
    try:
        yield
    except (pickle.UnpicklingError, RuntimeError, EOFError, KeyError, ValueError, TypeError,
            AttributeError, IndexError, OSError, zipfile.BadZipFile) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise WhatIsHealthyError(
            f"{path}: not a training state this run can resume ({reason}); delete it to start "
            "again, or resume with the options of the run that wrote it"
        ) from None


def read_log(out: str | Path) -> list[dict]:
    path = Path(out) / LOG_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class Objective:
    """What one kind of network adds to the loop; subclasses fill in the methods.

    ``model`` is the network being optimised; ``what`` names it in the log (and
    ``checkpoint_label`` its checkpoint); ``seed_offset``
    separates its noise stream from other networks' at the same seed; ``noise_on_device``: draw
    the noise on a CUDA device (the loss takes a generator on that device).
    """

    what = "model"
    checkpoint_label = "checkpoint"
    seed_offset = 0
    sampler_rank_stride = 7919
    noise_on_device = True
    model: torch.nn.Module

    def build(self, log: Callable[[str], None]) -> None:
        """Make ``self.model`` (and its spec), on the CPU."""
        raise NotImplementedError

    def load_slices(self, dist_info: DistInfo, log: Callable[[str], None],
                    show_progress: bool) -> SliceSet | SliceStore:
        raise NotImplementedError

    def on_device(self, device: torch.device) -> None:
        """Called once the model is on its device (before a resume loads states)."""

    def labels(self, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The batch's labels as the loss takes them."""
        return labels

    def loss(self, net: torch.nn.Module, x0: torch.Tensor, labels: torch.Tensor,
             generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss of one batch and any running metrics to log (averaged over a window)."""
        raise NotImplementedError

    def after_step(self, step: int) -> None:
        """After the optimiser step ``step`` (0-based)."""

    def validate(self, run: _Run) -> dict[str, Any]:
        """Validation values for the log."""
        raise NotImplementedError

    def save_checkpoint(self, folder: Path, run: _Run) -> None:
        """Write the checkpoint ``localize`` (or ``--classifier``) loads, with its spec."""
        raise NotImplementedError

    def extra_state(self) -> dict[str, Any]:
        """What ``train_state.pt`` holds beyond the model, optimiser and counters."""
        return {}

    def load_extra_state(self, state: dict[str, Any], step: int) -> None:
        """Read back :meth:`extra_state` on resume."""


def run_training(config: Any, objective: Objective, log: Callable[[str], None] = print,
                 show_progress: bool = True) -> Path:
    """Train (or resume) and return the checkpoint folder; SIGTERM and Ctrl-C stop the run
    after saving a resumable state."""
    from .runtime import sigterm_as_interrupt, tune_allocator

    with sigterm_as_interrupt():
        tune_allocator()
        return _Run(config, objective, log, show_progress).loop()


class _Run:
    """One run of the loop: its state, the step, and writing what it made."""

    def __init__(self, config: Any, objective: Objective, log: Callable[[str], None],
                 show_progress: bool) -> None:
        self.config, self.objective, self.show_progress = config, objective, show_progress
        self.dist, self.device = init_distributed(config.device)
        self.log = log if self.dist.is_main else (lambda *_: None)
        self.out = Path(config.out)
        self.state_path = self.out / STATE_FILE
        if self.state_path.exists() and not config.resume:
            raise WhatIsHealthyError(
                f"{self.out}: holds a training run already; pass --resume to continue it or "
                "choose another --out"
            )
        torch.manual_seed(config.seed + self.dist.rank)
        objective.build(self.log)
        self.slices = objective.load_slices(self.dist, self.log, show_progress)
        self.train_cases, self.val_cases = split_cases(len(self.slices.cases),
                                                       config.val_fraction, config.seed, self.log)
        self.train_set = self.slices.subset(self.train_cases)
        self.val_set = self.slices.subset(self.val_cases)
        self.log(f"slices: train {self.train_set.counts()} from {len(self.train_cases)} cases, "
                 f"validation {self.val_set.counts()} from {len(self.val_cases)} cases")
        self._setup_optimisation()
        self.log(f"{objective.what}: {count_parameters(objective.model) / 1e6:.2f} M parameters "
                 f"on {self.device}, world size {self.dist.world}")

    def _setup_optimisation(self) -> None:
        config, objective, device = self.config, self.objective, self.device
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed input shapes: pick the fastest kernels once
        model = objective.model = objective.model.to(device)
        objective.on_device(device)
        self.optimiser = torch.optim.AdamW(model.parameters(), lr=config.lr,
                                           weight_decay=config.weight_decay)
        self.sampler = BalancedSampler(
            self.train_set.labels, config.seed + objective.sampler_rank_stride * self.dist.rank)
        # On a GPU the noise is drawn there (drawing it on the CPU starved the GPU at batch 256).
        on_device = objective.noise_on_device and device.type == "cuda"
        self.generator = torch.Generator(device=device if on_device else "cpu")
        self.generator.manual_seed(config.seed * 1000 + objective.seed_offset + self.dist.rank)
        self.step, self.elapsed_before = 0, 0.0
        if config.resume and self.state_path.exists():
            self._resume()
        for group in self.optimiser.param_groups:  # the warm-up is a function of the step
            group["initial_lr"] = config.lr
        warmup = max(1, config.warmup)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimiser, lambda s: min(1.0, (s + 1) / warmup), last_epoch=self.step - 1)
        self.net: torch.nn.Module = model
        if self.dist.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.net = DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None)

    def _resume(self) -> None:
        with resume_errors(self.state_path):
            state = torch.load(self.state_path, map_location="cpu", weights_only=True)
            self.objective.model.load_state_dict(state["model"])
            self.optimiser.load_state_dict(state["optimiser"])
            self.step = int(state["step"])
            self.elapsed_before = float(state["elapsed_s"])
            self.sampler.set_state(json.loads(state["sampler"]))
            self.generator.set_state(state["generator"])
            self.objective.load_extra_state(state, self.step)
        self.log(f"resumed at step {self.step}")

    def elapsed(self) -> float:
        return self.elapsed_before + time.time() - self.started

    def save(self, final: bool = False) -> None:
        if not self.dist.is_main:
            return
        self.objective.save_checkpoint(self.out / CHECKPOINT_DIR, self)
        state = {
            "model": self.objective.model.state_dict(),
            "optimiser": self.optimiser.state_dict(),
            "step": self.step,
            "elapsed_s": self.elapsed(),
            "sampler": json.dumps(self.sampler.state()),
            "generator": self.generator.get_state(),
            "config": json.dumps(asdict(self.config)),
            **self.objective.extra_state(),
        }
        save_state_atomic(state, self.state_path)
        if final:
            self.log(f"{self.objective.checkpoint_label}: {self.out / CHECKPOINT_DIR}")

    def _batch(self, on_device: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        index = self.sampler.sample(self.config.batch)
        gen = self.generator
        if on_device is not None:
            x0 = on_device[torch.from_numpy(index).to(self.device)].float()
        else:
            x0 = torch.from_numpy(self.train_set.read(index).astype(np.float32))
        if torch.rand((), generator=gen, device=gen.device) < 0.5:
            x0 = x0.flip(-2)  # left-right flip: brains are roughly symmetric
        labels = torch.from_numpy(self.train_set.labels[index].copy()).to(gen.device)
        labels = self.objective.labels(labels, gen)
        return x0.to(self.device), labels.to(self.device)

    def _train_step(self, x0: torch.Tensor, labels: torch.Tensor) -> tuple[float, dict]:
        with autocast(self.device, self.config.amp):
            loss, metrics = self.objective.loss(self.net, x0, labels, self.generator)
        self.optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.objective.model.parameters(), 1.0)
        self.optimiser.step()
        self.objective.after_step(self.step)
        self.schedule.step()
        self.step += 1
        return loss.item(), metrics

    def loop(self) -> Path:
        config = self.config
        self.out.mkdir(parents=True, exist_ok=True)
        self.started = time.time()
        progress = None
        if self.show_progress and self.dist.is_main:
            progress = progress_bar(config.steps, initial=self.step, unit="step")
        # Without a live bar (a log file, a pipe, --no-progress) each log interval is one line.
        log_lines = self.dist.is_main and not is_live(progress)
        log_file = open(self.out / LOG_FILE, "a") if self.dist.is_main else None  # noqa: SIM115
        # On a GPU the training slices live there (float16), so that batches cost no host
        # copies, when they fit a quarter of its free memory (copied in chunks: the host's
        # memory stays flat); a larger cohort streams its batches from the slice store.
        on_device = resident_on_device(self.train_set, self.device)
        if self.device.type == "cuda":
            self.log("training slices " + ("on the GPU" if on_device is not None else
                                           "read from the slice store per batch (too large "
                                           "for a quarter of the GPU's free memory)"))
        self.objective.model.train()
        window = _Window()
        try:
            while self.step < config.steps:
                if (config.time_limit_min is not None
                        and (time.time() - self.started) / 60 > config.time_limit_min):
                    self.log(f"time limit of {config.time_limit_min} min reached at step "
                             f"{self.step}")
                    break
                lr = self.optimiser.param_groups[0]["lr"]
                window.add(*self._train_step(*self._batch(on_device)))
                if progress is not None:
                    progress.update(1)
                if self.step % config.log_every == 0 or self.step == config.steps:
                    record = self._record(window, lr)
                    if progress is not None:
                        progress.set_postfix({k: f"{v:.4g}" for k, v in record.items()
                                              if k in ("loss", "acc", "slices_per_s")})
                    if log_lines:  # no live bar (a batch job, a log file): one line per interval
                        self.log(interval_line(record, config.steps))
                    if log_file is not None:
                        log_file.write(json.dumps(record) + "\n")
                        log_file.flush()
                    window = _Window()
                if self.step % config.checkpoint_every == 0:
                    self.save()
        finally:
            if progress is not None:
                progress.close()
            self.save(final=True)
            if log_file is not None:
                log_file.close()
            if self.dist.world > 1:
                import torch.distributed as dist

                dist.barrier()
                dist.destroy_process_group()
        return self.out / CHECKPOINT_DIR

    def _record(self, window: _Window, lr: float) -> dict[str, Any]:
        now = time.time()
        record = {
            "step": self.step,
            "loss": window.loss / window.n,
            **{k: v / window.n for k, v in window.metrics.items()},
            "lr": lr,
            "slices_per_s": window.n * self.config.batch * self.dist.world / (now - window.t),
            "elapsed_s": round(self.elapsed_before + now - self.started, 1),
        }
        if self.step % self.config.val_every == 0 or self.step == self.config.steps:
            record.update(self.objective.validate(self))
        return record


class _Window:
    """Running sums over one log interval."""

    def __init__(self) -> None:
        self.loss, self.n, self.t = 0.0, 0, time.time()
        self.metrics: dict[str, float] = {}

    def add(self, loss: float, metrics: dict[str, float]) -> None:
        self.loss += loss
        self.n += 1
        for key, value in metrics.items():
            self.metrics[key] = self.metrics.get(key, 0.0) + value
