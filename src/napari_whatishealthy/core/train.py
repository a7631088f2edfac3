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

import contextlib
import copy
import json
import math
import os
import pickle
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .data import SliceSet, discover_cases, load_slice_set
from .errors import WhatIsHealthyError
from .model import (
    HEALTHY,
    NULL,
    UNHEALTHY,
    ConditionalUNet,
    ModelSpec,
    NetworkSpec,
    build_model,
    count_parameters,
    save_checkpoint,
)
from .progress import interval_line, is_live, progress_bar
from .runtime import sigterm_as_interrupt as _stop_on_sigterm
from .slice_store import SliceStore

_STARTED = time.time()  # a rebuilt store must be newer than this process (other ranks wait)
STATE_FILE = "train_state.pt"
LOG_FILE = "train_log.jsonl"
CACHE_FILE = "slices.npz"  # the in-RAM cache of earlier versions (still read on resume)
STORE_DIR = "slice_store"
CHECKPOINT_DIR = "checkpoint"


@dataclass
class TrainConfig:
    data: str
    out: str
    size: int = 64
    modalities: tuple[str, ...] = ("flair", "t1", "t1ce", "t2")
    steps: int = 5000
    batch: int = 32
    lr: float = 2e-4
    weight_decay: float = 0.01
    warmup: int = 200
    ema_decay: float = 0.999
    label_dropout: float = 0.15
    val_fraction: float = 0.1
    seed: int = 0
    amp: str = "auto"  # auto | on | off
    device: str = "auto"
    log_every: int = 25
    val_every: int = 250
    checkpoint_every: int = 250
    time_limit_min: float | None = None
    resume: bool = False
    # A bundled model's name or a checkpoint folder whose weights start this run (fine-tuning).
    init_from: str | None = None
    network: NetworkSpec = field(default_factory=NetworkSpec)
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


def _init_distributed(device_name: str) -> tuple[DistInfo, torch.device]:
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


def _autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    enabled = amp == "on" or (amp == "auto" and device.type in ("cpu", "cuda"))
    if not enabled or device.type not in ("cpu", "cuda"):
        return contextlib.nullcontext()
    # bf16 needs no loss scaling; on this CPU it made training steps about 3x faster.
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


def diffusion_loss(
    model: torch.nn.Module,
    x0: torch.Tensor,
    labels: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    timesteps: torch.Tensor,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Epsilon-prediction MSE at timesteps drawn from the trained set."""
    where = generator.device if generator is not None else torch.device("cpu")
    pick = torch.randint(0, len(timesteps), (x0.shape[0],), generator=generator, device=where)
    t = timesteps.to(where)[pick].to(x0.device)
    noise = torch.randn(x0.shape, generator=generator, device=where).to(x0.device)
    # Index on the timesteps' device: a CPU table indexed by CUDA timesteps is an error.
    ab = alphas_cumprod.to(x0.device, torch.float32)[t].view(-1, 1, 1, 1)
    xt = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
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


def _split_cases(
    n_cases: int, val_fraction: float, seed: int, log: Callable[[str], None] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed).permutation(n_cases)
    n_val = int(round(n_cases * val_fraction)) if n_cases > 1 else 0
    n_val = min(max(n_val, 1 if n_cases >= 4 and val_fraction > 0 else 0), n_cases - 1)
    if n_val == 0 and log is not None:
        log(f"warning: {n_cases} case(s) leave none for validation: no validation loss will be "
            "measured; give at least 4 cases to hold one out")
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def _load_data(config: Any, dist_info: Any, log: Callable[[str], None],
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


def _store_info(slices: SliceSet | SliceStore) -> dict[str, Any]:
    """What the model card says of the training slices: where, how many, how large."""
    if isinstance(slices, SliceStore):
        return {"path": str(slices.path.resolve()), "slices": len(slices),
                "mib": round(slices.nbytes / 2**20, 1)}
    return {"path": None, "slices": len(slices), "mib": round(slices.slices.nbytes / 2**20, 1)}


def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in model.parameters()], 1.0 - decay)
        for e, b in zip(ema.buffers(), model.buffers(), strict=True):
            e.copy_(b)


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
        with _autocast(device, amp):
            loss = diffusion_loss(model, x0, labels, alphas_cumprod, timesteps, generator)
        total += float(loss) * len(part)
        count += len(part)
    model.train()
    return total / count


def train(config: TrainConfig, log: Callable[[str], None] = print, show_progress: bool = True) -> Path:
    """Train (or resume) and return the checkpoint folder; see the module docstring for files.

    SIGTERM and Ctrl-C stop the run after saving a resumable state.
    """
    with _stop_on_sigterm():
        return _train(config, log, show_progress)


def _train(config: TrainConfig, log: Callable[[str], None], show_progress: bool) -> Path:
    from .runtime import tune_allocator

    tune_allocator()
    dist_info, device = _init_distributed(config.device)
    if not dist_info.is_main:
        log = lambda *_: None  # noqa: E731
    out = Path(config.out)
    state_path = out / STATE_FILE
    if state_path.exists() and not config.resume:
        raise WhatIsHealthyError(
            f"{out}: holds a training run already; pass --resume to continue it or choose another --out"
        )
    torch.manual_seed(config.seed + dist_info.rank)
    spec = ModelSpec(
        image_size=config.size,
        modalities=tuple(config.modalities),
        network=copy.deepcopy(config.network),
        name=config.name,
    )
    spec.schedule.timestep_stride = config.timestep_stride
    model = build_model(spec)
    init_record: dict = {}
    if config.init_from and not (config.resume and state_path.exists()):
        from .model import checkpoint_hash, load_state_strict

        weights, base, folder = load_initial_weights(config.init_from, spec)
        load_state_strict(model, weights, f"--init-from {config.init_from}: the weights do not match its spec")
        # Until the new weights are tuned, the starting model's recommended settings are the best guess.
        spec.inference = copy.deepcopy(base.inference)
        before = int(base.training.get("total_steps", base.training.get("steps", 0)))
        init_record = {"model": str(config.init_from), "sha256": checkpoint_hash(folder), "steps": before}
        log(f"starting from {config.init_from} ({folder}, {before} steps)")
    slice_set = _load_data(config, dist_info, log, show_progress)
    train_cases, val_cases = _split_cases(len(slice_set.cases), config.val_fraction, config.seed,
                                          log)
    train_set, val_set = slice_set.subset(train_cases), slice_set.subset(val_cases)
    log(f"slices: train {train_set.counts()} from {len(train_cases)} cases, "
        f"validation {val_set.counts()} from {len(val_cases)} cases")

    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: pick the fastest kernels once
    model = model.to(device)
    ema = copy.deepcopy(model).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    optimiser = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    sampler = BalancedSampler(train_set.labels, config.seed + 7919 * dist_info.rank)
    # On a GPU the noise is drawn there (drawing it on the CPU starved the GPU at batch 256).
    generator = torch.Generator(device=device if device.type == "cuda" else "cpu")
    generator.manual_seed(config.seed * 1000 + dist_info.rank)
    step = 0
    elapsed_before = 0.0
    if config.resume and state_path.exists():
        with resume_errors(state_path):
            state = torch.load(state_path, map_location="cpu", weights_only=True)
            model.load_state_dict(state["model"])
            ema.load_state_dict(state["ema"])
            optimiser.load_state_dict(state["optimiser"])
            step = int(state["step"])
            elapsed_before = float(state["elapsed_s"])
            sampler.set_state(json.loads(state["sampler"]))
            init_record = json.loads(state.get("init_from", "{}"))
            generator.set_state(state["generator"])
            log(f"resumed at step {step}")
    alphas_cumprod = spec.schedule.alphas_cumprod().to(torch.float32)
    timesteps = spec.schedule.trained_timesteps()
    log(f"model: {count_parameters(model) / 1e6:.2f} M parameters on {device}, world size {dist_info.world}")

    net: torch.nn.Module = model
    if dist_info.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def save(final: bool = False) -> None:
        if not dist_info.is_main:
            return
        spec.training = {
            "steps": step,
            "batch": config.batch * dist_info.world,
            "wall_time_s": round(elapsed_before + time.time() - started, 1),
            "data": str(config.data),
            "image_size": config.size,
            "modalities": list(config.modalities),
            "slice_store": _store_info(slice_set),
            "cases": {"train": len(train_cases), "validation": len(val_cases)},
            "slices": {"train": train_set.counts(), "validation": val_set.counts()},
            "label_dropout": config.label_dropout,
            "lr": config.lr,
            "ema_decay": config.ema_decay,
            "device": str(device),
            "world_size": dist_info.world,
            "torch": torch.__version__,
        }
        if init_record:
            spec.training["init_from"] = init_record
            spec.training["total_steps"] = init_record["steps"] + step
        save_checkpoint(ema, out / CHECKPOINT_DIR, spec)
        state = {
            "model": model.state_dict(),
            "ema": ema.state_dict(),
            "optimiser": optimiser.state_dict(),
            "step": step,
            "elapsed_s": elapsed_before + time.time() - started,
            "sampler": json.dumps(sampler.state()),
            "generator": generator.get_state(),
            "config": json.dumps(asdict(config)),
            "init_from": json.dumps(init_record),
        }
        save_state_atomic(state, state_path)
        if final:
            log(f"checkpoint: {out / CHECKPOINT_DIR}")

    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    progress = None
    if show_progress and dist_info.is_main:
        progress = progress_bar(config.steps, initial=step, unit="step")
    # Without a live bar (a log file, a pipe, --no-progress) each log interval is one line.
    log_lines = dist_info.is_main and not is_live(progress)
    log_file = open(out / LOG_FILE, "a") if dist_info.is_main else None  # noqa: SIM115
    # On a GPU the training slices live there (float16), so that batches cost no host copies.
    slices_on_device = (
        torch.from_numpy(train_set.read(np.arange(len(train_set)))).to(device)
        if device.type == "cuda" else None
    )
    model.train()
    window_loss, window_n, window_t = 0.0, 0, time.time()
    try:
        while step < config.steps:
            if config.time_limit_min is not None and (time.time() - started) / 60 > config.time_limit_min:
                log(f"time limit of {config.time_limit_min} min reached at step {step}")
                break
            index = sampler.sample(config.batch)
            if slices_on_device is not None:
                x0 = slices_on_device[torch.from_numpy(index).to(device)].float()
            else:
                x0 = torch.from_numpy(train_set.read(index).astype(np.float32))
            if torch.rand((), generator=generator, device=generator.device) < 0.5:
                x0 = x0.flip(-2)  # left-right flip: brains are roughly symmetric
            labels = torch.from_numpy(train_set.labels[index].copy()).to(generator.device)
            drop = torch.rand(labels.shape, generator=generator, device=generator.device) < config.label_dropout
            labels[drop] = NULL
            x0, labels = x0.to(device), labels.to(device)
            lr = config.lr * min(1.0, (step + 1) / max(1, config.warmup))
            for group in optimiser.param_groups:
                group["lr"] = lr
            with _autocast(device, config.amp):
                loss = diffusion_loss(net, x0, labels, alphas_cumprod, timesteps, generator)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimiser.step()
            # EMA warms up so that a short run's EMA is not dominated by the random init.
            _ema_update(ema, model, min(config.ema_decay, (1 + step) / (10 + step)))
            step += 1
            window_loss += loss.item()
            window_n += 1
            if progress is not None:
                progress.update(1)
            if step % config.log_every == 0 or step == config.steps:
                now = time.time()
                record = {
                    "step": step,
                    "loss": window_loss / window_n,
                    "lr": lr,
                    "slices_per_s": window_n * config.batch * dist_info.world / (now - window_t),
                    "elapsed_s": round(elapsed_before + now - started, 1),
                }
                if step % config.val_every == 0 or step == config.steps:
                    record["val_loss"] = validation_loss(ema, val_set, alphas_cumprod, timesteps, device, config.amp)
                if progress is not None:
                    progress.set_postfix(loss=f"{record['loss']:.4f}", sps=f"{record['slices_per_s']:.0f}")
                if log_lines:  # no live bar (a batch job, a log file): one line per interval
                    log(interval_line(record, config.steps))
                if log_file is not None:
                    log_file.write(json.dumps(record) + "\n")
                    log_file.flush()
                window_loss, window_n, window_t = 0.0, 0, time.time()
            if step % config.checkpoint_every == 0:
                save()
    finally:
        if progress is not None:
            progress.close()
        save(final=True)
        if log_file is not None:
            log_file.close()
        if dist_info.world > 1:
            import torch.distributed as dist

            dist.barrier()
            dist.destroy_process_group()
    return out / CHECKPOINT_DIR


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


def save_state_atomic(state: dict, path: Path) -> None:
    """Write a resumable training state through a temporary file: an interrupted save keeps the
    previous state intact (read back with ``torch.load(weights_only=True)``)."""
    from .output import write_file

    write_file(path, lambda tmp: torch.save(state, tmp), overwrite=True)


def read_log(out: str | Path) -> list[dict]:
    path = Path(out) / LOG_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def is_finite_loss(records: list[dict]) -> bool:
    return all(math.isfinite(r["loss"]) for r in records)


__all__ = ["TrainConfig", "train", "read_log", "ConditionalUNet", "diffusion_loss", "BalancedSampler"]
