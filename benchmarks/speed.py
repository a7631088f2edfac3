"""Speed: the project's pipeline against two references, same model, same input, same run.

References (``reference_loops.py``), both at the pipeline's settings (same timestep plan, so the
outputs must agree; checked below within the stated tolerance, the difference being the
pipeline's bf16 network on CPU):

* **the reference code's structure** (the one ``speedup_vs_reference`` is measured against):
  every axial slice of the volume, brain or not, 32 slices per call as the reference code samples
  them, the unguided and the guided pass of each decoding step as two separate forward calls,
  float32, ``torch.no_grad``, no allocator tuning;
* **the naive loop**: the same, one slice per call.

The reference code's own settings (75 + 75 steps, L = 0.75, batch 32) make exactly the same calls
as the batch-32 reference, 7.5 times as many: that end-to-end figure is extrapolated from the
measured batch-32 reference. The pipeline is ``core.pipeline.localize`` with the model's
recommended settings.

Each measurement runs in a fresh subprocess so that peak memory (max RSS) is its own.

    python benchmarks/speed.py            # the bundled default model, a BraTS-size synthetic volume
    python benchmarks/speed.py --quick    # references timed on a few slices, extrapolated
    python benchmarks/speed.py --quick --repeat 3   # three rounds, the median one reported
    python benchmarks/speed.py --tiny     # smoke test: tiny random model, tiny volume (seconds)
    python benchmarks/speed.py --ablation # network time per slice for each speed measure in turn
    python benchmarks/speed.py --ablation --with-compile   # ... and torch.compile (minutes)

The header names the CPU and its relevant features (AVX-512, AVX512_BF16, AMX) and torch's CPU
capability. The last line is ``speedup_vs_reference X`` (whole-volume time of the batch-32
reference / the pipeline's).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# Tolerances for "the outputs agree": healthy slices in normalised units ([-1, 1]). In float32
# the pipeline and the reference compute the same thing (measured: mean 1e-4, 99th pct 7e-4,
# from batch composition); with bf16 autocast, rounding amplified by guidance 8 over 6 steps
# (measured: mean 0.016-0.020, 99th pct 0.06-0.08 on this CPU; docs/benchmarks.md, Speed).
F32_MEAN_ABS_TOLERANCE = 1e-3
F32_P99_ABS_TOLERANCE = 1e-2
MEAN_ABS_TOLERANCE = 0.03
P99_ABS_TOLERANCE = 0.15
sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference_loops import (  # noqa: E402
    REFERENCE_CODE_BATCH,
    REFERENCE_CODE_NOISE,
    REFERENCE_CODE_STEPS,
    every_axial_slice,
    network_calls,
    reference_counterfactual,
)


def _tiny_spec():
    from napari_whatishealthy.core.model import ModelSpec, NetworkSpec

    return ModelSpec(
        image_size=16,
        network=NetworkSpec(channels=(8, 16), attention_levels=(False, True), norm_num_groups=8,
                            num_head_channels=8, label_embedding_dim=8),
    )


def _load(args: argparse.Namespace):
    """(model, spec, description) for the chosen model; random weights where none is bundled."""
    import torch

    from napari_whatishealthy.core.model import build_model

    if args.tiny:
        torch.manual_seed(0)
        spec = _tiny_spec()
        return build_model(spec).eval(), spec, "tiny random-init model (smoke test)"
    from napari_whatishealthy.core.errors import WhatIsHealthyError
    from napari_whatishealthy.core.registry import load_model_cached, resolve_model

    try:
        path = resolve_model(args.model)
        model, spec, digest = load_model_cached(path, "cpu")
        return model, spec, f"{path} (sha256 {digest[:12]})"
    except WhatIsHealthyError as exc:
        from napari_whatishealthy.core.model import ModelSpec

        torch.manual_seed(0)
        spec = ModelSpec()
        return build_model(spec).eval(), spec, f"random-init default architecture ({exc})"


def _volume(args: argparse.Namespace) -> np.ndarray:
    """The input: a case folder, or a synthetic BraTS-size case (cached between subprocesses)."""
    from napari_whatishealthy.core.volume import load_volume

    if args.case:
        return load_volume(args.case).select(("flair", "t1", "t1ce", "t2")).data
    voxel = 6.0 if args.tiny else 1.0
    cache = Path(tempfile.gettempdir()) / f"whatishealthy-speed-case-{voxel}.npy"
    if cache.exists():
        return np.load(cache)
    from napari_whatishealthy.core.synthetic import make_case

    images, _, _, _ = make_case("speed", 11, "typical", voxel_size=voxel)
    data = np.stack([images[m] for m in ("flair", "t1", "t1ce", "t2")]).astype(np.float32)
    np.save(cache, data)
    return data


def _network_once(model, settings) -> dict:
    """The one-time cost of the OpenVINO network (where the pipeline uses it): converting the
    model (its first use on a machine, in a fresh cache folder) and reading that conversion back
    from the disk cache (a new process). Neither is in the pipeline's times: its warm-up made
    the network."""
    from napari_whatishealthy.core import openvino_network as ovn
    from napari_whatishealthy.core.counterfactual import autocast_dtype

    amp = autocast_dtype(settings.amp, "cpu")
    if ovn.choose_backend(settings.backend, "cpu", amp) != "openvino":
        return {}
    with tempfile.TemporaryDirectory() as fresh:
        started = time.perf_counter()
        ovn.openvino_network(model, amp, cache=fresh)
        converted = time.perf_counter() - started
        ovn.forget_networks()
        started = time.perf_counter()
        ovn.openvino_network(model, amp, cache=fresh)
        from_cache = time.perf_counter() - started
    ovn.forget_networks()  # the run makes its own, from the user's cache, as a user's would
    return {"network_converted_s": converted, "network_from_cache_s": from_cache}


def worker(args: argparse.Namespace) -> dict:
    """One measurement in this (fresh) process; prints a JSON line."""
    import torch

    from napari_whatishealthy.core.counterfactual import timestep_plan
    from napari_whatishealthy.core.pipeline import LocalizeSettings, localize
    from napari_whatishealthy.core.preprocess import prepare

    if args.threads:
        torch.set_num_threads(args.threads)
    model, spec, description = _load(args)
    data = _volume(args)
    settings = LocalizeSettings.from_spec(spec, device="cpu")
    result: dict = {"model": description, "shape": list(data.shape[1:]),
                    "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
                    "gomp_spincount": os.environ.get("GOMP_SPINCOUNT", "default")}
    if args.worker == "reference":
        prepared = prepare(data, spec.image_size)
        every = every_axial_slice(prepared, spec.image_size)  # brain or not, as the reference
        plan = timestep_plan(spec.schedule, settings.noise_level, settings.steps)
        alphas = spec.schedule.alphas_cumprod().numpy()
        n_all = every.shape[0]
        batch = args.reference_batch
        # Timed on brain slices when only some are timed (the per-slice cost is the same).
        timed = every if args.reference_slices is None else every[prepared.slice_index[: args.reference_slices]]
        started = time.perf_counter()
        healthy = reference_counterfactual(model, timed, plan, alphas, settings.guidance,
                                           settings.dynamic_normalisation, batch=batch)
        elapsed = time.perf_counter() - started
        calls = network_calls(timed.shape[0], len(plan), batch)
        per_call = elapsed / calls
        # Extrapolated per slice: the reference's last, partial batch costs less than a full one,
        # so this never overstates the reference.
        per_slice = elapsed / timed.shape[0]
        volume = elapsed if timed.shape[0] == n_all else per_slice * n_all
        result.update(per_slice_s=per_slice, volume_s=volume, slices=n_all, batch=batch,
                      extrapolated=timed.shape[0] != n_all, calls=network_calls(n_all, len(plan), batch),
                      per_call_s=per_call, steps=len(plan))
        if args.compare_out:  # brain slices spread over the volume, not empty background
            brain = np.arange(timed.shape[0]) if args.reference_slices else prepared.slice_index
            pick = brain[np.linspace(0, len(brain) - 1, min(args.compare_slices, len(brain))).astype(int)]
            np.save(args.compare_out, healthy[pick])
            np.save(args.compare_out + ".input.npy", timed[pick])
    elif args.worker == "pipeline":
        from napari_whatishealthy.core.runtime import tune_allocator

        tune_allocator()
        from napari_whatishealthy.core.pipeline import prepare_input

        prepared = prepare_input(data, spec)
        centre = int(prepared.slice_index[len(prepared.slice_index) // 2])
        other = int(prepared.slice_index[len(prepared.slice_index) // 3])
        if not args.preview_only:
            result.update(_network_once(model, settings))
        localize(model, spec, data, settings, z_slices=[other])  # warm-up (kernels, caches)
        # First preview of a volume: preparing it (brain mask, normalisation, slicing) included.
        started = time.perf_counter()
        localize(model, spec, data, settings, z_slices=[centre])
        preview = time.perf_counter() - started
        # The widget keeps the prepared volume: later previews (new settings, other slices) skip it.
        started = time.perf_counter()
        localize(model, spec, data, settings, z_slices=[centre], prepared=prepared)
        preview_cached = time.perf_counter() - started
        if args.preview_only:  # a few more, for a median (stopping early if they are slow)
            times = [preview_cached]
            while len(times) < 5 and max(times) < 5.0:
                started = time.perf_counter()
                localize(model, spec, data, settings, z_slices=[centre], prepared=prepared)
                times.append(time.perf_counter() - started)
            result.update(preview_cached_s=float(np.median(times)), previews=len(times))
            result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
            return result
        started = time.perf_counter()
        full = localize(model, spec, data, settings)
        volume_s = time.perf_counter() - started
        # The threshold slider: the widget's remask, on its napari-order [Z, Y, X] copies of the
        # result (made once, before timing). Thresholds are chosen before timing; from the
        # recommended one down to where 10 % of the brain is above.
        from napari_whatishealthy._widget_state import MaskParams, NapariResult

        inside = full.difference[full.brain]
        thresholds = [float(full.threshold_used)] + [float(np.quantile(inside, q))
                                                      for q in np.linspace(0.9, 0.99, 19)]
        shown = NapariResult(full)
        shown.remask(MaskParams(thresholds[0], settings.min_component_voxels, True))  # its copies
        timings = []
        for threshold in thresholds:
            t0 = time.perf_counter()
            shown.remask(MaskParams(threshold, settings.min_component_voxels, True))
            timings.append(time.perf_counter() - t0)
        from napari_whatishealthy.core.counterfactual import describe_inference

        result.update(choices=describe_inference("cpu", settings))
        result.update(preview_s=preview, preview_cached_s=preview_cached, volume_s=volume_s,
                      slices=int(len(prepared.slice_index)),
                      remask_ms=1000 * float(np.median(timings)),
                      remask_max_ms=1000 * float(np.max(timings)))
        if args.compare_out:
            from napari_whatishealthy.core.counterfactual import CounterfactualSettings, counterfactual

            ref_input = np.load(args.compare_out + ".input.npy")
            ref = np.load(args.compare_out)
            # Twice: as the pipeline runs (bf16 autocast where the CPU has it), and in float32
            # as the reference does, where the two must compute the same thing.
            for amp, key in (("auto", ""), (False, "_f32")):
                cf = counterfactual(model, ref_input, CounterfactualSettings.from_spec(
                    spec, device="cpu", guidance=settings.guidance, noise_level=settings.noise_level,
                    steps=settings.steps, dynamic_normalisation=settings.dynamic_normalisation,
                    amp=amp))
                diff = np.abs(cf - ref)
                result.update({f"mean_abs{key}": float(diff.mean()),
                               f"p99_abs{key}": float(np.quantile(diff, 0.99))})
    result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    return result


def ablation(args: argparse.Namespace) -> list[tuple[str, float, float | None]]:
    """Network time per slice (one forward pass) under each speed measure, added one by one.

    Returns rows (configuration, ms per slice, compile seconds or None)."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    model, spec, _ = _load(args)
    size, channels = spec.image_size, spec.in_channels

    def per_slice(net, batch: int, bf16: bool, channels_last: bool, inference: bool,
                  repeats: int = 3) -> tuple[float, float]:
        net = net.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        x = torch.randn(batch, channels, size, size)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        t = torch.full((batch,), 100)
        y = torch.zeros(batch, dtype=torch.long)
        grad = torch.inference_mode() if inference else torch.no_grad()
        with grad, torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            started = time.perf_counter()
            net(x, t, y)  # warm-up (and compilation, for a compiled net)
            first = time.perf_counter() - started
            times = []
            for _ in range(repeats):
                started = time.perf_counter()
                net(x, t, y)
                times.append(time.perf_counter() - started)
        return 1000 * min(times) / batch, first

    batch = 2 * 24  # decoding's doubled batch at the CPU default of 24 slices per chunk
    configs = [
        (f"reference code: float32, {REFERENCE_CODE_BATCH} slices per call, no_grad",
         REFERENCE_CODE_BATCH, False, False, False),
        ("naive loop: float32, 1 slice per call, no_grad", 1, False, False, False),
        ("reference code + inference_mode", REFERENCE_CODE_BATCH, False, False, True),
        ("+ bf16 autocast", REFERENCE_CODE_BATCH, True, False, True),
        (f"+ {batch} slices per call (decoding's doubled chunk)", batch, True, False, True),
        ("+ channels-last", batch, True, True, True),
    ]
    rows: list[tuple[str, float, float | None]] = []
    for name, b, bf16, cl, inference in configs:
        rows.append((name, per_slice(model, b, bf16, cl, inference)[0], None))
    from napari_whatishealthy.core.inference_network import inference_network

    copy = inference_network(model, torch.bfloat16)  # what the pipeline calls (same outputs)
    rows.append(("+ inference copy (one-token cross-attention, weights in bf16)",
                 per_slice(copy, batch, True, True, True)[0], None))
    if args.with_compile:
        compiled = torch.compile(model, dynamic=False)
        ms, first = per_slice(compiled, batch, True, True, True)
        rows.append(("+ torch.compile (inductor)", ms, first))
    return rows


def _spawn(args: argparse.Namespace, role: str, extra: list[str], policy: str = "cli") -> dict:
    cmd = [sys.executable, __file__, "--worker", role, "--model", args.model] + extra
    if args.tiny:
        cmd.append("--tiny")
    if args.case:
        cmd += ["--case", args.case]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    env = dict(os.environ)
    env.pop("GLIBC_TUNABLES", None)
    # Each row runs as its code runs: the references in the environment as it is (the reference
    # code sets no thread policy; OpenMP's default spins), the pipeline with the CLI's policy
    # (PASSIVE) or, for the widget's previews, napari's (a bounded spin); a policy the
    # environment sets holds for every row.
    from napari_whatishealthy.core.runtime import prefer_bounded_omp_spin, prefer_passive_omp_wait

    if policy == "cli":
        prefer_passive_omp_wait(env)
    elif policy == "widget":
        prefer_bounded_omp_spin(env, torch_loaded=False)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"benchmark worker {role} failed")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--case", default=None, help="a case folder instead of the synthetic volume")
    parser.add_argument("--quick", action="store_true", help="time the reference on a few slices only")
    parser.add_argument("--tiny", action="store_true", help="smoke test: tiny model and volume")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeat", type=int, default=1,
                        help="measure this many rounds (references and pipeline back to back) and "
                             "report the median round: for shared machines")
    parser.add_argument("--ablation", action="store_true",
                        help="network time per slice for each speed measure in turn")
    parser.add_argument("--with-compile", action="store_true",
                        help="with --ablation: also torch.compile (compiles for minutes)")
    parser.add_argument("--worker", choices=["reference", "pipeline"], help=argparse.SUPPRESS)
    parser.add_argument("--reference-slices", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--reference-batch", type=int, default=REFERENCE_CODE_BATCH, help=argparse.SUPPRESS)
    parser.add_argument("--compare-out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--compare-slices", type=int, default=4, help=argparse.SUPPRESS)
    parser.add_argument("--preview-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0

    import torch

    if args.ablation:
        rows = ablation(args)
        from napari_whatishealthy.core.hardware import cpu_info

        print(f"network time per slice, {'tiny model' if args.tiny else args.model}, "
              f"torch {torch.__version__}, threads {torch.get_num_threads()}")
        print(f"cpu: {cpu_info().describe()}")
        print()
        print("| configuration | ms per slice | vs reference | compile s |")
        print("|---|---|---|---|")
        for name, ms, compile_s in rows:
            print(f"| {name} | {ms:.2f} | {rows[0][1] / ms:.2f}x | "
                  f"{'-' if compile_s is None else f'{compile_s:.0f}'} |")
        return 0

    from napari_whatishealthy.core.hardware import cpu_info

    compare = str(Path(tempfile.mkdtemp(prefix="whatishealthy-speed-")) / "ref.npy")
    n_naive = 2 if args.tiny else (8 if args.quick else None)
    n_batch = REFERENCE_CODE_BATCH if args.quick else None
    rounds = []
    for _ in range(args.repeat):  # each round: the three measurements back to back
        rounds.append((
            _spawn(args, "reference", ["--compare-out", compare, "--reference-batch", str(REFERENCE_CODE_BATCH)]
                   + (["--reference-slices", str(n_batch)] if n_batch else []), policy="as given"),
            _spawn(args, "reference", ["--reference-batch", "1"]
                   + (["--reference-slices", str(n_naive)] if n_naive else []), policy="as given"),
            _spawn(args, "pipeline", ["--compare-out", compare]),
        ))
    # The widget runs in napari's process, where it bounds OpenMP's spinning (the CLI sets
    # PASSIVE): its previews are timed that way too (docs/benchmarks.md, Threads).
    widget = _spawn(args, "pipeline", ["--preview-only"], policy="widget")
    ratios = [r["volume_s"] / o["volume_s"] for r, _, o in rounds]
    # The round with the median speedup stands for the run (its rows are shown); all ratios printed.
    ref, naive, ours = rounds[int(np.argsort(ratios)[(len(ratios) - 1) // 2])]
    same = ours["mean_abs_f32"] <= F32_MEAN_ABS_TOLERANCE and ours["p99_abs_f32"] <= F32_P99_ABS_TOLERANCE
    agree = same and ours["mean_abs"] <= MEAN_ABS_TOLERANCE and ours["p99_abs"] <= P99_ABS_TOLERANCE
    # The reference code's own settings make the batch-32 reference's calls, steps/our-steps as many.
    ref_code_volume = ref["volume_s"] * REFERENCE_CODE_STEPS / ref["steps"]

    def _name(base: str, row: dict) -> str:
        return base + (" (extrapolated)" if row["extrapolated"] else "")

    rows = [
        (_name("reference code's structure, batch 32", ref), None, ref["volume_s"], ref["slices"],
         ref["peak_rss_gb"]),
        (_name("naive loop, 1 slice per call", naive), naive["per_slice_s"], naive["volume_s"],
         naive["slices"], naive["peak_rss_gb"]),
        ("pipeline", ours["preview_s"], ours["volume_s"], ours["slices"], ours["peak_rss_gb"]),
    ]
    print(f"model: {ours['model']}")
    print(f"volume: {ours['shape']}  torch {torch.__version__}  threads {torch.get_num_threads()}  "
          f"OMP_WAIT_POLICY: references {ref['omp_wait_policy']} (as the reference code runs), "
          f"pipeline {ours['omp_wait_policy']} (the CLI's)")
    print(f"cpu: {cpu_info().describe()}")
    print(f"pipeline on this cpu: {ours['choices']}")
    print()
    header = ("method", "one-slice preview s", "whole volume s", "slices", "peak memory GB", "vs reference")
    print(f"| {header[0]:<50} | {header[1]:>19} | {header[2]:>14} | {header[3]:>6} | {header[4]:>14} "
          f"| {header[5]:>12} |")
    print(f"|{'-' * 52}|{'-' * 21}|{'-' * 16}|{'-' * 8}|{'-' * 16}|{'-' * 14}|")
    for name, preview, volume, slices, mem in rows:
        shown = "-" if preview is None else f"{preview:.3f}"
        print(f"| {name:<50} | {shown:>19} | {volume:>14.1f} | {slices:>6d} | {mem:>14.2f} "
              f"| {ref['volume_s'] / volume:>11.2f}x |")
    print()
    print(f"references: float32, no_grad, every axial slice, the two guidance passes as separate calls "
          f"({ref['calls']} calls of up to {REFERENCE_CODE_BATCH} slices for the batch-32 reference, "
          f"{naive['calls']} one-slice calls for the naive loop); "
          + ("timed on some slices and extrapolated per slice" if ref["extrapolated"] or naive["extrapolated"]
             else "all slices timed"))
    print(f"one-slice preview with the volume already prepared (the widget's later previews): "
          f"{ours['preview_cached_s']:.3f} s")
    print(f"the same with the widget's OpenMP policy (napari's process: OMP_WAIT_POLICY="
          f"{widget['omp_wait_policy']}, GOMP_SPINCOUNT={widget['gomp_spincount']}): "
          f"{widget['preview_cached_s']:.3f} s (median of "
          f"{widget['previews']}; load average at the end {os.getloadavg()[0]:.1f})")
    if "network_converted_s" in ours:
        print(f"OpenVINO network, once per model: converted in {ours['network_converted_s']:.1f} s "
              f"(its first use on a machine), read back from the disk cache in "
              f"{ours['network_from_cache_s']:.2f} s (a new process); in no time above")
    print(f"threshold slider (remask of the whole volume, napari order, components filtered): "
          f"{ours['remask_ms']:.1f} ms median, {ours['remask_max_ms']:.1f} ms worst of 20 thresholds")
    print(f"outputs agree: {'yes' if agree else 'NO'} (batch-32 reference against the pipeline, healthy "
          f"slices, normalised units: the pipeline in float32 as the reference, mean |diff| "
          f"{ours['mean_abs_f32']:.5f} <= {F32_MEAN_ABS_TOLERANCE}, 99th pct {ours['p99_abs_f32']:.5f} "
          f"<= {F32_P99_ABS_TOLERANCE}; as it runs, with its autocast, mean |diff| "
          f"{ours['mean_abs']:.4f} <= {MEAN_ABS_TOLERANCE}, 99th pct {ours['p99_abs']:.4f} <= "
          f"{P99_ABS_TOLERANCE})")
    print(f"the reference code's own settings ({REFERENCE_CODE_STEPS}+{REFERENCE_CODE_STEPS} steps, "
          f"L={REFERENCE_CODE_NOISE}, batch {REFERENCE_CODE_BATCH}): about {ref_code_volume:.0f} s for this "
          f"volume (the batch-32 reference's calls, {REFERENCE_CODE_STEPS / ref['steps']:.1f}x as many; "
          f"end-to-end speedup {ref_code_volume / ours['volume_s']:.1f}x)")
    if len(rounds) > 1:
        volumes = ", ".join(f"{o['volume_s']:.1f}" for _, _, o in rounds)
        print(f"speedup per round (whole volume, batch-32 reference / pipeline): "
              f"{', '.join(f'{r:.2f}' for r in ratios)}; the table shows the median round; pipeline "
              f"whole volume per round: {volumes} s")
    print(f"speedup_vs_reference {ref['volume_s'] / ours['volume_s']:.2f}")
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
