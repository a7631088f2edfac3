"""Choose a model's recommended inference settings by measurement, on a calibration set.

For every (noise level, guidance) pair of the grid, runs the counterfactual on the calibration
cases (every ``--z-stride``-th brain slice, to keep a sweep affordable on a CPU), pools the
difference maps of brain voxels, and reports AUROC, AUPRC, the best-Dice threshold and that
Dice, and the share of brain voxels flagged in healthy slices at that threshold. The calibration
cases must not be the held-out evaluation cases: the chosen threshold is then an honest one.

    python benchmarks/tune.py runs/default/checkpoint data_heldout/calib_s2000 \
        --grid 0.3:3 0.5:1 0.5:3 0.5:5 0.7:3 --steps 10 [--write-spec]

``--write-spec`` stores the best pair (by AUPRC) and its threshold as the checkpoint's
recommended inference settings (spec.json).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("data", help="calibration cases (BraTS layout, with segmentations)")
    parser.add_argument("--grid", nargs="+", default=["0.5:3"], help="noise:guidance pairs")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--refinements", type=int, default=0, help="inversion refinements")
    parser.add_argument("--z-stride", type=int, default=3)
    parser.add_argument("--cases", type=int, default=None)
    parser.add_argument("--write-spec", action="store_true")
    args = parser.parse_args(argv)

    from napari_whatishealthy.core.data import discover_cases
    from napari_whatishealthy.core.metrics import score_summary
    from napari_whatishealthy.core.model import SPEC_FILE, load_checkpoint
    from napari_whatishealthy.core.output import write_json
    from napari_whatishealthy.core.pipeline import LocalizeSettings, localize
    from napari_whatishealthy.core.preprocess import brain_mask, brain_slices, square_box
    from napari_whatishealthy.core.runtime import tune_allocator
    from napari_whatishealthy.core.volume import load_volume

    tune_allocator()
    model = load_checkpoint(args.checkpoint)
    spec = model.spec
    spec.inference.inversion_refinements = args.refinements
    cases = discover_cases(args.data)[: args.cases]
    volumes = [load_volume(c).select(spec.modalities) for c in cases]
    rows = []
    print("| noise L | guidance w | steps | AUROC | AUPRC | best Dice | threshold | healthy flagged % | s/case |")
    print("|---|---|---|---|---|---|---|---|---|")
    for pair in args.grid:
        noise, guidance = (float(v) for v in pair.split(":"))
        settings = LocalizeSettings.from_spec(spec, noise_level=noise, guidance=guidance, steps=args.steps,
                                              device="cpu")
        scores, truths, healthy_scores = [], [], []
        started = time.time()
        for volume in volumes:
            brain = brain_mask(volume.data)
            z_all = brain_slices(brain, square_box(brain)[2])
            z = z_all[:: args.z_stride]
            result = localize(model, spec, volume.data, settings, z_slices=z)
            truth = volume.segmentation > 0
            sel = np.zeros_like(brain)
            sel[..., z] = True
            sel &= result.brain
            scores.append(result.difference[sel])
            truths.append(truth[sel])
            lesion_free = ~truth.any(axis=(0, 1))
            hsel = sel & lesion_free[None, None, :]
            healthy_scores.append(result.difference[hsel])
        per_case = (time.time() - started) / len(volumes)
        s = np.concatenate(scores)
        t = np.concatenate(truths)
        summary = score_summary(s, t)
        h = np.concatenate(healthy_scores)
        flagged = float((h > summary["best_threshold"]).mean()) if h.size else float("nan")
        row = dict(noise=noise, guidance=guidance, steps=settings.steps, **summary, healthy_flagged=flagged,
                   seconds_per_case=per_case)
        rows.append(row)
        print(f"| {noise} | {guidance} | {settings.steps} | {summary['auroc']:.3f} | {summary['auprc']:.3f} | "
              f"{summary['best_dice']:.3f} | {summary['best_threshold']:.4f} | {100 * flagged:.2f} | {per_case:.0f} |",
              flush=True)
    best = max(rows, key=lambda r: r["auprc"])
    print(f"best by AUPRC: noise {best['noise']}, guidance {best['guidance']}, threshold {best['best_threshold']:.4f}")
    if args.write_spec:
        path = Path(args.checkpoint) / SPEC_FILE
        data = json.loads(path.read_text())
        data["inference"].update(noise_level=best["noise"], guidance=best["guidance"], steps=best["steps"],
                                 inversion_refinements=args.refinements,
                                 threshold=round(float(best["best_threshold"]), 4))
        training = data.setdefault("training", {})
        previous = training.get("tuning")
        training["tuning"] = {
            "calibration_data": str(args.data), "z_stride": args.z_stride, "rows": rows,
            "command": "python benchmarks/tune.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            **({"previous": previous} if previous else {}),  # the record of every earlier tuning
        }
        write_json(json.loads(json.dumps(data, sort_keys=True)), path, overwrite=True)  # keys sorted
        print(f"wrote the recommended settings into {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
