"""The `whatishealthy` command line: synth, train, train-classifier, prepare, localize, evaluate,
demo.

Each subcommand is a thin front end over the core (``core.pipeline`` does the work that the
napari widget also calls). User errors (the project's own error type, unreadable or unwritable
files, bad options) are printed as one line ``whatishealthy <cmd>: error: ...`` on stderr with
exit code 2 and no traceback; outputs are written atomically, so an error leaves no partial file.
See docs/cli.md.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
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
    p.add_argument("--families", default="all",
                   help="comma-separated lesion families to draw from: tumour, multifocal, "
                        "wedge, diffuse, isointense (default all; see docs/cli.md)")
    p.add_argument("--overwrite", action="store_true", help="replace existing case files")
    p.set_defaults(func=_run_synth)


def _run_synth(args: argparse.Namespace) -> int:
    from .core.synthetic import FAMILIES, synthesise

    if args.cases < 1:
        raise WhatIsHealthyError("--cases must be at least 1")
    for name in ("healthy_fraction", "subtle_fraction"):
        value = getattr(args, name)
        if not 0.0 <= value <= 1.0:
            raise WhatIsHealthyError(f"--{name.replace('_', '-')} must be in [0, 1], got {value}")
    if not 0.5 <= args.voxel_size <= 10.0:
        raise WhatIsHealthyError(f"--voxel-size must be in [0.5, 10] mm, got {args.voxel_size}")
    families = None
    if args.families.strip() != "all":
        families = tuple(f.strip() for f in args.families.split(",") if f.strip())
        unknown = sorted(set(families) - set(FAMILIES))
        if unknown or not families:
            raise WhatIsHealthyError(f"--families: unknown {', '.join(unknown) or '(none given)'}; "
                                     f"choose from {', '.join(FAMILIES)} or all")

    def report(i: int, n: int, info) -> None:
        families = f" ({', '.join(info.families)})" if info.families else ""
        print(f"[{i}/{n}] {info.name}: {info.kind}{families}, {info.lesion_voxels} lesion voxels",
              flush=True)

    synthesise(args.out, args.cases, seed=args.seed, healthy_fraction=args.healthy_fraction,
               subtle_fraction=args.subtle_fraction, voxel_size=args.voxel_size,
               overwrite=args.overwrite, progress=report, families=families)
    print(f"wrote {args.cases} cases to {args.out}")
    return 0


# --------------------------------------------------------------------------------------------
# Inference options shared by localize, evaluate and demo.


def _noise_levels(text: str) -> tuple[float, ...]:
    if text.strip().lower() == "none":
        return ()
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated noise levels like 0.2,0.3,0.45, got {text!r}") from None


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
    g.add_argument("--noise-levels", type=_noise_levels, default=None, dest="noise_levels",
                   help="several noise levels, e.g. 0.2,0.3,0.45: the map is the mean of their "
                        "difference maps and their per-voxel spread is written as "
                        "<case>_uncertainty.nii.gz (one counterfactual per level; 'none': "
                        "the single --noise level)")
    g.add_argument("--steps", type=int, default=None, help="DDIM steps to the noise level")
    g.add_argument("--edge-erosion", type=int, default=None, dest="edge_erosion",
                   help="voxels of the brain's edge where the difference is set to 0 (the "
                        "skull-stripping border is not a lesion); 0: none")
    g.add_argument("--edge-guide-radius", type=int, default=None, dest="edge_guide_radius",
                   help="edge-aware upsampling of the difference map: radius in voxels of the "
                        "guided filter that makes lesion edges follow the full-resolution image "
                        "(0: plain bilinear upsampling)")
    g.add_argument("--lesion-contrast", choices=["any", "expected"], default=None,
                   dest="lesion_contrast",
                   help="which change counts as a lesion in each modality: any (|input - "
                        "healthy|, the paper's score) or expected (brighter on FLAIR and T2, "
                        "darker on T1, either on T1ce)")
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
    g.add_argument("--backend", choices=["auto", "torch", "openvino"], default=defaults.backend,
                   help="what runs the network (default auto: OpenVINO on an x86-64 CPU where it "
                        "is installed, torch elsewhere)")
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


def _open_session(args: argparse.Namespace, folder: Path | None = None):
    """(session, settings, guide) from the shared inference options: the model (``folder``:
    the checkpoint chosen for the input; None: the model as named, ``auto``: the bundled
    default), its settings with the options' overrides, and the classifier of --method
    classifier (checked against the model)."""
    from .core.model_choice import AUTO
    from .core.registry import DEFAULT_MODEL
    from .core.session import LocalizeSession

    method = _check_method(args)
    reference = folder or (DEFAULT_MODEL if args.model == AUTO else args.model)
    session = LocalizeSession.load(reference, args.device)
    settings = session.settings(**_settings_overrides(args), method=method)
    return session, settings, session.load_guide(args.classifier, settings)


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


class _Bar:
    """A tqdm bar over diffusion steps in a terminal; elsewhere (a log, a pipe) or with
    --no-progress nothing per step: each case gets its one line from the command."""

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
            from .core.progress import progress_bar

            self.bar = progress_bar(progress.total, desc=self.desc, unit="step", leave=False)
        if self.bar.total != progress.total:
            self.bar.total = progress.total
            self.bar.refresh()
        self.bar.update(progress.step - self.bar.n)
        self.bar.set_postfix_str(progress.phase, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# --------------------------------------------------------------------------------------------
# localize


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
    p.add_argument("--shard", default=None, metavar="K/N",
                   help="run only shard K of N of the cases (K from 0: case i goes to shard "
                        "i mod N), e.g. one job of a job array; under torchrun each rank takes "
                        "its part of this shard")
    p.add_argument("--resume", action="store_true",
                   help="skip cases whose outputs exist with the same model, settings and "
                        "inputs (from their provenance); a case with other outputs needs "
                        "--overwrite")
    _add_inference_options(p)
    p.set_defaults(func=_run_localize)


def _run_localize(args: argparse.Namespace) -> int:
    import numpy as np

    from .core.cases import choose_for_case, collect_cases
    from .core.memory import check_memory
    from .core.results import check_outputs, output_paths, write_outputs
    from .core.sharding import current_shard
    from .core.steps import drain

    shard = current_shard(args.shard)
    cases = collect_cases(args.inputs, args.modality)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: --out must be a folder")
    _check_method(args)
    total = len(cases)
    # This process's cases only (under torchrun or --shard): the others' outputs may appear
    # while this one runs and are not its business.
    positions = shard.take(range(total))
    cases = [cases[i] for i in positions]
    shard.use_device(args.device)
    # Each case's model, and every impossible output, before minutes of work.
    choices = [choose_for_case(case, args.model) for case in cases]
    guide_files = _files_in(args.classifier)
    done: set[str] = set()
    for case, choice in zip(cases, choices, strict=True):
        parents = {p.resolve().parent for p in case.paths}
        if out.resolve() in parents:
            raise InputError(
                f"{out}: holds the input files of {case.name}; write the outputs to another "
                "folder (outputs such as <case>_mask.nii.gz next to the inputs would be read "
                "back as part of the case)"
            )
        levels = args.noise_levels if args.noise_levels is not None else \
            choice.spec.inference.noise_levels
        paths = output_paths(out, case.name, choice.spec.modalities, args.all_channels,
                             uncertainty=bool(levels))
        if args.resume:
            state, why = _resume_state(args, case, choice, paths)
            if state:
                done.add(case.name)
                continue
            if state is False and not args.overwrite:
                raise InputError(f"{case.name}: outputs in {out} were {why}; pass --overwrite "
                                 "to replace them, or choose another --out")
        check_outputs(paths, [*case.paths, *_files_in(choice.folder), *guide_files],
                      args.overwrite or args.resume, voxels=case.grid_voxels())
        check_memory(case.grid_voxels(), len(choice.spec.modalities), case.name)
    where = f" ({shard.label()})" if shard.is_split else ""
    if shard.is_split or done:
        print(f"{len(cases) - len(done)} of {total} cases to run here{where}"
              + (f"; {len(done)} already done (--resume)" if done else ""), flush=True)
    for position, case, choice in zip(positions, cases, choices, strict=True):
        if case.name in done:
            continue
        session, settings, guide = _open_session(args, choice.folder)
        volume = case.load(session.spec)
        for warning in volume.warnings:  # e.g. a qform that disagrees with the sform
            print(f"{case.name}: warning: {warning}", file=sys.stderr)
        gen = session.iter_localize(volume.data, settings, guide, inputs=volume.source_paths)
        label = f"{case.name} [{position + 1}/{total}]" if total > 1 else case.name
        bar = _Bar(label, not args.no_progress)
        try:
            result = drain(gen, bar)
        finally:
            bar.close()
        paths = write_outputs(result, volume, out, overwrite=args.overwrite or args.resume,
                              all_channels=args.all_channels,
                              inputs=[*_files_in(session.folder), *guide_files])
        voxel_ml = float(abs(np.linalg.det(volume.affine[:3, :3]))) / 1000.0
        flagged = int(result.mask.sum())
        for warning in result.warnings:
            print(f"{case.name}: warning: {warning}", file=sys.stderr)
        print(f"{case.name}: {flagged} voxels ({flagged * voxel_ml:.2f} ml) flagged at threshold "
              f"{result.threshold_used:.4g} by model {choice.reason}; wrote "
              f"{paths['mask'].parent}/{case.name}_*")
    return 0


def _resume_state(args: argparse.Namespace, case, choice, paths):
    """(True: done, None: nothing written yet, False: other outputs; why) for --resume."""
    from .core.sharding import outputs_done
    from .core.volume import modality_from_name

    session, settings, guide = _open_session(args, choice.folder)
    images = [p for p in case.paths if modality_from_name(p) != "seg"]
    return outputs_done(paths, session.sha256, settings, images, guide.sha256)


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
    p.add_argument("--baseline", choices=["flair", "none"], default="flair",
                   help="flair (default): a table with the FLAIR-intensity baseline beside the "
                        "model, per kind of case and per case, each at its own best threshold "
                        "too; none: the model's summary only")
    _add_inference_options(p)
    p.set_defaults(func=_run_evaluate)


def _choose_for_data(args: argparse.Namespace) -> Path:
    """The model for ``evaluate``: one that every case's modalities fit."""
    from .core.cases import choose_for_folders
    from .core.data import discover_cases

    folders = discover_cases(args.data)
    if args.cases is not None:
        folders = folders[: args.cases]
    choice = choose_for_folders(folders, args.model)
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
    from .core.evaluate import evaluate, format_baseline_table, format_report
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
    from .core.sharding import current_shard

    shard = current_shard()  # under torchrun: this rank's cases; rank 0 reports them all
    shard.use_device(args.device)
    session, settings, guide = _open_session(args, model_folder)
    classifier_info = guide.record(settings)
    from .core.progress import is_terminal

    bar = _Bar("", not args.no_progress)

    def on_case(i: int, n: int, name: str, which: str) -> None:
        bar.describe(f"{which} {i + 1}/{n} {name}")
        if not is_terminal():  # a log: one line per case instead of the bar
            print(f"{which} {i + 1}/{n} {name}", file=sys.stderr, flush=True)

    try:
        report = evaluate(
            args.data, session.model, session.spec, settings,
            calibration=args.calibration, limit=args.cases,
            calibration_limit=args.calibration_cases,
            model_info=session.model_record(),
            on_case=on_case, on_step=bar,
            classifier=guide.classifier, classifier_info=classifier_info,
            z_stride=args.z_stride, shard=shard,
        )
    finally:
        bar.close()
        shard.close()
    if report is None:  # another rank: its cases are in rank 0's table
        return 0
    if classifier_info is not None:
        print(f"classifier guidance, s={classifier_info['scale']:g}, classifier "
              f"{classifier_info['path']}")
    print(format_report(report))
    if args.baseline == "flair":
        print()
        print(format_baseline_table(report))
    if args.json is not None:
        write_json(report, args.json, inputs, overwrite=args.overwrite)
        print(f"wrote {args.json}")
    return 0


# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="whatishealthy",
        description="Lesion localization with healthy counterfactuals from a guided diffusion "
                    "model. See docs/cli.md.",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    from ._cli_demo import add_demo
    from ._cli_train import add_prepare, add_train, add_train_classifier

    _add_synth(sub)
    add_train(sub)
    add_train_classifier(sub)
    add_prepare(sub)
    _add_localize(sub)
    _add_evaluate(sub)
    add_demo(sub)
    return parser


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    from .core.runtime import Terminated, prefer_passive_omp_wait, sigterm_as_interrupt, tune_allocator

    prefer_passive_omp_wait()  # before torch is imported: see core.runtime
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
        print(f"{prefix}: terminated (SIGTERM); no output set is left half-written", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print(f"{prefix}: interrupted; no output set is left half-written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
