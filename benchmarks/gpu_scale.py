"""GPU scale check (under a minute): training steps/s and peak GPU memory of one rank training
from the slice store, at 64 px and 128 px, batch 128 and 256. On a GPU the training slices are
copied onto it when they fit a quarter of its free memory (``slice_store.resident_on_device``);
one more row at 64 px / batch 256 streams every batch from the store instead, as a cohort too
large for the GPU does (same run, same GPU).

    bash benchmarks/gpu_scale.sh                       # CUDA
    DEVICE=cpu QUICK=1 bash benchmarks/gpu_scale.sh    # smoke test on a CPU: tiny model, seconds

Environment: ``DEVICE`` (default ``cuda``), ``QUICK=1`` (tiny model, tiny phantoms),
``BUDGET`` (seconds, default 50: rows that would start after it are skipped and say so),
``CASES`` (phantom cases, default 8), ``BUILD_CASES`` (cases of the 1-vs-2-process store
build, default 32: the phantoms again under new names).

Data: phantom cases (benchmarks/_cohort.py: ellipsoid brains with lesion blobs, 120 x 120 x 78,
the BraTS field of view at 2 mm), made in the run; the slice store is built from them with all
cores. Training: ``core.train.train`` itself (the loop users run: balanced sampling from the
store, label dropout, bf16 autocast, AdamW, EMA), the default network (channels 32, 64, 128;
3.9 M parameters) at both sizes; 30 steps per row, the rate of the last 20 (the first 10 hold
the warm-up). Peak GPU memory: ``torch.cuda.max_memory_allocated`` over the row.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cohort import MODALITIES, make_cohort  # noqa: E402

QUICK = os.environ.get("QUICK", "0") == "1"
DEVICE = os.environ.get("DEVICE", "cuda")
BUDGET_S = float(os.environ.get("BUDGET", "50"))
CASES = int(os.environ.get("CASES", "4" if QUICK else "8"))
BUILD_CASES = int(os.environ.get("BUILD_CASES", "8" if QUICK else "32"))
T0 = time.perf_counter()


def network():
    from napari_whatishealthy.core.model import NetworkSpec

    if QUICK:
        return NetworkSpec(channels=(8, 16), attention_levels=(False, True), norm_num_groups=8,
                           num_head_channels=8, label_embedding_dim=8)
    return NetworkSpec()


def train_row(data: Path, work: Path, store: Path, size: int, batch: int, streamed: bool,
              steps: int, every: int) -> dict:
    from napari_whatishealthy.core import trainer
    from napari_whatishealthy.core.train import TrainConfig, read_log, train

    out = work / f"run-{size}-{batch}-{'streamed' if streamed else 'default'}"
    config = TrainConfig(
        data=str(data), out=str(out), size=size, modalities=MODALITIES, steps=steps,
        batch=batch, log_every=every, val_every=10**9, checkpoint_every=10**9, device=DEVICE,
        network=network(), store=str(store), seed=0,
    )
    resident = trainer.resident_on_device
    if streamed:  # as for a cohort too large for the GPU: every batch read from the store
        trainer.resident_on_device = lambda *a, **k: None
    if DEVICE.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    try:
        train(config, log=lambda *_: None, show_progress=False)
    finally:
        trainer.resident_on_device = resident
    wall = time.perf_counter() - started
    records = read_log(out)
    rates = [r["slices_per_s"] / batch for r in records[1:]] or [records[-1]["slices_per_s"] / batch]
    peak = torch.cuda.max_memory_allocated() / 2**30 if DEVICE.startswith("cuda") else None
    on_gpu = DEVICE.startswith("cuda") and not streamed
    return {"size": size, "batch": batch,
            "data": "store, streamed per batch" if not on_gpu else "store, copied to the GPU",
            "steps_per_s": statistics.median(rates), "peak_gpu_gib": peak, "wall_s": wall,
            "loss": records[-1]["loss"]}


def main() -> int:
    from napari_whatishealthy.core.data import discover_cases
    from napari_whatishealthy.core.slice_store import Preprocessing, default_workers, open_or_build

    if DEVICE.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("DEVICE=cuda but torch sees no CUDA GPU; run with DEVICE=cpu QUICK=1 to test")
    # The GPU's name after the stores are built: CUDA is not started before the build's
    # workers are forked.
    print(f"device: {DEVICE}, torch {torch.__version__}, python "
          f"{platform.python_version()}, {os.cpu_count()} CPU cores"
          + (", QUICK=1 (tiny model and phantoms: a smoke test)" if QUICK else ""), flush=True)
    sizes = (16, 32) if QUICK else (64, 128)
    batches = (8, 16) if QUICK else (128, 256)
    steps, every = (6, 2) if QUICK else (30, 10)
    shape = (40, 40, 26) if QUICK else (120, 120, 78)
    rows: list[dict] = []
    skipped: list[str] = []
    with tempfile.TemporaryDirectory(prefix="gpu-scale-") as tmp:
        work = Path(tmp)
        t = time.perf_counter()
        make_cohort(work / "data", CASES, shape=shape, unique=CASES)
        cases = discover_cases(work / "data")
        print(f"{CASES} phantom cases {shape[0]}x{shape[1]}x{shape[2]} made in "
              f"{time.perf_counter() - t:.1f} s", flush=True)
        # The store build with 1 and 2 processes on an unshared machine (issue 13's target:
        # >= 1.7x), on BUILD_CASES cases (the phantoms again under new names), 64 px.
        build_cases = make_cohort(work / "build", BUILD_CASES, shape=shape, unique=CASES)
        for path in (work / "build").rglob("*.nii.gz"):
            path.read_bytes()  # both builds find the files in the file cache
        build_s = {}
        for workers in (1, 2):
            t = time.perf_counter()
            open_or_build(work / f"build-store-{workers}", build_cases,
                          Preprocessing(sizes[0], MODALITIES), workers=workers,
                          log=lambda *_: None, show_progress=False)
            build_s[workers] = time.perf_counter() - t
        print(f"store build, {BUILD_CASES} cases at {sizes[0]} px: 1 process {build_s[1]:.2f} s, "
              f"2 processes {build_s[2]:.2f} s: {build_s[1] / build_s[2]:.2f}x", flush=True)
        stores = {}
        for size in sizes:
            t = time.perf_counter()
            store = open_or_build(work / f"store{size}", cases, Preprocessing(size, MODALITIES),
                                  workers=default_workers(), log=lambda *_: None,
                                  show_progress=False)
            stores[size] = work / f"store{size}"
            print(f"slice store {size} px: {len(store)} slices, {store.nbytes / 2**20:.1f} MiB, "
                  f"built in {time.perf_counter() - t:.1f} s with {default_workers()} processes",
                  flush=True)
        if DEVICE.startswith("cuda"):
            print(f"GPU: {torch.cuda.get_device_name(0)}", flush=True)
        plan = [(s, b, False) for s in sizes for b in batches] + [(sizes[0], batches[-1], True)]
        for size, batch, streamed in plan:
            label = f"{size} px, batch {batch}" + (", streamed from the store" if streamed else "")
            if time.perf_counter() - T0 > BUDGET_S:
                skipped.append(label)
                continue
            try:
                row = train_row(work / "data", work, stores[size], size, batch, streamed,
                                steps, every)
            except Exception as exc:  # one failing row (out of memory, ...) keeps the others
                print(f"  {label}: failed: {type(exc).__name__}: {exc}", flush=True)
                skipped.append(f"{label} (failed: {type(exc).__name__})")
                continue
            rows.append(row)
            print(f"  {label}: {row['steps_per_s']:.2f} steps/s ({row['wall_s']:.1f} s)",
                  flush=True)

    print()
    print("| image size | batch | data | steps/s | slices/s | peak GPU memory (GiB) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        mem = f"{r['peak_gpu_gib']:.2f}" if r["peak_gpu_gib"] is not None else "n/a (CPU)"
        print(f"| {r['size']} | {r['batch']} | {r['data']} | {r['steps_per_s']:.2f} | "
              f"{r['steps_per_s'] * r['batch']:.0f} | {mem} |")
    for label in skipped:
        why = "" if "failed" in label else f": skipped, past the {BUDGET_S:.0f} s budget"
        print(f"| {label}{why} | | | | | |")
    same = [r for r in rows if r["size"] == sizes[0] and r["batch"] == batches[-1]]
    if len(same) == 2:
        print(f"\nstreamed / default steps/s at {sizes[0]} px, batch {batches[-1]}: "
              f"{same[1]['steps_per_s'] / same[0]['steps_per_s']:.2f}")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"peak RSS of this process (whole run): {rss:.2f} GiB; total {time.perf_counter() - T0:.1f} s")
    print("gpu_scale_rows " + json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
