"""Synthesise training cases straight into model-space slices, in parallel (no NIfTI files).

For a GPU session with minutes to spend: the cases are exactly those of
``whatishealthy synth DIR --cases N --seed S`` (same plan, same generator), but each worker
process renders a case, prepares it as ``train`` would (int16 storage rounding, brain
normalisation, 64 px axial slices) and returns the slices, skipping the gzip writing and reading
that would take most of the time. Each model's slices go to ``OUT/<name>/slices.npz``, the
cache file ``whatishealthy train DATA --out OUT/<name>`` reads instead of DATA; ``DATA``'s
``cases.json`` records which cases were made.

A deadline (``--seconds``) keeps what is finished by then, so synthesis cannot eat the training
budget; the table of cases in ``cases.json`` lists only the cases used.

    python benchmarks/synth_slices.py WORK --cases 192 --seed 100 --workers 16 --seconds 70 \\
        --model default:flair,t1,t1ce,t2 --model flair:flair
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict
from pathlib import Path

import numpy as np


def _init_worker() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)


def case_slices(name: str, kind: str, case_seed: int, voxel_size: float,
                models: dict[str, tuple[str, ...]], size: int):
    """One case's (slices, labels) per model, as ``train`` would make them from its files."""
    from napari_whatishealthy.core.data import slice_labels
    from napari_whatishealthy.core.preprocess import prepare
    from napari_whatishealthy.core.synthetic import make_case

    images, seg, _, info = make_case(name, case_seed, kind, voxel_size)
    # The files store int16: round as they do, so that these slices equal the files' slices.
    stored = {m: np.rint(a).astype(np.int16).astype(np.float32) for m, a in images.items()}
    out = {}
    for model, modalities in models.items():
        prepared = prepare(np.stack([stored[m] for m in modalities]), size)
        out[model] = (prepared.slices.astype(np.float16), slice_labels(seg, prepared.slice_index))
    return out, asdict(info)


def eval_case(name: str, kind: str, case_seed: int, voxel_size: float, out: str) -> str:
    """One held-out case as ``out/<name>.npz`` (int16 images as the files store them, the
    segmentation, its kind): what ``score_options.py`` reads without NIfTI files."""
    from napari_whatishealthy.core.synthetic import make_case

    images, seg, _, info = make_case(name, case_seed, kind, voxel_size)
    stored = {m: np.rint(a).astype(np.int16) for m, a in images.items()}
    np.savez(Path(out) / f"{name}.npz", **stored, seg=seg.astype(np.uint8), kind=kind, name=name)
    return name


def build_eval(out: Path, cases: int, seed: int, workers: int, seconds: float,
               voxel_size: float = 1.0, prefix: str = "Synth") -> int:
    """The cases of ``whatishealthy synth OUT --cases N --seed S`` as npz files, in parallel."""
    from napari_whatishealthy.core.synthetic import plan_cases

    out.mkdir(parents=True, exist_ok=True)
    plan = plan_cases(cases, seed, 0.2, 0.3, prefix)
    started = time.time()
    with ProcessPoolExecutor(max_workers=workers, initializer=_init_worker) as pool:
        futures = [pool.submit(eval_case, name, kind, case_seed, voxel_size, str(out))
                   for name, kind, case_seed in plan]
        done, _ = wait(futures, timeout=seconds)
    print(f"synth: {len(done)}/{cases} held-out cases (seed {seed}) in {out}, "
          f"{time.time() - started:.0f} s", flush=True)
    return len(done)


def build(work: Path, cases: int, seed: int, workers: int, seconds: float,
          models: dict[str, tuple[str, ...]], size: int = 64, voxel_size: float = 1.0,
          healthy_fraction: float = 0.2, subtle_fraction: float = 0.3) -> int:
    """Write WORK/<model>/slices.npz per model and WORK/data/cases.json; return cases used."""
    from napari_whatishealthy.core.data import SliceSet, save_slice_set
    from napari_whatishealthy.core.synthetic import GENERATOR_VERSION, plan_cases

    plan = plan_cases(cases, seed, healthy_fraction, subtle_fraction)
    started = time.time()
    results: dict[int, tuple] = {}
    pool = ProcessPoolExecutor(max_workers=workers, initializer=_init_worker)
    futures = {pool.submit(case_slices, name, kind, case_seed, voxel_size, models, size): i
               for i, (name, kind, case_seed) in enumerate(plan)}
    pending = set(futures)
    while pending:
        left = seconds - (time.time() - started)
        if left <= 0:
            break
        done, pending = wait(pending, timeout=left, return_when=FIRST_COMPLETED)
        for future in done:
            results[futures[future]] = future.result()
        print(f"synth: {len(results)}/{cases} cases, {time.time() - started:.0f} s", flush=True)
    processes = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    if pending:
        for process in processes:
            process.terminate()  # a case still rendering at the deadline is dropped
    used = sorted(results)
    if not used:
        raise SystemExit("synth: no case finished before the deadline; raise --seconds")
    for model in models:
        parts = [results[i][0][model] for i in used]
        slice_set = SliceSet(
            slices=np.concatenate([p[0] for p in parts]),
            labels=np.concatenate([p[1] for p in parts]),
            case_of_slice=np.concatenate([np.full(len(p[1]), k, np.int64) for k, p in enumerate(parts)]),
            cases=[plan[i][0] for i in used],
        )
        folder = work / model
        folder.mkdir(parents=True, exist_ok=True)
        save_slice_set(slice_set, folder / "slices.npz")
        print(f"synth: {model}: {len(slice_set)} slices {slice_set.counts()}", flush=True)
    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    (data / "cases.json").write_text(json.dumps({
        "generator": "napari-whatishealthy synthetic (benchmarks/synth_slices.py, slices only)",
        "generator_version": GENERATOR_VERSION, "seed": seed, "planned": cases,
        "voxel_size_mm": voxel_size, "healthy_fraction": healthy_fraction,
        "subtle_fraction": subtle_fraction, "seconds": round(time.time() - started, 1),
        "cases": [results[i][1] for i in used],
    }, indent=1))
    return len(used)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("work", type=Path)
    p.add_argument("--cases", type=int, default=192)
    p.add_argument("--seed", type=int, default=100)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--seconds", type=float, default=70.0, help="keep the cases finished by then")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--voxel-size", type=float, default=1.0)
    p.add_argument("--model", action="append", default=[], metavar="NAME:MODALITIES",
                   help="e.g. default:flair,t1,t1ce,t2 (repeat per model)")
    p.add_argument("--eval-cases", action="store_true",
                   help="write held-out cases as WORK/<name>.npz (images, seg, kind) instead")
    args = p.parse_args(argv)
    if args.eval_cases:
        build_eval(args.work, args.cases, args.seed, args.workers, args.seconds, args.voxel_size)
        return 0
    if not args.model:
        p.error("give --model NAME:MODALITIES (or --eval-cases)")
    models = {}
    for item in args.model:
        name, _, mods = item.partition(":")
        models[name] = tuple(m for m in mods.split(",") if m)
    n = build(args.work, args.cases, args.seed, args.workers, args.seconds, models, args.size,
              args.voxel_size)
    print(f"synth: {n} cases ready", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
