"""Speed: the project's pipeline against a straightforward reference loop, same model, same input.

The reference loop mirrors the paper's reference code: every axial slice of the volume, one slice
at a time, the unguided and the guided pass of each decoding step as two separate forward calls,
float32, ``torch.no_grad`` rather than inference mode, no allocator tuning. The pipeline is
``core.pipeline.localize`` with the model's recommended settings. Both use the same timestep plan,
so their outputs must agree (checked below, within the stated tolerance; the pipeline runs the
network in bf16 on CPU, which is where the difference comes from).

Each measurement runs in a fresh subprocess so that peak memory (max RSS) is its own.

    python benchmarks/speed.py            # the bundled default model, a BraTS-size synthetic volume
    python benchmarks/speed.py --quick    # about a minute: reference timed on 8 slices, extrapolated
    python benchmarks/speed.py --tiny     # smoke test: tiny random model, tiny volume (seconds)
    python benchmarks/speed.py --ablation # network time per slice for each speed measure in turn
    python benchmarks/speed.py --ablation --with-compile   # ... and torch.compile (minutes)

The last line is ``speedup_vs_reference X`` (whole-volume reference time / pipeline time).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# Tolerances for "the outputs agree": healthy slices in normalised units ([-1, 1]).
MEAN_ABS_TOLERANCE = 0.02
P99_ABS_TOLERANCE = 0.15
# The reference code's own inference settings (Diff-SCM): 75 inversion + 75 decoding steps.
REFERENCE_CODE_STEPS = 75
REFERENCE_CODE_NOISE = 0.75


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


def _reference_counterfactual(model, slices, plan, alphas, guidance, dyn_norm):
    """The straightforward loop: one slice at a time, separate guided passes, float32, no_grad."""
    import torch

    from napari_whatishealthy.core.counterfactual import dynamic_normalise
    from napari_whatishealthy.core.model import HEALTHY, NULL

    out = []
    for s in range(slices.shape[0]):
        x = torch.from_numpy(slices[s : s + 1].copy())
        levels = [1.0] + [float(alphas[t]) for t in plan]
        net_t = [0] + list(plan)
        null = torch.tensor([NULL])
        healthy = torch.tensor([HEALTHY])
        with torch.no_grad():
            for i in range(len(plan)):  # DDIM inversion with the null label
                a, b = levels[i], levels[i + 1]
                eps = model(x, torch.tensor([net_t[i]]), null)
                x0 = (x - (1 - a) ** 0.5 * eps) / a**0.5
                x = b**0.5 * x0 + (1 - b) ** 0.5 * eps
            for i in range(len(plan), 0, -1):  # guided decoding, two forward calls per step
                a, b = levels[i], levels[i - 1]
                t = torch.tensor([plan[i - 1]])
                eps_null = model(x, t, null)
                eps_healthy = model(x, t, healthy)
                eps = eps_null + guidance * (eps_healthy - eps_null)
                x0 = (x - (1 - a) ** 0.5 * eps) / a**0.5
                if dyn_norm:
                    x0 = dynamic_normalise(x0)
                    eps = (x - a**0.5 * x0) / (1 - a) ** 0.5
                x = b**0.5 * x0 + (1 - b) ** 0.5 * eps
        out.append(x.numpy())
    return np.concatenate(out)


def worker(args: argparse.Namespace) -> dict:
    """One measurement in this (fresh) process; prints a JSON line."""
    import torch

    from napari_whatishealthy.core.counterfactual import timestep_plan
    from napari_whatishealthy.core.pipeline import LocalizeSettings, localize, remask
    from napari_whatishealthy.core.preprocess import prepare

    if args.threads:
        torch.set_num_threads(args.threads)
    model, spec, description = _load(args)
    data = _volume(args)
    settings = LocalizeSettings.from_spec(spec, device="cpu")
    result: dict = {"model": description, "shape": list(data.shape[1:])}
    if args.worker == "reference":
        prepared = prepare(data, spec.image_size)
        # The reference processes every axial slice of the volume, brain or not.
        from napari_whatishealthy.core.preprocess import _crop, _resize

        x0, y0, side, _ = prepared.box
        every = _resize(_crop(prepared.normalised, x0, y0, side, -1.0).transpose(3, 0, 1, 2), spec.image_size)
        plan = timestep_plan(spec.schedule, settings.noise_level, settings.steps)
        alphas = spec.schedule.alphas_cumprod().numpy()
        n_all = every.shape[0]
        timed = every if args.reference_slices is None else every[prepared.slice_index[: args.reference_slices]]
        started = time.perf_counter()
        healthy = _reference_counterfactual(model, timed, plan, alphas, settings.guidance,
                                            settings.dynamic_normalisation)
        elapsed = time.perf_counter() - started
        per_slice = elapsed / timed.shape[0]
        result.update(per_slice_s=per_slice, volume_s=per_slice * n_all, slices=n_all,
                      extrapolated=timed.shape[0] != n_all, forwards_per_slice=3 * len(plan),
                      forward_s=per_slice / (3 * len(plan)))
        if args.compare_out:
            np.save(args.compare_out, healthy[: args.compare_slices])
            np.save(args.compare_out + ".input.npy", timed[: args.compare_slices])
    elif args.worker == "pipeline":
        from napari_whatishealthy.core.runtime import tune_allocator

        tune_allocator()
        from napari_whatishealthy.core.pipeline import prepare_input

        prepared = prepare_input(data, spec)
        centre = int(prepared.slice_index[len(prepared.slice_index) // 2])
        other = int(prepared.slice_index[len(prepared.slice_index) // 3])
        localize(model, spec, data, settings, z_slices=[other])  # warm-up (kernels, caches)
        # First preview of a volume: preparing it (brain mask, normalisation, slicing) included.
        started = time.perf_counter()
        localize(model, spec, data, settings, z_slices=[centre])
        preview = time.perf_counter() - started
        # The widget keeps the prepared volume: later previews (new settings, other slices) skip it.
        started = time.perf_counter()
        localize(model, spec, data, settings, z_slices=[centre], prepared=prepared)
        preview_cached = time.perf_counter() - started
        started = time.perf_counter()
        full = localize(model, spec, data, settings)
        volume_s = time.perf_counter() - started
        # The threshold slider: the widget's remask, in napari's [Z, Y, X] order. Thresholds are
        # chosen before timing; from the recommended one down to where 10 % of the brain is above.
        inside = full.difference[full.brain]
        thresholds = [float(full.threshold_used)] + [float(np.quantile(inside, q))
                                                      for q in np.linspace(0.9, 0.99, 19)]
        remask(full, thresholds[0], settings.min_component_voxels, True, order="zyx")  # its copies
        timings = []
        for threshold in thresholds:
            t0 = time.perf_counter()
            remask(full, threshold, settings.min_component_voxels, True, order="zyx")
            timings.append(time.perf_counter() - t0)
        result.update(preview_s=preview, preview_cached_s=preview_cached, volume_s=volume_s,
                      slices=int(len(prepared.slice_index)),
                      remask_ms=1000 * float(np.median(timings)),
                      remask_max_ms=1000 * float(np.max(timings)))
        if args.compare_out:
            from napari_whatishealthy.core.counterfactual import CounterfactualSettings, counterfactual

            ref_input = np.load(args.compare_out + ".input.npy")
            cf = counterfactual(model, ref_input, CounterfactualSettings.from_spec(
                spec, device="cpu", guidance=settings.guidance, noise_level=settings.noise_level,
                steps=settings.steps, dynamic_normalisation=settings.dynamic_normalisation))
            ref = np.load(args.compare_out)
            diff = np.abs(cf - ref)
            result.update(mean_abs=float(diff.mean()), p99_abs=float(np.quantile(diff, 0.99)))
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
        ("reference: float32, 1 slice per call, no_grad", 1, False, False, False),
        ("+ inference_mode", 1, False, False, True),
        ("+ bf16 autocast", 1, True, False, True),
        (f"+ {batch} slices per call", batch, True, False, True),
        ("+ channels-last", batch, True, True, True),
        ("  (previous default: 128 per call)", 128, True, True, True),
    ]
    rows: list[tuple[str, float, float | None]] = []
    for name, b, bf16, cl, inference in configs:
        rows.append((name, per_slice(model, b, bf16, cl, inference)[0], None))
    if args.with_compile:
        compiled = torch.compile(model, dynamic=False)
        ms, first = per_slice(compiled, batch, True, True, True)
        rows.append(("+ torch.compile (inductor)", ms, first))
    return rows


def _spawn(args: argparse.Namespace, role: str, extra: list[str]) -> dict:
    cmd = [sys.executable, __file__, "--worker", role, "--model", args.model] + extra
    if args.tiny:
        cmd.append("--tiny")
    if args.case:
        cmd += ["--case", args.case]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    env = dict(os.environ)
    env.pop("GLIBC_TUNABLES", None)
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
    parser.add_argument("--ablation", action="store_true",
                        help="network time per slice for each speed measure in turn")
    parser.add_argument("--with-compile", action="store_true",
                        help="with --ablation: also torch.compile (compiles for minutes)")
    parser.add_argument("--worker", choices=["reference", "pipeline"], help=argparse.SUPPRESS)
    parser.add_argument("--reference-slices", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--compare-out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--compare-slices", type=int, default=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0

    import torch

    if args.ablation:
        rows = ablation(args)
        print(f"network time per slice, {'tiny model' if args.tiny else args.model}, cpu "
              f"({os.cpu_count()} cores), torch {torch.__version__}, threads {torch.get_num_threads()}")
        print()
        print("| configuration | ms per slice | vs reference | compile s |")
        print("|---|---|---|---|")
        for name, ms, compile_s in rows:
            print(f"| {name} | {ms:.2f} | {rows[0][1] / ms:.2f}x | "
                  f"{'-' if compile_s is None else f'{compile_s:.0f}'} |")
        return 0

    compare = str(Path(tempfile.mkdtemp(prefix="whatishealthy-speed-")) / "ref.npy")
    n_ref = 2 if args.tiny else (8 if args.quick else None)
    ref = _spawn(args, "reference", ["--compare-out", compare] + (
        ["--reference-slices", str(n_ref)] if n_ref else []))
    ours = _spawn(args, "pipeline", ["--compare-out", compare])
    agree = ours["mean_abs"] <= MEAN_ABS_TOLERANCE and ours["p99_abs"] <= P99_ABS_TOLERANCE
    ref_code_volume = ref["forward_s"] * ref["slices"] * 3 * REFERENCE_CODE_STEPS
    rows = [
        ("reference loop" + (" (extrapolated)" if ref["extrapolated"] else ""),
         ref["per_slice_s"], ref["volume_s"], ref["slices"], ref["peak_rss_gb"]),
        ("pipeline", ours["preview_s"], ours["volume_s"], ours["slices"], ours["peak_rss_gb"]),
    ]
    print(f"model: {ours['model']}")
    print(f"volume: {ours['shape']}  device: cpu ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"
          f"  torch {torch.__version__}  threads {torch.get_num_threads()}")
    print()
    header = ("method", "one-slice preview s", "whole volume s", "slices", "peak memory GB")
    print(f"| {header[0]:<34} | {header[1]:>19} | {header[2]:>14} | {header[3]:>6} | {header[4]:>14} |")
    print(f"|{'-' * 36}|{'-' * 21}|{'-' * 16}|{'-' * 8}|{'-' * 16}|")
    for name, preview, volume, slices, mem in rows:
        print(f"| {name:<34} | {preview:>19.3f} | {volume:>14.1f} | {slices:>6d} | {mem:>14.2f} |")
    print()
    print(f"one-slice preview with the volume already prepared (the widget's later previews): "
          f"{ours['preview_cached_s']:.3f} s")
    print(f"threshold slider (remask of the whole volume, napari order, components filtered): "
          f"{ours['remask_ms']:.1f} ms median, {ours['remask_max_ms']:.1f} ms worst of 20 thresholds")
    print(f"outputs agree: {'yes' if agree else 'NO'} (healthy slices, normalised units: mean |diff| "
          f"{ours['mean_abs']:.4f} <= {MEAN_ABS_TOLERANCE}, 99th pct {ours['p99_abs']:.4f} <= {P99_ABS_TOLERANCE})")
    print(f"the reference code's own settings ({REFERENCE_CODE_STEPS}+{REFERENCE_CODE_STEPS} steps, "
          f"L={REFERENCE_CODE_NOISE}) would take about {ref_code_volume:.0f} s for this volume "
          f"(end-to-end speedup {ref_code_volume / ours['volume_s']:.1f}x)")
    print(f"speedup_vs_reference {ref['volume_s'] / ours['volume_s']:.2f}")
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
