"""The `whatishealthy` command line: synth, train, train-classifier, localize, evaluate, demo.

Each subcommand is a thin front end over the core (``core.pipeline`` does the work that the
napari widget also calls). User errors (the project's own error type, unreadable or unwritable
files, bad options) are printed as one line ``whatishealthy <cmd>: error: ...`` on stderr with
exit code 2 and no traceback; outputs are written atomically, so an error leaves no partial file.
See docs/cli.md.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .core.errors import InputError, WhatIsHealthyError


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``whatishealthy <cmd>: error: ...`` and exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# --------------------------------------------------------------------------------------------
# synth


def _add_synth(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("synth", help="write synthetic BraTS-like cases built from the MNI152 "
                       "template")
    p.add_argument("out", help="output folder (one case folder per case, plus cases.json)")
    p.add_argument("--cases", type=int, default=10, help="number of cases (default 10)")
    p.add_argument("--seed", type=int, default=0, help="random seed: same seed, same files")
    p.add_argument("--healthy-fraction", type=float, default=0.2,
                   help="share of healthy controls")
    p.add_argument("--subtle-fraction", type=float, default=0.3,
                   help="share of lesion cases whose lesions are subtle (FLAIR no brighter than "
                        "grey matter)")
    p.add_argument("--voxel-size", type=float, default=1.0,
                   help="voxel size in mm over the BraTS field of view (1.0 gives 240x240x155)")
    p.add_argument("--overwrite", action="store_true", help="replace existing case files")
    p.set_defaults(func=_run_synth)


def _run_synth(args: argparse.Namespace) -> int:
    from .core.synthetic import synthesise

    if args.cases < 1:
        raise WhatIsHealthyError("--cases must be at least 1")
    for name in ("healthy_fraction", "subtle_fraction"):
        value = getattr(args, name)
        if not 0.0 <= value <= 1.0:
            raise WhatIsHealthyError(f"--{name.replace('_', '-')} must be in [0, 1], got {value}")
    if not 0.5 <= args.voxel_size <= 10.0:
        raise WhatIsHealthyError(f"--voxel-size must be in [0.5, 10] mm, got {args.voxel_size}")

    def report(i: int, n: int, info) -> None:
        print(f"[{i}/{n}] {info.name}: {info.kind}, {info.lesion_voxels} lesion voxels",
              flush=True)

    synthesise(args.out, args.cases, seed=args.seed, healthy_fraction=args.healthy_fraction,
               subtle_fraction=args.subtle_fraction, voxel_size=args.voxel_size,
               overwrite=args.overwrite, progress=report)
    print(f"wrote {args.cases} cases to {args.out}")
    return 0


# --------------------------------------------------------------------------------------------
# train


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
    from .core.settings import check_seed

    if not (math.isfinite(args.lr) and 0.0 < args.lr <= 1.0):
        raise WhatIsHealthyError(f"--lr must be a number in (0, 1], got {args.lr}")
    for name in ("label_dropout", "ema_decay", "weight_decay"):
        value = getattr(args, name, None)
        if value is not None and not (math.isfinite(value) and 0.0 <= value <= 1.0):
            raise WhatIsHealthyError(f"--{name.replace('_', '-')} must be in [0, 1], got {value}")
    check_seed(args.seed)
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


def _add_train(sub: argparse._SubParsersAction) -> None:
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
    config = TrainConfig(**_run_options(args), label_dropout=args.label_dropout,
                         ema_decay=args.ema_decay, network=network)
    train(config, show_progress=not args.no_progress)
    return 0


# --------------------------------------------------------------------------------------------
# train-classifier


def _add_train_classifier(sub: argparse._SubParsersAction) -> None:
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


# --------------------------------------------------------------------------------------------
# Inference options shared by localize, evaluate and demo.


def _add_inference_options(p: argparse.ArgumentParser) -> None:
    from .core.settings import LocalizeSettings

    defaults = LocalizeSettings()  # the run's own settings; the rest default to the model's
    g = p.add_argument_group("model and inference (defaults: the model's recommended settings)")
    g.add_argument("--model", default="auto",
                   help="auto (default: the bundled model the input's modalities fit: four "
                        "BraTS modalities -> 'default', a lone FLAIR -> 'flair'), a bundled "
                        "model name, or a checkpoint folder")
    g.add_argument("--guidance", type=float, default=None, help="classifier-free guidance w")
    g.add_argument("--method", choices=["implicit", "classifier"], default=None,
                   help="guidance: implicit (classifier-free, the default) or classifier "
                        "(needs --classifier; default classifier when --classifier is given)")
    g.add_argument("--classifier", default=None,
                   help="noisy-image classifier checkpoint for --method classifier (the "
                        "folder `train-classifier --out` wrote)")
    g.add_argument("--classifier-scale", type=float, default=None,
                   help="classifier guidance scale s (default: the classifier's recommended)")
    g.add_argument("--noise", type=float, default=None, dest="noise_level",
                   help="noise level L in (0, 1]: how far the input is inverted")
    g.add_argument("--steps", type=int, default=None, help="DDIM steps to the noise level")
    g.add_argument("--threshold", default=None,
                   help="mask threshold on the difference: a number, 'auto' (the model's "
                        "recommended value) or 'otsu' (per volume)")
    g.add_argument("--median-size", type=int, default=None,
                   help="in-plane median filter of the difference (1: none)")
    g.add_argument("--min-component", type=int, default=None, dest="min_component_voxels",
                   help="drop mask components smaller than this many voxels")
    g.add_argument("--device", default=defaults.device,
                   help=f"auto, cpu, cuda or mps (default {defaults.device})")
    g.add_argument("--batch-size", type=int, default=None,
                   help="slices per network batch (default: 24 on a CPU, 256 on a GPU)")
    g.add_argument("--amp", choices=["auto", "on", "off", "bf16", "fp16"], default=defaults.amp,
                   help="autocast for the network (default auto: bf16 on CPU and CUDA)")
    g.add_argument("--seed", type=int, default=defaults.seed,
                   help="torch seed (recorded in provenance)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def _check_method(args: argparse.Namespace) -> str:
    method = args.method or ("classifier" if args.classifier is not None else "implicit")
    if method == "classifier" and args.classifier is None:
        raise WhatIsHealthyError("--method classifier needs --classifier PATH (a classifier "
                                 "checkpoint from `whatishealthy train-classifier`)")
    if method == "implicit" and (args.classifier is not None
                                 or args.classifier_scale is not None):
        raise WhatIsHealthyError("--classifier and --classifier-scale are for --method "
                                 "classifier; leave them out or pass --method classifier")
    if method == "classifier" and args.guidance is not None:
        raise WhatIsHealthyError("--guidance is the classifier-free weight; with --method "
                                 "classifier use --classifier-scale")
    return method


def _load_model(args: argparse.Namespace, folder: Path | None = None):
    """(model, spec, sha256, folder, settings) from the shared inference options.

    ``folder``: the checkpoint chosen for the input (:func:`_choose_for_case`); None: the model
    as named (``auto``: the bundled default).
    """
    from .core.model_choice import AUTO
    from .core.registry import DEFAULT_MODEL, load_model_cached, resolve_model
    from .core.settings import LocalizeSettings

    method = _check_method(args)
    if folder is None:
        folder = resolve_model(DEFAULT_MODEL if args.model == AUTO else args.model)
    model, spec, digest = load_model_cached(folder, args.device)
    settings = LocalizeSettings.from_spec(spec, **_settings_overrides(args), method=method)
    return model, spec, digest, folder, settings


def _settings_overrides(args: argparse.Namespace) -> dict:
    """The settings the inference options name (an option's ``dest`` is the settings field it
    sets; None: the model's recommended value)."""
    from dataclasses import fields

    from .core.settings import LocalizeSettings

    # --classifier names a checkpoint here; the settings' classifier is the loaded network.
    names = {f.name for f in fields(LocalizeSettings)} - {"classifier", "method"}
    overrides = {k: v for k, v in vars(args).items() if k in names}
    overrides["amp"] = {"on": True, "off": False}.get(args.amp, args.amp)
    return overrides


@dataclass
class _Guide:
    """The classifier for --method classifier, and what the provenance records of it."""

    classifier: object = None
    path: Path | None = None
    sha256: str | None = None

    def localize_kwargs(self) -> dict:
        if self.classifier is None:
            return {}
        return {"classifier": self.classifier, "classifier_path": self.path,
                "classifier_hash": self.sha256}


def _load_classifier(args: argparse.Namespace, spec, settings) -> _Guide:
    """Load and check the classifier of --method classifier (nothing otherwise)."""
    if settings.method != "classifier":
        return _Guide()
    from .core.classifier import check_compatible, load_classifier_cached, resolve_classifier
    from .core.counterfactual import timestep_plan

    folder = resolve_classifier(args.classifier)
    classifier, cspec, digest = load_classifier_cached(folder, args.device)
    check_compatible(cspec, spec, timestep_plan(spec.schedule, settings.noise_level,
                                                settings.steps))
    return _Guide(classifier, folder, digest)


class _Bar:
    """A tqdm bar over diffusion steps (or nothing)."""

    def __init__(self, desc: str, enabled: bool) -> None:
        self.bar = None
        self.desc = desc
        self.enabled = enabled

    def describe(self, desc: str) -> None:
        self.desc = desc
        if self.bar is not None:
            self.bar.set_description(desc)
            self.bar.reset()

    def __call__(self, progress) -> None:
        if not self.enabled:
            return
        if self.bar is None:  # created at the first step: errors before it print one line
            from tqdm import tqdm

            self.bar = tqdm(total=progress.total, desc=self.desc, unit="step", file=sys.stderr,
                            dynamic_ncols=True, leave=False)
        if self.bar.total != progress.total:
            self.bar.total = progress.total
            self.bar.refresh()
        self.bar.update(progress.step - self.bar.n)
        self.bar.set_postfix_str(progress.phase, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _drive(gen, callback):
    while True:
        try:
            progress = next(gen)
        except StopIteration as stop:
            return stop.value
        callback(progress)


# --------------------------------------------------------------------------------------------
# localize


@dataclass
class _Case:
    name: str
    paths: list[Path]
    modalities: dict[str, str] = field(default_factory=dict)
    folder: Path | None = None  # the case folder, when given as one


def _collect_cases(inputs: Sequence[str], modality: str | None) -> list[_Case]:
    """INPUTs -> cases: case folders, folders of case folders, or NIfTI files grouped by case."""
    from .core.data import discover_cases
    from .core.volume import (
        _SUFFIX_RE,
        find_case_files,
        is_case_folder,
        is_nifti_path,
        modality_from_name,
        nifti_stem,
    )

    cases: list[_Case] = []
    grouped: dict[tuple[Path, str], _Case] = {}
    for text in inputs:
        path = Path(text)
        if not path.exists():
            raise InputError(f"{path}: no such file or folder")
        if path.is_dir():
            folders = [path] if is_case_folder(path) else discover_cases(path)
            for folder in folders:
                files = find_case_files(folder)
                cases.append(_Case(folder.name, list(files.values()), folder=folder))
            continue
        if not is_nifti_path(path):
            raise InputError(f"{path}: not a NIfTI file name (.nii or .nii.gz); give NIfTI files "
                             "or a case folder")
        named = modality_from_name(path)
        if named is None:
            if modality is None:
                # A lone unnamed file: its modality is settled once the model is known.
                cases.append(_Case(nifti_stem(path), [path]))
            else:
                cases.append(_Case(nifti_stem(path), [path], {str(path): modality}))
            continue
        stem = nifti_stem(path)
        match = _SUFFIX_RE.search(stem)
        name = stem[: match.start()] if match else stem
        key = (path.resolve().parent, name)
        if key not in grouped:
            grouped[key] = _Case(name, [])
            cases.append(grouped[key])
        grouped[key].paths.append(path)
    seen: dict[str, _Case] = {}
    for case in cases:
        if case.name in seen:
            raise InputError(f"two inputs are both case {case.name!r}; their outputs would "
                             "collide: run them into separate --out folders")
        seen[case.name] = case
    return cases


def _case_modalities(case: _Case) -> tuple[str, ...]:
    """The modalities a case provides, from its file names (or --modality), without reading
    the images; ``("image",)`` for a lone file whose modality is unknown."""
    from .core.model_choice import UNKNOWN_MODALITY
    from .core.volume import find_case_files, modality_from_name

    if case.folder is not None:
        return tuple(m for m in find_case_files(case.folder) if m != "seg")
    found: list[str] = []
    for path in case.paths:
        given = case.modalities.get(str(path))
        if given:
            found.extend(m.strip() for m in given.split(","))
        else:
            found.append(modality_from_name(path) or UNKNOWN_MODALITY)
    return tuple(dict.fromkeys(m for m in found if m != "seg"))


def _choose_for_case(case: _Case, requested: str):
    """The model choice for one case; errors name the case's files."""
    from .core.model_choice import choose_model

    try:
        return choose_model(_case_modalities(case), requested)
    except InputError as exc:
        where = case.folder or case.paths[0]
        raise InputError(f"{where}: {exc}") from None


def _load_case(case: _Case, spec):
    from .core.volume import load_volume

    volume = load_volume(case.paths, modalities=case.modalities, name=case.name)
    return volume.select(spec.modalities)


def _grid_voxels(case: _Case) -> int:
    """Voxels of the case's source grid, from the first file's header (0 if unreadable: the
    loader then says why)."""
    import math

    import nibabel as nib

    try:
        return math.prod(int(n) for n in nib.load(str(case.paths[0])).shape[:3])
    except Exception:  # noqa: BLE001 - reading the image later gives the one-line reason
        return 0


def _add_localize(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("localize", help="localize lesions: healthy counterfactual, difference "
                       "map and mask")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="a case folder, a folder of case folders, or NIfTI files (files of one "
                        "case are grouped by their name, <case>_<modality>.nii.gz)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--modality", default=None,
                   help="the modality of an input file whose name does not say it; for a 4D file "
                        "holding one case's modalities, their names in order, comma-separated "
                        "(e.g. flair,t1,t1ce,t2)")
    p.add_argument("--all-channels", action="store_true",
                   help="also write <case>_healthy_<modality>.nii.gz for every model channel")
    _add_inference_options(p)
    p.set_defaults(func=_run_localize)


def _run_localize(args: argparse.Namespace) -> int:
    import numpy as np

    from .core.pipeline import check_outputs, iter_localize, output_paths, write_outputs

    if args.modality is not None:
        from .core.volume import _MODALITY_ALIASES

        args.modality = _MODALITY_ALIASES.get(args.modality.lower(), args.modality.lower())
    cases = _collect_cases(args.inputs, args.modality)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: --out must be a folder")
    _check_method(args)
    # Each case's model, and every impossible output, before minutes of work.
    choices = [_choose_for_case(case, args.model) for case in cases]
    guide_files = _files_in(args.classifier)
    for case, choice in zip(cases, choices, strict=True):
        parents = {p.resolve().parent for p in case.paths}
        if out.resolve() in parents:
            raise InputError(
                f"{out}: holds the input files of {case.name}; write the outputs to another "
                "folder (outputs such as <case>_mask.nii.gz next to the inputs would be read "
                "back as part of the case)"
            )
        paths = output_paths(out, case.name, choice.spec.modalities, args.all_channels)
        check_outputs(paths, [*case.paths, *_files_in(choice.folder), *guide_files],
                      args.overwrite, voxels=_grid_voxels(case))
    for i, (case, choice) in enumerate(zip(cases, choices, strict=True)):
        model, spec, digest, folder, settings = _load_model(args, choice.folder)
        guide = _load_classifier(args, spec, settings)
        volume = _load_case(case, spec)
        gen = iter_localize(model, spec, volume.data, settings, model_path=folder,
                            model_hash=digest, inputs=volume.source_paths,
                            **guide.localize_kwargs())
        label = f"{case.name} [{i + 1}/{len(cases)}]" if len(cases) > 1 else case.name
        bar = _Bar(label, not args.no_progress)
        try:
            result = _drive(gen, bar)
        finally:
            bar.close()
        paths = write_outputs(result, volume, out, overwrite=args.overwrite,
                              all_channels=args.all_channels,
                              inputs=[*_files_in(folder), *guide_files])
        voxel_ml = float(abs(np.linalg.det(volume.affine[:3, :3]))) / 1000.0
        flagged = int(result.mask.sum())
        for warning in result.warnings:
            print(f"{case.name}: warning: {warning}", file=sys.stderr)
        print(f"{case.name}: {flagged} voxels ({flagged * voxel_ml:.2f} ml) flagged at threshold "
              f"{result.threshold_used:.4g} by model {choice.reason}; wrote "
              f"{paths['mask'].parent}/{case.name}_*")
    return 0


# --------------------------------------------------------------------------------------------
# evaluate


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="Dice / AUROC / AUPRC per case and pooled, against the "
                       "FLAIR-intensity baseline")
    p.add_argument("data", help="folder of BraTS-layout cases with segmentations")
    p.add_argument("--calibration", default=None,
                   help="a separate folder of cases: the calibrated threshold is the best-Dice "
                        "threshold there (default: calibrate on lesion-free slices of DATA)")
    p.add_argument("--json", default=None, help="write the full report to this JSON file")
    p.add_argument("--cases", type=int, default=None, help="evaluate only the first N cases")
    p.add_argument("--calibration-cases", type=int, default=None,
                   help="use only the first N calibration cases")
    p.add_argument("--z-stride", type=int, default=1,
                   help="run and score every k-th brain slice only (k times faster; default 1: "
                        "all)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    _add_inference_options(p)
    p.set_defaults(func=_run_evaluate)


def _choose_for_data(args: argparse.Namespace) -> Path:
    """The model for ``evaluate``: one that every case's modalities fit."""
    from .core.data import discover_cases
    from .core.model_choice import choose_model
    from .core.volume import find_case_files

    folders = discover_cases(args.data)
    if args.cases is not None:
        folders = folders[: args.cases]
    common: list[str] | None = None
    for folder in folders:
        have = [m for m in find_case_files(folder) if m != "seg"]
        common = have if common is None else [m for m in common if m in have]
    choice = choose_model(common or (), args.model)
    print(f"model {choice.reason}", flush=True)
    return choice.folder


def _files_in(folder: Path | str | None) -> list[Path]:
    """The files of a checkpoint folder: inputs of the run, never written over."""
    if folder is None or not Path(folder).is_dir():
        return []
    return [p for p in Path(folder).iterdir() if p.is_file()]


def _data_files(data: str | Path) -> list[Path]:
    """Every image of every case under ``data`` (inputs of the run)."""
    from .core.data import discover_cases

    return [p for folder in discover_cases(data) for p in folder.iterdir() if p.is_file()]


def _run_evaluate(args: argparse.Namespace) -> int:
    from .core.evaluate import evaluate, format_report
    from .core.output import check_folder, check_target, write_json

    for name in ("cases", "calibration_cases", "z_stride"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise WhatIsHealthyError(f"--{name.replace('_', '-')} must be at least 1")
    model_folder = _choose_for_data(args)
    inputs = [*_data_files(args.data), *_files_in(model_folder)]
    if args.calibration is not None:
        inputs += _data_files(args.calibration)
    if args.classifier is not None:
        inputs += _files_in(Path(args.classifier))
    if args.json is not None:
        json_path = Path(args.json)
        if json_path.is_dir():
            raise InputError(f"{json_path}: is a folder; --json takes a file name")
        check_target(json_path, inputs, args.overwrite)
        check_folder(json_path.parent)
    model, spec, digest, folder, settings = _load_model(args, model_folder)
    guide = _load_classifier(args, spec, settings)
    classifier_info = None
    if guide.classifier is not None:
        from .core.classifier import resolve_scale

        classifier_info = {"name": guide.classifier.spec.name, "path": str(guide.path),
                           "sha256": guide.sha256,
                           "scale": resolve_scale(settings.classifier_scale, guide.classifier)}
    bar = _Bar("", not args.no_progress)

    def on_case(i: int, n: int, name: str, which: str) -> None:
        bar.describe(f"{which} {i + 1}/{n} {name}")

    try:
        report = evaluate(
            args.data, model, spec, settings,
            calibration=args.calibration, limit=args.cases,
            calibration_limit=args.calibration_cases,
            model_info={"name": spec.name, "path": str(folder), "sha256": digest},
            on_case=on_case, on_step=bar,
            classifier=guide.classifier, classifier_info=classifier_info,
            z_stride=args.z_stride,
        )
    finally:
        bar.close()
    if classifier_info is not None:
        print(f"classifier guidance, s={classifier_info['scale']:g}, classifier "
              f"{classifier_info['path']}")
    print(format_report(report))
    if args.json is not None:
        write_json(report, args.json, inputs, overwrite=args.overwrite)
        print(f"wrote {args.json}")
    return 0


# --------------------------------------------------------------------------------------------
# demo


SAMPLE_SEED = 7


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "napari-whatishealthy"


def sample_case_path() -> Path:
    """The bundled sample case folder (from the napari layer), or one synthetic case made once
    into the user cache (voxel size 2 mm, a typical lesion)."""
    try:
        from ._sample_data import sample_case_path as bundled

        path = Path(bundled())
        if path.is_dir():
            return path
    except (ImportError, AttributeError, OSError, WhatIsHealthyError):
        pass
    from .core.synthetic import synthesise
    from .core.volume import is_case_folder

    root = _cache_dir() / "sample-synthetic-v1"
    name = f"Synth_{SAMPLE_SEED:04d}_0000"
    folder = root / name
    if not is_case_folder(folder):
        print(f"making a synthetic sample case in {root} (once)", file=sys.stderr)
        synthesise(root, 1, seed=SAMPLE_SEED, healthy_fraction=0.0, subtle_fraction=0.0,
                   voxel_size=2.0, overwrite=True)
    return folder


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="open napari with the sample case and the widget; "
                       "--headless: run the pipeline and write outputs and a PNG figure")
    p.add_argument("--headless", action="store_true", help="no window: write files only")
    p.add_argument("--out", default="whatishealthy-demo",
                   help="output folder for --headless (default whatishealthy-demo); the demo "
                        "replaces its own earlier outputs there")
    p.add_argument("--sample", default=None,
                   help="a case folder to use instead of the bundled sample")
    _add_inference_options(p)
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from .core.model_choice import AUTO
    from .core.registry import DEFAULT_MODEL, resolve_model

    # A missing bundled model is reported before anything else; the sample has all four
    # modalities, so "auto" is the four-channel default.
    resolve_model(DEFAULT_MODEL if args.model == AUTO else args.model)
    if not args.headless and (args.classifier is not None or args.method == "classifier"):
        raise WhatIsHealthyError("classifier guidance in the demo needs --headless (the window "
                                 "uses the widget's settings)")
    sample = Path(args.sample) if args.sample else sample_case_path()
    if not args.headless:
        return _demo_gui(sample, args)
    from .core.pipeline import iter_localize, write_outputs
    from .core.volume import load_volume

    model, spec, digest, folder, settings = _load_model(args)
    guide = _load_classifier(args, spec, settings)
    volume = load_volume(sample, name=_case_name_from_files(sample)).select(spec.modalities)
    out = Path(args.out)
    if out.resolve() == sample.resolve():
        raise InputError(f"{out}: is the sample folder; choose another --out")
    gen = iter_localize(model, spec, volume.data, settings, model_path=folder,
                        model_hash=digest, inputs=volume.source_paths,
                        **guide.localize_kwargs())
    bar = _Bar(volume.name, not args.no_progress)
    try:
        result = _drive(gen, bar)
    finally:
        bar.close()
    paths = write_outputs(result, volume, out, overwrite=True, inputs=_files_in(folder))
    figure = out / f"{volume.name}_figure.png"
    save_figure(volume, result, figure, inputs=_files_in(folder))
    print(f"sample {sample}: {int(result.mask.sum())} voxels flagged at threshold "
          f"{result.threshold_used:.4g}")
    for path in [*paths.values(), figure]:
        print(f"wrote {path}")
    return 0


def _case_name_from_files(folder: Path) -> str | None:
    """``Sample`` for a folder holding ``Sample_flair.nii.gz`` ... (None: use the folder name)."""
    from .core.volume import _SUFFIX_RE, find_case_files, nifti_stem

    files = find_case_files(folder)
    if not files:
        return None
    stem = nifti_stem(next(iter(files.values())))
    match = _SUFFIX_RE.search(stem)
    return stem[: match.start()] if match else None


def _demo_gui(sample: Path, args: argparse.Namespace) -> int:
    try:
        import napari
    except ImportError:
        raise WhatIsHealthyError("napari is not installed: pip install 'napari-whatishealthy[gui]'"
                                 " or run `whatishealthy demo --headless`") from None
    viewer = napari.Viewer(title="What is Healthy? demo")
    try:
        if args.sample is None:
            viewer.open_sample("napari-whatishealthy", "sample_case")
        else:
            viewer.open(str(sample), plugin="napari-whatishealthy")
    except Exception:  # the plugin's reader failed: show the volumes plainly
        from .core.volume import load_volume

        volume = load_volume(sample)
        for i, m in enumerate(volume.modalities):
            viewer.add_image(volume.data[i], name=f"{volume.name}_{m}", affine=volume.affine,
                             visible=(i == 0))
        if volume.segmentation is not None:
            viewer.add_labels(volume.segmentation, name=f"{volume.name}_seg",
                              affine=volume.affine, opacity=0.4, visible=False)
    try:
        from ._widget import LocalizeWidget
        from .core.model_choice import AUTO
        from .core.registry import resolve_model

        widget = LocalizeWidget(viewer)
        if args.model != AUTO:  # otherwise the widget's Automatic choice
            widget.set_model(str(resolve_model(args.model)))
        viewer.window.add_dock_widget(widget, name="What is Healthy?", area="right")
    except ImportError as exc:
        print(f"whatishealthy demo: warning: the widget could not be loaded ({exc})",
              file=sys.stderr)
    napari.run()
    return 0


def _figure_slices(volume, result, count: int = 3) -> list[int]:
    import numpy as np

    if volume.segmentation is not None and (volume.segmentation > 0).any():
        area = (volume.segmentation > 0).sum(axis=(0, 1))
    elif result.mask.any():
        area = result.mask.sum(axis=(0, 1))
    else:
        area = result.brain.sum(axis=(0, 1))
    zs = np.flatnonzero(area)
    if zs.size == 0:
        return [volume.shape[2] // 2]
    best = int(np.argmax(area))
    lo, hi = int(zs[0]), int(zs[-1])
    picks = [best, (lo + best) // 2, (best + hi + 1) // 2]
    out: list[int] = []
    for z in picks:
        if z not in out:
            out.append(z)
    return sorted(out)[:count]


def save_figure(volume, result, path: str | Path, tile: int = 200, overwrite: bool = True,
                inputs: Sequence[str | Path] = ()) -> Path:
    """A PNG of axial slices through the lesion: input FLAIR, healthy, difference, mask and the
    ground truth (when the case has one). Neurological view: anterior up, right on the right.
    Never written over the volume's files or ``inputs``."""
    inputs = (*volume.input_paths, *inputs)
    import numpy as np
    from PIL import Image, ImageDraw

    c = volume.modalities.index("flair") if "flair" in volume.modalities else 0
    image = volume.data[c]
    healthy = result.healthy[c]
    brain = result.brain
    hi = float(np.percentile(image[brain], 99.9)) if brain.any() else float(image.max() or 1.0)
    hi = hi if hi > 0 else 1.0
    dmax = max(float(np.percentile(result.difference[brain], 99.9)) if brain.any() else 0.0,
               2.0 * result.threshold_used, 1e-6)
    has_truth = volume.segmentation is not None
    titles = ["input FLAIR", "healthy", "difference", "mask"] + (["ground truth"] if has_truth
                                                                  else [])

    def view(a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(a.T[::-1])  # rows: anterior at the top

    def gray(a: np.ndarray) -> np.ndarray:
        g = np.clip(a / hi, 0, 1) * 255
        return np.repeat(g[..., None], 3, axis=-1).astype(np.uint8)

    def hot(a: np.ndarray) -> np.ndarray:
        v = np.clip(a / dmax, 0, 1)
        rgb = np.stack([np.clip(3 * v, 0, 1), np.clip(3 * v - 1, 0, 1), np.clip(3 * v - 2, 0, 1)],
                       axis=-1)
        return (rgb * 255).astype(np.uint8)

    def overlay(a: np.ndarray, m: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
        rgb = gray(a).astype(np.float32)
        sel = m > 0
        rgb[sel] = 0.45 * rgb[sel] + 0.55 * np.array(colour, np.float32)
        return rgb.astype(np.uint8)

    rows = []
    zs = _figure_slices(volume, result)
    for z in zs:
        tiles = [gray(view(image[..., z])), gray(view(healthy[..., z])),
                 hot(view(result.difference[..., z])),
                 overlay(view(image[..., z]), view(result.mask[..., z]), (255, 40, 40))]
        if has_truth:
            tiles.append(overlay(view(image[..., z]), view(volume.segmentation[..., z]),
                                 (40, 220, 40)))
        rows.append(tiles)
    h0, w0 = rows[0][0].shape[:2]
    scale = tile / max(h0, w0)
    th, tw = max(1, round(h0 * scale)), max(1, round(w0 * scale))
    header, label_w, pad = 22, 48, 4
    ncol = len(titles)
    canvas = Image.new("RGB", (label_w + ncol * (tw + pad), header + len(rows) * (th + pad)),
                       (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    for j, title in enumerate(titles):
        draw.text((label_w + j * (tw + pad) + 4, 4), title, fill=(255, 255, 255))
    for i, (z, tiles) in enumerate(zip(zs, rows, strict=True)):
        y = header + i * (th + pad)
        draw.text((4, y + th // 2 - 6), f"z={z}", fill=(255, 255, 255))
        for j, t in enumerate(tiles):
            img = Image.fromarray(t, "RGB").resize((tw, th), Image.Resampling.NEAREST)
            canvas.paste(img, (label_w + j * (tw + pad), y))
    footer = (f"threshold {result.threshold_used:.3g}; difference shown 0..{dmax:.3g}; "
              "anterior up, patient's right on the right")
    out = Image.new("RGB", (canvas.width, canvas.height + 18), (0, 0, 0))
    out.paste(canvas, (0, 0))
    ImageDraw.Draw(out).text((4, canvas.height + 2), footer, fill=(200, 200, 200))
    from .core.output import write_file

    return write_file(path, lambda tmp: out.save(tmp, format="PNG"), inputs, overwrite)


# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="whatishealthy",
        description="Lesion localization with healthy counterfactuals from a guided diffusion "
                    "model. See docs/cli.md.",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_synth(sub)
    _add_train(sub)
    _add_train_classifier(sub)
    _add_localize(sub)
    _add_evaluate(sub)
    _add_demo(sub)
    return parser


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    from .core.runtime import Terminated, sigterm_as_interrupt, tune_allocator

    tune_allocator()
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error already printed as one line
        return exc.code if isinstance(exc.code, int) else 2
    prefix = f"whatishealthy {args.command}"
    try:
        with sigterm_as_interrupt():
            return int(args.func(args) or 0)
    except WhatIsHealthyError as exc:
        print(f"{prefix}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:  # permission denied, disk full, ...: a user-side problem
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        print(f"{prefix}: error: {where}{exc.strerror or _one_line(exc)}", file=sys.stderr)
        return 2
    except MemoryError:
        print(f"{prefix}: error: out of memory; use a smaller --batch-size or fewer cases",
              file=sys.stderr)
        return 2
    except Terminated:
        print(f"{prefix}: terminated (SIGTERM); earlier outputs are unchanged", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print(f"{prefix}: interrupted; earlier outputs are unchanged", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
