"""Quality: the counterfactual method against baselines on the same held-out cases, in one run.

Methods (each through ``core.evaluate``, the code behind ``whatishealthy evaluate``):
- ``counterfactual``: the model's recommended settings (guidance toward "healthy");
- ``unguided (w=0)``: the same inversion and decoding with guidance 0, i.e. plain reconstruction
  (the healthy-only approach: whatever the model reconstructs badly is called anomalous);
- ``FLAIR intensity``: normalised FLAIR as the score, the strong baseline on bright lesions;
- ``classifier guidance (s=...)``, with ``--classifier PATH``: the same inversion, decoding with
  the null label guided by a noisy-image classifier (Diff-SCM's earlier method; see
  docs/classifier-guidance.md), at the classifier's recommended scale or ``--classifier-scale``.

``--sweep`` adds a row per guidance scale of each method: classifier-free ``w`` over
``--implicit-scales`` and, with a classifier, ``s`` over ``--classifier-scales``.

Thresholds: ``default`` (the model's recommended value; 1.0 x the brain 99th percentile for
FLAIR), ``calibrated`` (best Dice on the separate ``--calibration`` cases) and ``oracle`` (best Dice
on the evaluated cases: optimistic, for comparison with papers that report it).

    python benchmarks/quality.py data_heldout/test_s1000 --calibration data_heldout/calib_s2000
    python benchmarks/quality.py data_heldout/test_s1000 --calibration data_heldout/calib_s2000 \
        --classifier runs/classifier --sweep
    python benchmarks/quality.py --tiny     # smoke test on tiny synthetic data with a tiny model

Prints a markdown table (pooled over cases, per group: all / typical / subtle, and the share of
brain voxels flagged in healthy controls) and the time per volume; ``--json`` keeps everything.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path


def _tiny_setup(root: Path):
    """Tiny cases and a tiny random checkpoint for the smoke test."""
    import torch

    from napari_whatishealthy.core.model import ModelSpec, NetworkSpec, build_model, save_checkpoint
    from napari_whatishealthy.core.synthetic import synthesise

    synthesise(root / "eval", 3, seed=5, healthy_fraction=0.34, voxel_size=6.0)
    synthesise(root / "calib", 2, seed=6, healthy_fraction=0.0, voxel_size=6.0)
    torch.manual_seed(0)
    spec = ModelSpec(image_size=16, network=NetworkSpec(channels=(8, 16), attention_levels=(False, True),
                                                        norm_num_groups=8, num_head_channels=8,
                                                        label_embedding_dim=8))
    spec.inference.steps = 2
    model = build_model(spec)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    save_checkpoint(model, root / "model", spec)
    from napari_whatishealthy.core.classifier import (
        ClassifierNetworkSpec,
        ClassifierSpec,
        build_classifier,
        save_classifier,
    )

    cspec = ClassifierSpec(image_size=16, network=ClassifierNetworkSpec(
        channels=(8, 16), attention_levels=(False, True), norm_num_groups=8, num_head_channels=8))
    save_classifier(build_classifier(cspec).eval(), root / "classifier", cspec)
    return root / "eval", root / "calib", root / "model", root / "classifier"


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", nargs="?", help="held-out cases (BraTS layout with segmentations)")
    parser.add_argument("--calibration", default=None, help="separate cases to calibrate thresholds on")
    parser.add_argument("--model", default="default")
    parser.add_argument("--cases", type=int, default=None, help="evaluate only the first N cases")
    parser.add_argument("--json", default=None, help="write the full reports here")
    parser.add_argument("--main-only", action="store_true",
                        help="only the model's recommended settings (and the FLAIR baseline): to "
                             "compare models")
    parser.add_argument("--classifier-only", action="store_true",
                        help="only the classifier-guidance rows (and the FLAIR baseline): to "
                             "choose a classifier's scale on a calibration set")
    parser.add_argument("--z-stride", type=int, default=1,
                        help="run and score every k-th brain slice only (all methods on the same "
                             "voxels; a sweep at 1/k of the cost)")
    parser.add_argument("--tiny", action="store_true", help="smoke test: tiny data and model")
    parser.add_argument("--classifier", default=None,
                        help="a noisy-image classifier checkpoint: adds classifier-guidance rows")
    parser.add_argument("--classifier-scale", type=float, default=None,
                        help="classifier guidance scale s of the main row (default: the "
                             "classifier's recommended scale)")
    parser.add_argument("--sweep", action="store_true",
                        help="a row per guidance scale of each method (see the scales below)")
    parser.add_argument("--implicit-scales", type=_floats, default=[1.0, 3.0, 5.0, 8.0],
                        help="classifier-free w values of the sweep (default 1,3,5,8)")
    parser.add_argument("--classifier-scales", type=_floats, default=[5.0, 10.0, 30.0, 100.0],
                        help="classifier guidance s values of the sweep (default 5,10,30,100)")
    args = parser.parse_args(argv)

    import torch

    from napari_whatishealthy.core.evaluate import evaluate, format_baseline_table
    from napari_whatishealthy.core.pipeline import LocalizeSettings
    from napari_whatishealthy.core.registry import load_model_cached, resolve_model
    from napari_whatishealthy.core.runtime import tune_allocator

    tune_allocator()
    classifier_path = args.classifier
    if args.tiny:
        data, calibration, model_path, tiny_classifier = _tiny_setup(
            Path(tempfile.mkdtemp(prefix="whatishealthy-quality-")))
        classifier_path = classifier_path or tiny_classifier
    else:
        if not args.data:
            parser.error("give the held-out data folder (or --tiny)")
        data, calibration, model_path = Path(args.data), args.calibration, resolve_model(args.model)
    model, spec, digest = load_model_cached(model_path, "cpu")
    classifier, classifier_info = None, None
    if classifier_path is not None:
        from napari_whatishealthy.core.classifier import (
            check_compatible,
            load_classifier_cached,
            resolve_scale,
        )

        classifier, cspec, csha = load_classifier_cached(classifier_path, "cpu")
        check_compatible(cspec, spec)
        classifier_info = {"path": str(classifier_path), "sha256": csha}
    recommended = LocalizeSettings.from_spec(spec, device="cpu")
    level = f"L={recommended.noise_level:g}"
    if args.classifier_only and classifier_path is None:
        parser.error("--classifier-only needs --classifier")
    runs = {} if args.classifier_only else {
        f"counterfactual (w={recommended.guidance:g}, {level})": recommended,
        "unguided reconstruction (w=0)": LocalizeSettings.from_spec(spec, device="cpu", guidance=0.0),
    }
    if args.main_only:
        runs.pop("unguided reconstruction (w=0)", None)
    if args.sweep and not args.classifier_only:
        for w in args.implicit_scales:
            if w not in (recommended.guidance, 0.0):
                runs[f"counterfactual (w={w:g}, {level})"] = LocalizeSettings.from_spec(
                    spec, device="cpu", guidance=w)
    if classifier is not None:
        s_main = resolve_scale(args.classifier_scale, classifier)
        scales = [s_main] + ([s for s in args.classifier_scales if s != s_main] if args.sweep else [])
        for s in scales:
            runs[f"classifier guidance (s={s:g}, {level})"] = LocalizeSettings.from_spec(
                spec, device="cpu", method="classifier", classifier_scale=s)
    reports = {}
    seconds = {}
    for name, settings in runs.items():
        started = time.time()
        guided = settings.method == "classifier"
        report = evaluate(data, model, spec, settings, calibration=calibration, limit=args.cases,
                          z_stride=args.z_stride,
                          model_info={"path": str(model_path), "sha256": digest},
                          classifier=classifier if guided else None,
                          classifier_info=dict(classifier_info or {}, scale=settings.classifier_scale)
                          if guided else None)
        n_cases = len(report["cases"])
        per_case = [c["seconds"] for c in report["cases"]]
        seconds[name] = sum(per_case) / max(len(per_case), 1)
        reports[name] = report
        print(f"# {name}: {n_cases} cases evaluated in {time.time() - started:.0f} s", file=sys.stderr)

    print(f"model: {model_path} (sha256 {digest[:12]}), data: {data}, calibration: {calibration}"
          + (f", every {args.z_stride}th brain slice" if args.z_stride > 1 else ""))
    if classifier_info:
        print(f"classifier: {classifier_info['path']} (sha256 {classifier_info['sha256'][:12]})")
    print(f"machine: {os.cpu_count()} CPU cores ({platform.machine()}), torch {torch.__version__}")
    print()
    print("| method | group | cases | AUROC | AUPRC | Dice default | Dice calibrated | Dice oracle "
          "| predicted/true volume | s/volume |")
    print("|---|---|---|---|---|---|---|---|---|---|")

    def fmt(v):
        return "-" if v is None else f"{v:.3f}"

    rows = []
    for name, report in reports.items():
        rows.append((name, "counterfactual", report, seconds[name]))
    # The FLAIR baseline does not depend on the diffusion settings: take it from the first report.
    first = next(iter(reports.values()))
    rows.append(("FLAIR intensity", "flair_baseline", first, None))
    for name, method, report, secs in rows:
        for group, g in report["pooled"][method].items():
            if group == "healthy":
                continue
            d = g["dice"]
            print(f"| {name} | {group} | {g['cases']} | {fmt(g['auroc'])} | {fmt(g['auprc'])} | "
                  f"{fmt(d['default'])} | {fmt(d['calibrated'])} | {fmt(d['oracle'])} | "
                  f"{fmt(g.get('volume_ratio', {}).get('default'))} | "
                  f"{'-' if secs is None else f'{secs:.1f}'} |")
    print()
    print("healthy controls, % of brain voxels flagged (default / calibrated / oracle threshold):")
    for name, method, report, _ in rows:
        hc = report["healthy_controls"]
        if hc["cases"]:
            f = hc["flagged_fraction"][method]
            parts = " / ".join("-" if f[k] is None else f"{100 * f[k]:.2f}"
                               for k in ("default", "calibrated", "oracle"))
            print(f"  {name}: {parts}  ({hc['cases']} cases)")
    # Every run beside the FLAIR baseline, per kind and per case (best thresholds labelled).
    for name, report in reports.items():
        print()
        print(f"### {name} beside the FLAIR-intensity baseline")
        print(format_baseline_table(report))
    thresholds = first["thresholds"]["counterfactual"]
    print("thresholds (counterfactual): " + ", ".join(
        f"{k} {'per case' if v['per_case'] else round(v['value'], 4)}" for k, v in thresholds.items()))
    if args.json:
        Path(args.json).write_text(json.dumps(reports, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
