"""Scoring options of the anomaly map, measured on held-out cases beside the FLAIR baseline.

The counterfactual of every k-th brain slice of each case is computed once per noise level
(and once with the reference's dynamic normalisation during inversion), cached in model space,
and every option below is scored from those same counterfactuals, on the same voxels:

- ``default``: the plain map: the difference at 64 px, upsampled, 3x3 median per slice. Every
  option reads the difference as the model's spec says (``lesion_contrast``: |input -
  counterfactual|, or only each modality's lesion change);
- ``lesion contrast any`` / ``expected``: the spec's guided map with the other reading;
- ``erode N``: scores only inside the brain mask eroded by N voxels (edge treatment);
- ``model median 5``: the peers' 5x5 median at model resolution instead of 3x3 at full resolution;
- ``full resolution``: |input - upsampled counterfactual| at full resolution (lesion edges);
- ``hysteresis``: the mask grown into neighbouring voxels above half the threshold (edges);
- ``guided rR e-E``: edge-aware upsampling (the pipeline's ``edge_guide_radius``): each
  modality's upsampled difference refitted to its full-resolution image by a guided filter of
  radius R and eps 10^-E, then eroded by 4 as the default;
- ``w=...``: another guidance scale (``--guidance-values``, with every noise level), scored
  plainly and with the guided upsampling (``..., guided r4`` / ``r8`` / ``r12``);
- ``steps=...``: another number of DDIM steps (``--steps-values``), at the default noise level
  and guidance, scored the same ways (fewer steps: fewer network calls, issue 16);
- with ``--z-stride 1`` only (neighbouring slices present): the guided map with the 2D median
  the pipeline uses, a 3D median, or a mean over 3 slices (3D-consistent smoothing);
- ``L=...``: another noise level; ``inversion normalisation``: the reference's inversion;
- ``multi-L mean``: the mean of the maps at all noise levels; its per-voxel standard deviation
  is the uncertainty map, reported as its mean where the mask is wrong against where it is right.

Thresholds: with ``--thresholds calib.json`` (written by a run on the calibration cases with
``--write-thresholds``) each option uses its calibration threshold (held out); the oracle Dice
(best threshold on the evaluated cases) is shown beside, labelled so. Costs are seconds per
whole volume: the counterfactual time per run scaled by the slice stride, plus the option's own
post-processing.

    python benchmarks/score_options.py data_heldout/calib_s2000 --z-stride 4 \\
        --write-thresholds runs/options_calib.json
    python benchmarks/score_options.py data_heldout/test_s1000 --z-stride 4 \\
        --thresholds runs/options_calib.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
from scipy import ndimage


def _counterfactuals(model, spec, prepared, sub, configs, cache: Path | None, case: str,
                     digest: str, device: str = "cpu") -> tuple[dict, dict]:
    from napari_whatishealthy.core.counterfactual import iter_counterfactual
    from napari_whatishealthy.core.settings import LocalizeSettings
    from napari_whatishealthy.core.steps import drain

    out, seconds = {}, {}
    for key, overrides in configs.items():
        tag = hashlib.sha1(json.dumps([digest, case, sub.slice_index.tolist(), overrides],
                                      sort_keys=True).encode()).hexdigest()[:16]
        path = cache / f"{case}_{tag}.npz" if cache else None
        if path is not None and path.exists():
            with np.load(path) as f:
                out[key], seconds[key] = f["healthy"], float(f["seconds"])
            continue
        settings = LocalizeSettings.from_spec(spec, device=device, seed=0, **overrides)
        started = time.time()
        out[key] = drain(iter_counterfactual(model, sub.slices, settings))
        seconds[key] = time.time() - started
        if path is not None:
            np.savez(path, healthy=out[key], seconds=seconds[key])
    return out, seconds


def _map(sub, prepared, input_s, healthy_s, brain_idx, *, median=3, model_median=0,
         full_resolution=False, signs=None) -> np.ndarray:
    """The anomaly map on the processed slices, [X, Y, n]; ``signs``: each channel's lesion
    contrast (``core.anomaly.contrast_signs``; None: |input - counterfactual|)."""
    from napari_whatishealthy.core.anomaly import difference_maps, median_smooth
    from napari_whatishealthy.core.preprocess import to_slices

    if full_resolution:
        norm = prepared.normalised[..., sub.slice_index]  # [C, X, Y, n]
        up = to_slices(sub, healthy_s, fill=-1.0)
        raw = difference_maps(norm, up, 0, signs)[0]
    else:
        per = difference_maps(input_s, healthy_s, 1, signs)[0]  # [n, S, S]
        if model_median > 1:
            per = ndimage.median_filter(per, size=(1, model_median, model_median))
        raw = to_slices(sub, per[:, None], fill=0.0)[0]
    raw = np.maximum(raw, 0.0)
    return median_smooth(raw, median, slice_axis=-1) * brain_idx


def _guided(sub, prepared, input_s, healthy_s, brain_idx, *, radius: int, eps: float,
            median: int = 3, signs=None) -> np.ndarray:
    """Edge-aware upsampling as the pipeline does it (``core.anomaly.edge_guided``): each
    channel's upsampled difference (``signs``: as ``_map``) refitted to that channel's
    full-resolution image, then the channel mean, median filtered, inside the brain."""
    from napari_whatishealthy.core.anomaly import difference_maps, edge_guided, median_smooth
    from napari_whatishealthy.core.preprocess import to_slices

    per = to_slices(sub, difference_maps(input_s, healthy_s, 1, signs)[1], fill=0.0)  # [C, X, Y, n]
    guide = prepared.normalised[..., sub.slice_index].astype(np.float32)  # [C, X, Y, n]
    raw = edge_guided(per, guide, radius, eps).mean(axis=0)
    return median_smooth(raw, median, slice_axis=-1) * brain_idx


def _hysteresis(volume: np.ndarray, threshold: float, brain: np.ndarray, min_voxels: int,
                low: float = 0.5) -> np.ndarray:
    """The mask at ``threshold`` grown into connected voxels above ``low * threshold``."""
    from napari_whatishealthy.core.anomaly import label_components, make_mask

    core = make_mask(volume, threshold, brain_mask=brain, min_component_voxels=min_voxels) > 0
    weak = (volume > low * threshold) & brain
    labels, n = label_components(weak, 1)
    keep = np.zeros(n + 1, bool)
    keep[np.unique(labels[core])] = True
    keep[0] = False
    return keep[labels]


def _masks(make, volume: np.ndarray, threshold: float, brain: np.ndarray, min_voxels: int,
           z_stride: int) -> np.ndarray:
    """The mask of the processed slices [X, Y, n], as on the whole volume: with a stride the
    slices are not neighbours, so each is its own 2D problem (components do not join across)."""
    if z_stride == 1:
        return make(volume, threshold, brain, min_voxels)
    return np.concatenate([make(volume[..., k:k + 1], threshold, brain[..., k:k + 1], min_voxels)
                           for k in range(volume.shape[-1])], axis=-1)


def _dice(masks: list[np.ndarray], truths: list[np.ndarray], members: list[int]) -> tuple[float, float]:
    """Pooled Dice and predicted / true volume over the cases ``members``."""
    tp = sum(int((masks[i] & truths[i]).sum()) for i in members)
    pred = sum(int(masks[i].sum()) for i in members)
    true = sum(int(truths[i].sum()) for i in members)
    return 2 * tp / (pred + true), pred / true


class _Case:
    """What the study needs of a case: images of the model's modalities, seg, name, kind."""

    def __init__(self, data, segmentation, name, kind=None):
        self.data, self.segmentation, self.name, self.kind = data, segmentation, name, kind


def _cases(root: str, modalities: tuple[str, ...], limit: int | None):
    """Case folders (BraTS layout) or ``<name>.npz`` files (``synth_slices.py --eval-cases``)."""
    from napari_whatishealthy.core.data import discover_cases
    from napari_whatishealthy.core.evaluate import case_kinds
    from napari_whatishealthy.core.volume import load_volume

    npz = sorted(Path(root).glob("*.npz"))
    if npz:
        for path in npz[:limit]:
            with np.load(path) as f:
                data = np.stack([f[m].astype(np.float32) for m in modalities])
                yield _Case(data, f["seg"], str(f["name"]), str(f["kind"]))
        return
    kinds = case_kinds(root)
    for d in discover_cases(root)[:limit]:
        v = load_volume(d).select(modalities)
        yield _Case(v.data, v.segmentation, v.name, kinds.get(v.name))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data")
    p.add_argument("--model", default="default")
    p.add_argument("--cases", type=int, default=None)
    p.add_argument("--z-stride", type=int, default=4)
    p.add_argument("--noise-levels", default="0.2,0.3,0.45")
    p.add_argument("--cache", default="/tmp/score_options_cache")
    p.add_argument("--thresholds", default=None, help="calibration thresholds (JSON) to apply")
    p.add_argument("--write-thresholds", default=None, help="write this run's best thresholds")
    p.add_argument("--no-inversion-normalisation", action="store_true")
    p.add_argument("--guidance-values", default="",
                   help="other guidance scales to try (each with every noise level)")
    p.add_argument("--steps-values", default="",
                   help="other DDIM step counts to try, at the default noise level and guidance "
                        "(fewer steps: fewer network calls per slice)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--label", default="", help="a prefix for every printed line")
    p.add_argument("--seconds", type=float, default=None,
                   help="start no new case after this many seconds (the table covers the cases "
                        "done, and says how many)")
    args = p.parse_args(argv)

    import torch

    from napari_whatishealthy.core.anomaly import (
        contrast_signs,
        erode_mask,
        make_mask,
        median_smooth,
    )
    from napari_whatishealthy.core.metrics import auprc, auroc, rank_scores, threshold_sweep
    from napari_whatishealthy.core.pipeline import prepare_input
    from napari_whatishealthy.core.preprocess import normalise
    from napari_whatishealthy.core.registry import load_model_cached, resolve_model

    torch.manual_seed(0)
    folder = resolve_model(args.model)
    model, spec, digest = load_model_cached(folder, args.device)
    levels = [float(v) for v in args.noise_levels.split(",")]
    default_level = float(spec.inference.noise_level)
    if default_level not in levels:
        levels.insert(0, default_level)
    configs = {f"L={lv:g}": {"noise_level": lv} for lv in levels}
    for w in (float(v) for v in args.guidance_values.split(",") if v):
        configs[f"w={w:g}"] = {"noise_level": default_level, "guidance": w}
        for lv in levels:
            if lv != default_level:
                configs[f"L={lv:g} w={w:g}"] = {"noise_level": lv, "guidance": w}
    for k in (int(v) for v in args.steps_values.split(",") if v):
        configs[f"steps={k}"] = {"noise_level": default_level, "steps": k}
    if not args.no_inversion_normalisation:
        configs["inversion normalisation"] = {"noise_level": default_level,
                                              "inversion_normalisation": True}
    # Every option reads the differences as the model's spec says (lesion_contrast); one more
    # option reads them the other way, to compare the two in the same run.
    contrast = str(spec.inference.lesion_contrast)
    other_contrast = "any" if contrast != "any" else "expected"
    signs = contrast_signs(spec.modalities, contrast)
    other_signs = contrast_signs(spec.modalities, other_contrast)
    map_, guided = partial(_map, signs=signs), partial(_guided, signs=signs)
    spec_radius = int(spec.inference.edge_guide_radius) or 8
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    min_voxels = int(spec.inference.min_component_voxels)
    dflt = f"L={default_level:g}"

    options = ["default", "erode 2", "erode 4", "model median 5", "full resolution",
               "hysteresis 0.5", "guided r2 e-2", "guided r4 e-2", "guided r4 e-3",
               "guided r8 e-2"] + [k for k in configs if k != dflt]
    options += [f"{k}, guided r{r}" for k in configs if k != dflt for r in (4, 8, 12)]
    options += ["guided r12 e-2", f"lesion contrast {other_contrast}, guided r{spec_radius}"]
    if args.z_stride == 1:  # neighbouring slices present: smoothing across slices can be scored
        options += ["guided, 2D median (as the pipeline)", "guided, 3D median",
                    "guided, 3-slice mean"]
    if len(levels) > 1:
        options += ["multi-L mean", "multi-L mean, erode 4"]
    if "inversion normalisation" in configs:
        options.append("inversion normalisation, erode 4")
    options.append("FLAIR baseline")
    scores: dict[str, list[np.ndarray]] = {o: [] for o in options}
    volumes: dict[str, list[np.ndarray]] = {o: [] for o in options}  # processed slices, per case
    cost: dict[str, float] = {o: 0.0 for o in options}
    truths, kinds_of, spreads, brains, names = [], [], [], [], []
    net_seconds: dict[str, float] = {k: 0.0 for k in configs}
    started = time.time()
    for i, volume in enumerate(_cases(args.data, tuple(spec.modalities), args.cases)):
        if args.seconds is not None and i and time.time() - started > args.seconds:
            print(f"# {args.label}time budget reached after {i} cases", file=sys.stderr)
            break
        prepared = prepare_input(volume.data, spec)
        z = prepared.slice_index[:: args.z_stride]
        sub = prepared.restrict(z)
        input_s = sub.slices
        healthy, secs = _counterfactuals(model, spec, prepared, sub, configs, cache,
                                         volume.name, digest, args.device)
        for k, v in secs.items():
            net_seconds[k] += v * args.z_stride
        brain = prepared.brain
        brain_idx = brain[..., z]
        maps: dict[str, np.ndarray] = {}
        t0 = time.time()
        maps["default"] = map_(sub, prepared, input_s, healthy[dflt], brain_idx)
        cost["default"] += time.time() - t0
        for e in (2, 4):
            t0 = time.time()
            eroded = erode_mask(brain, e)[..., z]
            maps[f"erode {e}"] = maps["default"] * eroded
            cost[f"erode {e}"] += time.time() - t0
        t0 = time.time()
        maps["model median 5"] = map_(sub, prepared, input_s, healthy[dflt], brain_idx, median=1,
                                      model_median=5)
        cost["model median 5"] += time.time() - t0
        t0 = time.time()
        maps["full resolution"] = map_(sub, prepared, input_s, healthy[dflt], brain_idx,
                                       full_resolution=True)
        cost["full resolution"] += time.time() - t0
        maps["hysteresis 0.5"] = maps["default"]
        if args.z_stride == 1:
            # 3D-consistent smoothing: the counterfactual is made slice by slice, so its
            # slice-to-slice jitter could be averaged out across neighbouring slices.
            t0 = time.time()
            raw = guided(sub, prepared, input_s, healthy[dflt], brain_idx, radius=spec_radius,
                         eps=1e-2, median=1)
            eroded = brain_idx * erode_mask(brain, 4)[..., z]
            maps["guided, 2D median (as the pipeline)"] = median_smooth(raw, 3, slice_axis=-1) * eroded
            maps["guided, 3D median"] = median_smooth(raw, 3, slice_axis=None) * eroded
            cost["guided, 3D median"] += time.time() - t0
            mean3 = ndimage.uniform_filter1d(median_smooth(raw, 3, slice_axis=-1), 3, axis=-1)
            maps["guided, 3-slice mean"] = mean3 * eroded
        eroded4 = erode_mask(brain, 4)[..., z]
        for name, r, e in (("guided r2 e-2", 2, 1e-2), ("guided r4 e-2", 4, 1e-2),
                           ("guided r4 e-3", 4, 1e-3), ("guided r8 e-2", 8, 1e-2),
                           ("guided r12 e-2", 12, 1e-2)):
            t0 = time.time()
            maps[name] = guided(sub, prepared, input_s, healthy[dflt], brain_idx, radius=r,
                                 eps=e) * eroded4
            cost[name] += time.time() - t0
        t0 = time.time()
        maps[f"lesion contrast {other_contrast}, guided r{spec_radius}"] = _guided(
            sub, prepared, input_s, healthy[dflt], brain_idx, radius=spec_radius, eps=1e-2,
            signs=other_signs) * eroded4
        cost[f"lesion contrast {other_contrast}, guided r{spec_radius}"] += time.time() - t0
        level_maps = []
        for key in configs:
            t0 = time.time()
            m = maps["default"] if key == dflt else map_(sub, prepared, input_s, healthy[key],
                                                         brain_idx)
            if key != dflt:
                maps[key] = m
                cost[key] += time.time() - t0
                for r in (4, 8, 12):
                    maps[f"{key}, guided r{r}"] = guided(sub, prepared, input_s, healthy[key],
                                                          brain_idx, radius=r, eps=1e-2) * eroded4
            if key.startswith("L=") and " w=" not in key:
                level_maps.append(m)
        if "inversion normalisation" in maps:
            maps["inversion normalisation, erode 4"] = (maps["inversion normalisation"]
                                                        * erode_mask(brain, 4)[..., z])
        stack = np.stack(level_maps)
        t0 = time.time()
        maps["multi-L mean"] = stack.mean(axis=0)
        cost["multi-L mean"] = cost.get("multi-L mean", 0.0) + time.time() - t0
        maps["multi-L mean, erode 4"] = maps["multi-L mean"] * erode_mask(brain, 4)[..., z]
        spread = stack.std(axis=0)
        flair, _ = normalise(volume.data[[spec.modalities.index("flair")]], brain)
        maps["FLAIR baseline"] = median_smooth(flair[0][..., z], 3, slice_axis=-1) * brain_idx

        seg = volume.segmentation[..., z] > 0
        vox = brain_idx
        truths.append(seg[vox])
        kinds_of.append(volume.kind or ("lesion" if seg.any() else "healthy"))
        spreads.append(spread[vox])
        names.append(volume.name)
        # Only the processed slices are kept ([X, Y, n]; a full grid per option and case ran
        # a 20-case study out of memory); _masks labels them as the full volume would.
        brains.append(brain_idx)
        for o in options:
            scores[o].append(maps[o][vox].astype(np.float32))
            volumes[o].append(np.ascontiguousarray(maps[o], dtype=np.float32))
        print(f"# {args.label}{i + 1} {volume.name} ({kinds_of[-1]}): "
              + ", ".join(f"{k} {v:.0f} s" for k, v in secs.items()), file=sys.stderr, flush=True)

    given = json.loads(Path(args.thresholds).read_text()) if args.thresholds else None
    groups = {"all": [i for i, t in enumerate(truths) if t.any()]}
    for i, k in enumerate(kinds_of):
        groups.setdefault(k, []).append(i)
    n = len(names)
    best: dict[str, float] = {}
    print(f"model: {folder} (sha256 {digest[:12]}), data: {args.data} ({n} cases), every "
          f"{args.z_stride}th brain slice; thresholds: "
          + ("calibration (" + args.thresholds + ")" if given else "best on these cases (oracle)"))
    print()
    print("| option | group | AUPRC | Dice (calibrated) | Dice (oracle) | predicted/true volume "
          "| healthy flagged % | s/volume |")
    print("|---|---|---|---|---|---|---|---|")
    uncertainty_rows = []
    for o in options:
        all_scores = np.concatenate([scores[o][i] for i in range(n)])
        all_truth = np.concatenate(truths)
        if not all_truth.any():
            print(f"| {o} | no lesion voxels in these cases | | | | | | |")
            continue
        t_oracle, _, _ = threshold_sweep(rank_scores(all_scores, all_truth))
        best[o] = float(t_oracle)
        t_cal = float(given[o]) if given and o in given else float(t_oracle)
        base = "FLAIR baseline" if o == "FLAIR baseline" else None
        masks_cal, masks_or = [], []
        for i in range(n):
            if o == "hysteresis 0.5":
                mc = _masks(_hysteresis, volumes[o][i], t_cal, brains[i], min_voxels, args.z_stride)
                mo = _masks(_hysteresis, volumes[o][i], t_oracle, brains[i], min_voxels,
                            args.z_stride)
            else:
                mc = _masks(make_mask, volumes[o][i], t_cal, brains[i], min_voxels, args.z_stride) > 0
                mo = _masks(make_mask, volumes[o][i], t_oracle, brains[i], min_voxels,
                            args.z_stride) > 0
            masks_cal.append(mc[brains[i]])
            masks_or.append(mo[brains[i]])
        if o == "multi-L mean, erode 4":  # the spread where the (default-like) mask is wrong
            wrong = np.concatenate([m != t for m, t in zip(masks_cal, truths, strict=True)])
            sp = np.concatenate(spreads)
            right_lesion = np.concatenate([m & t for m, t in zip(masks_cal, truths, strict=True)])
            uncertainty_rows.append((float(sp[wrong].mean()) if wrong.any() else float("nan"),
                                     float(sp[~wrong].mean()),
                                     float(sp[right_lesion].mean()) if right_lesion.any() else float("nan"),
                                     auroc(rank_scores(sp, wrong)) if wrong.any() else float("nan")))
        per_volume = (sum(net_seconds.values()) if o.startswith("multi-L") else
                      net_seconds.get(o.split(",")[0], net_seconds[dflt])) / max(n, 1)
        per_volume += cost.get(o, 0.0) * args.z_stride / max(n, 1)
        for group, members in groups.items():
            if group == "healthy" or not members:
                continue
            s_g = np.concatenate([scores[o][i] for i in members])
            t_g = np.concatenate([truths[i] for i in members])
            if not t_g.any():
                continue
            d_cal, ratio = _dice(masks_cal, truths, members)
            d_or, _ = _dice(masks_or, truths, members)
            healthy = groups.get("healthy", [])
            flagged = (100 * sum(int(masks_cal[i].sum()) for i in healthy)
                       / max(sum(truths[i].size for i in healthy), 1)) if healthy else float("nan")
            print(f"| {o} | {group} ({len(members)}) | {auprc(rank_scores(s_g, t_g)):.3f} | "
                  f"{d_cal:.3f} | {d_or:.3f} | {ratio:.2f} | {flagged:.2f} | "
                  f"{'-' if base else f'{per_volume:.1f}'} |")
    if uncertainty_rows:
        w, r, tp, a = uncertainty_rows[0]
        print()
        print(f"uncertainty (std of the map over noise levels {levels}), multi-L mask at its "
              f"threshold: mean {w:.4f} where the mask is wrong, {r:.4f} where it is right "
              f"({tp:.4f} on correctly found lesion voxels); AUROC of the spread for 'mask wrong' "
              f"{a:.3f}")
    print(f"best-Dice thresholds on these cases: {json.dumps({k: round(v, 5) for k, v in best.items()})}")
    if args.write_thresholds:
        Path(args.write_thresholds).write_text(json.dumps(best, indent=1))
        print(f"wrote {args.write_thresholds}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
