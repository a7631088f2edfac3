"""The `whatishealthy` training subcommands: train, prepare, train-classifier (parsing and
printing; the loop is core.trainer)."""

from __future__ import annotations

import argparse

from .core.errors import WhatIsHealthyError


def _add_training_data_options(p: argparse.ArgumentParser, of_model: str) -> None:
    """DATA, --out, --size, --modalities: shared by train and train-classifier."""
    p.add_argument("--out", required=True,
                   help="output folder: checkpoint/, train_state.pt, train_log.jsonl")
    p.add_argument("--size", type=int, default=64,
                   help=f"image size in pixels{of_model} (default 64)")
    p.add_argument("--modalities", default="flair,t1,t1ce,t2",
                   help=f"comma-separated channels in order{of_model}, e.g. flair for a "
                        "FLAIR-only model")
    p.add_argument("--store", default=None,
                   help="slice store folder: the prepared slices, built once and reused while "
                        "DATA and the preprocessing are unchanged (default OUT/slice_store)")
    p.add_argument("--workers", type=int, default=None,
                   help="processes that build the slice store (default: the cores, at most 8)")
    p.add_argument("--rebuild-store", action="store_true",
                   help="rebuild the slice store even if it matches (e.g. one of other "
                        "preprocessing at --store)")
    p.add_argument("--in-memory", action="store_true",
                   help="load the slice store into RAM on every process (faster steps for "
                        "small cohorts; memory grows with the cohort)")


def _add_network_options(p: argparse.ArgumentParser, network, what: str, example: str) -> None:
    p.add_argument("--channels", default=",".join(map(str, network.channels)),
                   help=f"{what} channels per level")
    p.add_argument("--attention",
                   default=",".join("1" if a else "0" for a in network.attention_levels),
                   help=f"attention per level, e.g. {example}")
    p.add_argument("--res-blocks", type=int, default=network.num_res_blocks)


def _add_run_options(p: argparse.ArgumentParser, name: str, seed_help: str | None = None) -> None:
    """Device, seed, time limit, logging, checkpoints, resume: shared by both trainers."""
    p.add_argument("--amp", choices=["auto", "on", "off"], default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0, help=seed_help)
    p.add_argument("--time-limit", type=float, default=None,
                   help="stop (and save) after this many minutes")
    p.add_argument("--checkpoint-every", type=int, default=250)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--val-every", type=int, default=250)
    p.add_argument("--name", default=name)
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")


def _parse_network(args: argparse.Namespace, example: str) -> tuple[tuple[int, ...],
                                                                     tuple[bool, ...], int]:
    """(channels, attention, norm groups) from --channels / --attention, checked."""
    try:
        channels = tuple(int(c) for c in args.channels.split(","))
    except ValueError:
        raise WhatIsHealthyError(f"--channels must be integers like {example}, got "
                                 f"{args.channels!r}") from None
    attention = tuple(a.strip() in ("1", "true", "True") for a in args.attention.split(","))
    if len(channels) != len(attention):
        raise WhatIsHealthyError("--channels and --attention need one entry per level")
    groups = min(16, min(channels))
    if any(c % groups for c in channels):
        raise WhatIsHealthyError(f"--channels must all be multiples of {groups}")
    return channels, attention, groups


def _check_at_least_one(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        if getattr(args, name) < 1:
            raise WhatIsHealthyError(f"--{name.replace('_', '-')} must be at least 1")


def _run_options(args: argparse.Namespace) -> dict:
    """The config fields every trainer takes from the shared options."""
    import math

    from .core.output import check_folder, check_outside
    if not (math.isfinite(args.lr) and 0.0 <= args.lr <= 1.0):
        raise WhatIsHealthyError(f"--lr must be a number in [0, 1], got {args.lr}")
    for name in ("label_dropout", "ema_decay", "weight_decay"):
        value = getattr(args, name, None)
        if value is not None and not (math.isfinite(value) and 0.0 <= value <= 1.0):
            raise WhatIsHealthyError(f"--{name.replace('_', '-')} must be in [0, 1], got {value}")
    if not 0 <= args.seed < 2**32:
        raise WhatIsHealthyError(f"--seed must be an integer in [0, 2**32 - 1], got {args.seed}")
    check_outside(args.out, args.data)
    check_folder(args.out)
    return dict(
        data=args.data, out=args.out, size=args.size,
        modalities=tuple(m.strip() for m in args.modalities.split(",") if m.strip()),
        steps=args.steps, batch=args.batch, lr=args.lr, amp=args.amp, device=args.device,
        seed=args.seed, time_limit_min=args.time_limit, checkpoint_every=args.checkpoint_every,
        log_every=args.log_every, val_every=args.val_every, resume=args.resume,
        timestep_stride=args.timestep_stride, name=args.name,
        store=args.store, workers=args.workers, rebuild_store=args.rebuild_store,
        in_memory=args.in_memory,
    )


def add_train(sub: argparse._SubParsersAction) -> None:
    from .core.model import NetworkSpec

    p = sub.add_parser("train", help="train the conditional diffusion model from image-level "
                       "labels")
    p.add_argument("data", help="folder of BraTS-layout cases (with <case>_seg.nii.gz for the "
                   "slice labels)")
    _add_training_data_options(p, "")
    p.add_argument("--steps", type=int, default=5000, help="total optimiser steps")
    p.add_argument("--batch", type=int, default=32, help="slices per step (per process)")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--label-dropout", type=float, default=0.15,
                   help="probability of the null label (classifier-free guidance)")
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--warmup", type=int, default=200, help="linear learning-rate warm-up steps")
    p.add_argument("--init-from", default=None, metavar="MODEL",
                   help="start from this model's weights (a bundled name such as default or "
                        "flair, or a checkpoint folder) to continue or fine-tune it; its "
                        "modalities, size and network must match this run's")
    _add_network_options(p, NetworkSpec(), "UNet", "0,0,1")
    p.add_argument("--timestep-stride", type=int, default=10,
                   help="train on timesteps 0, k, 2k, ... of 1000 (the method's 100-step "
                        "respacing: 10)")
    _add_run_options(p, "whatishealthy")
    p.set_defaults(func=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from .core.model import NetworkSpec
    from .core.train import TrainConfig, train

    channels, attention, groups = _parse_network(args, "32,64,128")
    _check_at_least_one(args, "steps", "batch", "size", "log_every", "val_every",
                        "checkpoint_every", "timestep_stride")
    if args.workers is not None:
        _check_at_least_one(args, "workers")
    network = NetworkSpec(channels=channels, attention_levels=attention,
                          num_res_blocks=args.res_blocks, norm_num_groups=groups,
                          num_head_channels=min(32, channels[-1]))
    if args.warmup < 0:
        raise WhatIsHealthyError("--warmup must be 0 or more")
    config = TrainConfig(**_run_options(args), label_dropout=args.label_dropout,
                         ema_decay=args.ema_decay, network=network, warmup=args.warmup,
                         init_from=args.init_from)
    train(config, show_progress=not args.no_progress)
    return 0


# --------------------------------------------------------------------------------------------
# train-classifier


def add_prepare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prepare", help="build the slice store of a training set once (e.g. on a "
                       "CPU node before a multi-GPU run); train reuses it with --store")
    p.add_argument("data", help="folder of BraTS-layout cases with <case>_seg.nii.gz")
    p.add_argument("--store", required=True, help="slice store folder to build (or check)")
    p.add_argument("--size", type=int, default=64, help="model image size (default 64)")
    p.add_argument("--modalities", default="flair,t1,t1ce,t2",
                   help="comma-separated channels in order, as the model's")
    p.add_argument("--workers", type=int, default=None,
                   help="processes (default: the cores, at most 8)")
    p.add_argument("--rebuild-store", action="store_true",
                   help="rebuild even if the store matches (replaces one of other preprocessing)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_prepare)


def _run_prepare(args: argparse.Namespace) -> int:
    from .core.data import discover_cases
    from .core.slice_store import Preprocessing, open_or_build

    _check_at_least_one(args, "size")
    if args.workers is not None:
        _check_at_least_one(args, "workers")
    modalities = tuple(m.strip() for m in args.modalities.split(",") if m.strip())
    store = open_or_build(args.store, discover_cases(args.data), Preprocessing(args.size,
                          modalities), workers=args.workers, rebuild=args.rebuild_store,
                          show_progress=not args.no_progress)
    print(f"slice store {args.store}: {len(store):,} slices of {len(store.cases)} cases "
          f"({store.counts()}), {store.nbytes / 2**20:.0f} MiB; use it with "
          f"`whatishealthy train {args.data} --store {args.store} ...`")
    return 0


def add_train_classifier(sub: argparse._SubParsersAction) -> None:
    from .core.classifier import ClassifierNetworkSpec

    p = sub.add_parser("train-classifier", help="train the noisy-image classifier of healthy vs "
                       "unhealthy slices (for --method classifier)")
    p.add_argument("data", help="folder of BraTS-layout cases (with <case>_seg.nii.gz for the "
                   "slice labels): the same data as `train`")
    _add_training_data_options(p, ": the diffusion model's")
    p.add_argument("--steps", type=int, default=3000, help="total optimiser steps")
    p.add_argument("--batch", type=int, default=32, help="slices per step")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--weight-decay", type=float, default=0.05)
    _add_network_options(p, ClassifierNetworkSpec(),
                         "encoder (each level halves the image)", "0,0,0,1")
    p.add_argument("--timestep-stride", type=int, default=10,
                   help="train on timesteps 0, k, 2k, ... of 1000: the diffusion model's stride "
                        "or a divisor of it")
    p.add_argument("--max-noise", type=float, default=1.0,
                   help="train only on noise levels up to this fraction (default 1: all); "
                        "guidance then works for --noise up to it")
    p.add_argument("--slices", default=None,
                   help="reuse prepared slices instead of preparing DATA again: a slice store, a "
                        "`train --out` folder holding one, or an earlier version's slices.npz")
    _add_run_options(p, "whatishealthy-classifier",
                     "seed; the same seed as `train` gives the same held-out cases")
    p.set_defaults(func=_run_train_classifier)


def _run_train_classifier(args: argparse.Namespace) -> int:
    from .core.classifier import ClassifierNetworkSpec
    from .core.train_classifier import ClassifierTrainConfig, train_classifier

    channels, attention, groups = _parse_network(args, "32,64,64,128")
    _check_at_least_one(args, "steps", "batch", "size", "log_every", "val_every",
                        "checkpoint_every", "timestep_stride")
    if not 0.0 < args.max_noise <= 1.0:
        raise WhatIsHealthyError(f"--max-noise must be in (0, 1], got {args.max_noise}")
    network = ClassifierNetworkSpec(channels=channels, attention_levels=attention,
                                    num_res_blocks=args.res_blocks, norm_num_groups=groups,
                                    num_head_channels=min(32, channels[-1]))
    config = ClassifierTrainConfig(**_run_options(args), weight_decay=args.weight_decay,
                                   network=network, max_noise=args.max_noise,
                                   slices=args.slices)
    train_classifier(config, show_progress=not args.no_progress)
    return 0


