"""Scale: the slice store against the in-RAM path, on phantom cohorts of 20, 80 and 200 cases.

    python benchmarks/scale.py              # the full run (about 10 min on 2 cores)
    python benchmarks/scale.py --quick      # a smoke test (tiny cohorts, under a minute)

Measured in one run, on the same cohorts:

1. **Store build**: seconds and MiB to build the 64 px store with 1 and with 2 processes (the
   best of ``--repeats`` fresh builds each, alternating which goes first, the input files read
   once before so that both find them in the file cache), and 128 px for the smallest cohort.
2. **Training**: ``whatishealthy train``'s loop (``core.train.train``, the default network,
   batch 16 per rank) with 1 and 2 ranks (``torchrun``, gloo), reading from the store or with
   the store loaded into RAM on every rank (``--in-memory``, the earlier behaviour): steps/s of
   rank 0 (after the first log interval) and the peak resident memory (``ru_maxrss``) of every
   rank. Each run is a fresh process, so the peak is that run's.
3. **Extrapolation to BraTS 2021** (1,251 cases, 240 x 240 x 155): slices per case and build
   seconds per case are measured on BraTS-size phantoms; the rest scales linearly from the
   measured rows. Every extrapolated number is marked as such.

Cohorts: ``benchmarks/_cohort.py`` phantoms (120 x 120 x 78: the BraTS field of view at 2 mm),
20 unique cases, larger cohorts by hard links under new names (each case is read, hashed and
prepared on its own). Targets (issue 13): peak RSS per rank under 2 GB at 200 cases and flat in
the case count; the build at least 1.7x faster with 2 processes than with 1.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cohort import MODALITIES, make_cohort, subset  # noqa: E402

BRATS_CASES = 1251
INDEX_BYTES_PER_SLICE = 32  # int64 label, case, sampler row, split row


def _rank_worker(config_path: str) -> int:
    """One rank of a training run: train, then write this rank's peak RSS."""
    import torch

    from napari_whatishealthy.core.model import NetworkSpec
    from napari_whatishealthy.core.train import TrainConfig, train

    spec = json.loads(Path(config_path).read_text())
    rank = int(os.environ.get("RANK", "0"))
    spec.pop("threads")
    torch.set_num_threads(1)  # per rank: stable on a shared machine, ranks add cores
    network = NetworkSpec(**{k: tuple(v) if isinstance(v, list) else v
                             for k, v in spec.pop("network").items()})
    config = TrainConfig(**spec, network=network)
    train(config, log=lambda *_: None, show_progress=False)
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(config.out, f"rss-rank{rank}.json").write_text(json.dumps({"rank": rank,
                                                                    "rss_mib": rss_mib}))
    return 0


def _files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*.nii.gz")]


def _warm(folder: Path) -> None:
    for path in _files(folder):
        path.read_bytes()


def build_rows(cohorts: dict[int, Path], work: Path, repeats: int, sizes: dict[int, tuple[int, ...]]
               ) -> list[dict]:
    from napari_whatishealthy.core.data import discover_cases
    from napari_whatishealthy.core.slice_store import Preprocessing, open_or_build

    rows = []
    for n, folder in cohorts.items():
        cases = discover_cases(folder)
        _warm(folder)
        for size in sizes[n]:
            times: dict[int, list[float]] = {1: [], 2: []}
            store = None
            for r in range(repeats):
                for workers in ((1, 2) if r % 2 == 0 else (2, 1)):
                    target = work / f"build-{n}-{size}-{workers}"
                    shutil.rmtree(target, ignore_errors=True)
                    started = time.perf_counter()
                    store = open_or_build(target, cases, Preprocessing(size, MODALITIES),
                                          workers=workers, log=lambda *_: None,
                                          show_progress=False)
                    times[workers].append(time.perf_counter() - started)
                    if not (n == max(cohorts) and size == 64 and workers == 1):
                        shutil.rmtree(target, ignore_errors=True)
            rows.append({"cases": n, "size": size, "slices": len(store),
                         "mib": store.nbytes / 2**20, "t1": min(times[1]), "t2": min(times[2]),
                         "t1_all": times[1], "t2_all": times[2]})
            print(f"  build {n} cases @ {size} px: 1 process {min(times[1]):.1f} s, "
                  f"2 processes {min(times[2]):.1f} s", flush=True)
    return rows


def train_run(data: Path, store: Path, out: Path, size: int, ranks: int, in_memory: bool,
              steps: int, batch: int, network: dict, threads: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    config = {"data": str(data), "out": str(out / "run"), "size": size,
              "modalities": list(MODALITIES), "steps": steps, "batch": batch,
              "log_every": max(1, steps // 3), "val_every": 10**9,
              "checkpoint_every": 10**9, "device": "cpu", "store": str(store),
              "in_memory": in_memory, "workers": 1, "network": network, "threads": threads}
    config_path = out / "config.json"
    config_path.write_text(json.dumps(config))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    script = str(Path(__file__).resolve())
    if ranks == 1:
        cmd = [sys.executable, script, "--rank-worker", str(config_path)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", str(ranks), script, "--rank-worker", str(config_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"training run failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")
    from napari_whatishealthy.core.train import read_log

    records = read_log(out / "run")
    rates = [r["slices_per_s"] / (batch * ranks) for r in records[1:]] or [
        records[-1]["slices_per_s"] / (batch * ranks)]
    rss = [json.loads((out / "run" / f"rss-rank{r}.json").read_text())["rss_mib"]
           for r in range(ranks)]
    return {"steps_per_s": statistics.median(rates), "rss_mib": rss}


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--rank-worker":
        return _rank_worker(sys.argv[2])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny cohorts and model: a smoke test")
    parser.add_argument("--work", default=None,
                        help="folder for the cohorts and stores (kept: a second run reuses the "
                             "cohorts); default a temporary folder")
    parser.add_argument("--repeats", type=int, default=2, help="fresh builds per row (best of)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per run")
    parser.add_argument("--skip-training", action="store_true",
                        help="only the store builds and the extrapolation of their numbers")
    args = parser.parse_args()

    import tempfile

    from napari_whatishealthy.core.data import discover_cases
    from napari_whatishealthy.core.slice_store import Preprocessing, open_or_build

    quick = args.quick
    counts = (4, 8, 12) if quick else (20, 80, 200)
    shape = (40, 40, 26) if quick else (120, 120, 78)
    brats_shape = (60, 60, 39) if quick else (240, 240, 155)
    steps = args.steps or (3 if quick else 12)
    batch = 4 if quick else 16
    network = ({"channels": [8, 16], "attention_levels": [False, True], "norm_num_groups": 8,
                "num_head_channels": 8, "label_embedding_dim": 8} if quick else {})
    threads = min(2, os.cpu_count() or 1)
    temp = None
    if args.work is None:
        temp = tempfile.TemporaryDirectory(prefix="scale-")
        work = Path(temp.name)
    else:
        work = Path(args.work)
    started = time.perf_counter()
    load = os.getloadavg()[0]
    print(f"machine: {os.cpu_count()} cores, load average {load:.2f} at the start "
          "(other users share it: timings carry their noise)", flush=True)
    t = time.perf_counter()
    cases = make_cohort(work / "cohort", max(counts), shape=shape, unique=min(20, max(counts)))
    cohorts = {n: subset(work / f"cohort-{n}", cases, n) for n in counts}
    print(f"cohort: {max(counts)} phantom cases {shape} ready in {time.perf_counter() - t:.0f} s",
          flush=True)

    print("store builds:", flush=True)
    sizes = {n: ((64, 128) if n == counts[0] else (64,)) for n in counts}
    if quick:
        sizes = {n: ((16, 32) if n == counts[0] else (16,)) for n in counts}
    builds = build_rows(cohorts, work / "stores", max(1, args.repeats), sizes)

    # BraTS-size phantoms: slices per case and build seconds per case, for the extrapolation.
    brats = make_cohort(work / "brats-size", 2 if quick else 3, shape=brats_shape,
                        unique=2 if quick else 3, seed=1)
    _warm(work / "brats-size")
    target = work / "stores" / "brats-size"
    shutil.rmtree(target, ignore_errors=True)
    t = time.perf_counter()
    size0 = 16 if quick else 64
    bstore = open_or_build(target, discover_cases(work / "brats-size"),
                           Preprocessing(size0, MODALITIES), workers=1, log=lambda *_: None,
                           show_progress=False)
    brats_s_per_case = (time.perf_counter() - t) / len(brats)
    brats_slices_per_case = len(bstore) / len(brats)

    print("training runs:", flush=True)
    trains = []
    for n in counts if not args.skip_training else ():
        for size in sizes[n]:
            store = work / "stores" / f"train-{n}-{size}"
            open_or_build(store, discover_cases(cohorts[n]), Preprocessing(size, MODALITIES),
                          workers=2, log=lambda *_: None, show_progress=False)
            paths = (False, True) if size == sizes[n][0] else (False,)
            for in_memory in paths:
                for ranks in (1, 2):
                    # 128 px steps cost four times more: half as many keep the run modest.
                    row = train_run(cohorts[n], store, work / "train" / f"{n}-{size}-{ranks}-"
                                    f"{int(in_memory)}", size, ranks, in_memory,
                                    steps if size == sizes[n][0] else max(3, steps // 2),
                                    batch, network, threads)
                    row.update({"cases": n, "size": size, "ranks": ranks,
                                "data": "in RAM" if in_memory else "slice store"})
                    trains.append(row)
                    print(f"  {n} cases @ {size} px, {ranks} rank(s), {row['data']}: "
                          f"{row['steps_per_s']:.2f} steps/s, peak RSS per rank "
                          f"{max(row['rss_mib']):.0f} MiB", flush=True)

    # ---------------------------------------------------------------------------------------
    print()
    print(f"## Store build (best of {max(1, args.repeats)} fresh builds; the machine is shared)")
    print()
    print("| cases | size | slices | store MiB | 1 process (s) | 2 processes (s) | speed-up |")
    print("|---|---|---|---|---|---|---|")
    for b in builds:
        print(f"| {b['cases']} | {b['size']} | {b['slices']:,} | {b['mib']:.0f} | {b['t1']:.1f} | "
              f"{b['t2']:.1f} | {b['t1'] / b['t2']:.2f}x |")
    print()
    print(f"## Training (batch {batch} per rank, one thread per rank, default network; peak RSS "
          "= ru_maxrss of each rank)")
    print()
    print("| cases | size | ranks | data | steps/s (rank 0) | peak RSS per rank (MiB) |")
    print("|---|---|---|---|---|---|")
    for r in trains:
        rss = " / ".join(f"{x:.0f}" for x in r["rss_mib"])
        print(f"| {r['cases']} | {r['size']} | {r['ranks']} | {r['data']} | "
              f"{r['steps_per_s']:.2f} | {rss} |")

    # Extrapolation to BraTS 2021.
    small, large = counts[0], counts[-1]
    b64 = {b["cases"]: b for b in builds if b["size"] == size0}
    mib_per_slice = b64[large]["mib"] / b64[large]["slices"]
    speedup = b64[large]["t1"] / b64[large]["t2"]
    brats_slices = brats_slices_per_case * BRATS_CASES
    print()
    print(f"## Extrapolated to BraTS 2021 ({BRATS_CASES:,} cases, "
          f"{'x'.join(map(str, brats_shape))}) -- EXTRAPOLATED, not measured")
    print()
    print(f"measured on {len(brats)} BraTS-size phantoms: {brats_slices_per_case:.0f} slices and "
          f"{brats_s_per_case:.2f} s per case (1 process, {size0} px)")
    print()
    print("| quantity | value | how |")
    print("|---|---|---|")
    print(f"| store size at {size0} px (extrapolated) | {brats_slices * mib_per_slice / 1024:.1f} GiB"
          f" | {brats_slices:,.0f} slices x {mib_per_slice * 1024:.0f} KiB |")
    print(f"| store size at {2 * size0} px (extrapolated) | "
          f"{4 * brats_slices * mib_per_slice / 1024:.1f} GiB | 4x the {size0} px store |")
    print(f"| store build, 1 process (extrapolated) | {brats_s_per_case * BRATS_CASES / 60:.0f} min"
          f" | {brats_s_per_case:.2f} s/case x {BRATS_CASES} |")
    for procs in (2, 8):
        eff = speedup / 2  # parallel efficiency measured with 2 processes
        print(f"| store build, {procs} processes (extrapolated) | "
              f"{brats_s_per_case * BRATS_CASES / (procs * eff) / 60:.0f} min | at the measured "
              f"2-process efficiency {eff:.0%} |")
    for data in ("slice store", "in RAM"):
        rows = [r for r in trains if r["data"] == data and r["size"] == size0 and r["ranks"] == 2]
        if len(rows) < 2:
            continue
        x0, x1 = rows[0]["cases"], rows[-1]["cases"]
        y0, y1 = max(rows[0]["rss_mib"]), max(rows[-1]["rss_mib"])
        if data == "slice store":
            # What grows with the cohort on a rank reading from the store is its index arrays
            # (labels, case of each slice, the sampler's and the split's row numbers: 4 int64
            # per slice); a line through the measured rows would fit their run-to-run noise.
            at = y1 + INDEX_BYTES_PER_SLICE * (brats_slices - b64[x1]["slices"]) / 2**20
            how = (f"measured at {x1} cases ({y1:.0f} MiB; {y0:.0f} at {x0}) + "
                   f"{INDEX_BYTES_PER_SLICE} bytes of index per slice")
        else:
            slope = (y1 - y0) / (b64[x1]["slices"] - b64[x0]["slices"])  # MiB per slice
            at = y1 + slope * (brats_slices - b64[x1]["slices"])
            how = f"linear in slices from {x0} -> {x1} cases ({y0:.0f} -> {y1:.0f} MiB)"
        print(f"| peak RSS per rank, {data}, 2 ranks (extrapolated) | {at / 1024:.2f} GiB | "
              f"{how} |")

    # Targets.
    print()
    print("## Targets")
    print()
    store_rows = [r for r in trains if r["data"] == "slice store" and r["size"] == size0]
    if store_rows:
        at_large = max(max(r["rss_mib"]) for r in store_rows if r["cases"] == large)
        at_small = max(max(r["rss_mib"]) for r in store_rows if r["cases"] == small)
        flat = at_large <= at_small * 1.10 + 30
        print(f"- peak RSS per rank at {large} cases (store): {at_large:.0f} MiB -> "
              f"{'met' if at_large < 2000 else 'MISSED'} (< 2 GB)")
        print(f"- flat in case count: {at_small:.0f} MiB at {small} cases, {at_large:.0f} MiB "
              f"at {large} -> {'met' if flat else 'MISSED'} (within 10 % + 30 MiB)")
    print(f"- build speed-up with 2 processes at {large} cases: {speedup:.2f}x -> "
          f"{'met' if speedup >= 1.7 else 'MISSED'} (>= 1.7x; best of {max(1, args.repeats)}, "
          f"load average {load:.2f} at the start, {os.getloadavg()[0]:.2f} at the end)")
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    if temp is not None:
        temp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
