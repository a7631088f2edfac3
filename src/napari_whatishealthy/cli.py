"""The `whatishealthy` command line: synth, train, localize, evaluate, demo.

Each subcommand is a thin front end over the core; errors of the project's own type are printed
as one line (no traceback) with a non-zero exit code.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .core.errors import WhatIsHealthyError


def _add_synth(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("synth", help="write synthetic BraTS-like cases built from the MNI152 template")
    p.add_argument("out", help="output folder (one case folder per case, plus cases.json)")
    p.add_argument("--cases", type=int, default=10, help="number of cases (default 10)")
    p.add_argument("--seed", type=int, default=0, help="random seed: same seed, same files")
    p.add_argument("--healthy-fraction", type=float, default=0.2, help="share of healthy controls")
    p.add_argument("--subtle-fraction", type=float, default=0.3,
                   help="share of lesion cases whose lesions are subtle (FLAIR no brighter than grey matter)")
    p.add_argument("--voxel-size", type=float, default=1.0,
                   help="voxel size in mm over the BraTS field of view (1.0 gives 240x240x155)")
    p.add_argument("--overwrite", action="store_true", help="replace existing case files")
    p.set_defaults(func=_run_synth)


def _run_synth(args: argparse.Namespace) -> int:
    from .core.synthetic import synthesise

    if args.cases < 1:
        raise WhatIsHealthyError("--cases must be at least 1")

    def report(i: int, n: int, info) -> None:
        print(f"[{i}/{n}] {info.name}: {info.kind}, {info.lesion_voxels} lesion voxels", flush=True)

    synthesise(args.out, args.cases, seed=args.seed, healthy_fraction=args.healthy_fraction,
               subtle_fraction=args.subtle_fraction, voxel_size=args.voxel_size,
               overwrite=args.overwrite, progress=report)
    print(f"wrote {args.cases} cases to {args.out}")
    return 0


def _add_train(sub: argparse._SubParsersAction) -> None:
    from .core.model import NetworkSpec

    d = NetworkSpec()
    p = sub.add_parser("train", help="train the conditional diffusion model from image-level labels")
    p.add_argument("data", help="folder of BraTS-layout cases (with <case>_seg.nii.gz for the slice labels)")
    p.add_argument("--out", required=True, help="output folder: checkpoint/, train_state.pt, train_log.jsonl")
    p.add_argument("--size", type=int, default=64, help="model image size in pixels (default 64)")
    p.add_argument("--modalities", default="flair,t1,t1ce,t2", help="comma-separated channels in order")
    p.add_argument("--steps", type=int, default=5000, help="total optimiser steps")
    p.add_argument("--batch", type=int, default=32, help="slices per step (per process)")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--label-dropout", type=float, default=0.15,
                   help="probability of the null label (classifier-free guidance)")
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--channels", default=",".join(map(str, d.channels)), help="UNet channels per level")
    p.add_argument("--attention", default=",".join("1" if a else "0" for a in d.attention_levels),
                   help="attention per level, e.g. 0,0,1")
    p.add_argument("--res-blocks", type=int, default=d.num_res_blocks)
    p.add_argument("--timestep-stride", type=int, default=10,
                   help="train on timesteps 0, k, 2k, ... of 1000 (the method's 100-step respacing: 10)")
    p.add_argument("--amp", choices=["auto", "on", "off"], default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-limit", type=float, default=None, help="stop (and save) after this many minutes")
    p.add_argument("--checkpoint-every", type=int, default=250)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--val-every", type=int, default=250)
    p.add_argument("--name", default="whatishealthy")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    p.set_defaults(func=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from .core.model import NetworkSpec
    from .core.train import TrainConfig, train

    channels = tuple(int(c) for c in args.channels.split(","))
    attention = tuple(a.strip() in ("1", "true", "True") for a in args.attention.split(","))
    if len(channels) != len(attention):
        raise WhatIsHealthyError("--channels and --attention need one entry per level")
    groups = min(16, min(channels))
    network = NetworkSpec(channels=channels, attention_levels=attention, num_res_blocks=args.res_blocks,
                          norm_num_groups=groups, num_head_channels=min(32, channels[-1]))
    config = TrainConfig(
        data=args.data, out=args.out, size=args.size,
        modalities=tuple(m.strip() for m in args.modalities.split(",")),
        steps=args.steps, batch=args.batch, lr=args.lr, label_dropout=args.label_dropout,
        ema_decay=args.ema_decay, amp=args.amp, device=args.device, seed=args.seed,
        time_limit_min=args.time_limit, checkpoint_every=args.checkpoint_every,
        log_every=args.log_every, val_every=args.val_every, resume=args.resume,
        network=network, timestep_stride=args.timestep_stride, name=args.name,
    )
    train(config, show_progress=not args.no_progress)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="whatishealthy",
        description="Lesion localization with healthy counterfactuals from a guided diffusion model.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_synth(sub)
    _add_train(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from .core.runtime import tune_allocator

    tune_allocator()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except WhatIsHealthyError as exc:
        print(f"whatishealthy {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"whatishealthy {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
