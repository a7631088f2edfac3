"""GPU check: seconds per BraTS-size volume on CUDA, against the reference code's structure on the
same GPU, in one run of about a minute.

    bash benchmarks/gpu_check.sh                  # CUDA, the bundled default model
    DEVICE=cpu QUICK=1 bash benchmarks/gpu_check.sh   # smoke test: tiny model and volume, seconds

Environment: ``DEVICE`` (default ``cuda``), ``QUICK=1`` (tiny random model, tiny volume),
``COMPILE=0`` (skip the torch.compile row), ``OUTPUTS_ON_DEVICE=1`` (the outputs mapped back
with torch on ``DEVICE`` even on a CPU; the default with ``QUICK=1``, so that the smoke test runs
that path), ``COMPILE_TIMEOUT`` (seconds, default 40: compiling
is given that long in its own process and reported as not finished otherwise), ``BUDGET`` (seconds,
default 75: rows that would start after it are skipped and say so).

Input: the bundled sample case (FLAIR, T1, T1ce, T2; 2 mm) resampled to BraTS size (240 x 240 x
155, 1 mm). Rows:

* pipeline: ``core.pipeline.localize`` at the model's recommended settings, everything included
  (preparing the volume, the network, mapping back, median filter, mask and components); on CUDA
  that is bf16 autocast, 256 slices per chunk, channels-last, and the outputs mapped back on the
  device (``core.device_outputs``). Median of three runs after a warm-up, split by stage
  (preparing: brain mask, scales and model-space slices; network; outputs: mapping back, median
  filter, erosion, healthy image; mask: threshold and components; other: the rest), with the
  network alone (``counterfactual`` on the prepared slices) beside it.
* one-slice preview with the volume prepared (the widget's case), split the same way.
* pipeline with the outputs on the host (numpy), as before they moved to the device (CUDA only).
* reference (batch 32): the reference code's structure (``reference_loops``): every axial slice,
  32 per call, the two guidance passes as separate calls, float32, ``no_grad``, at the pipeline's
  settings; and at the reference code's own settings (75 + 75 steps, L = 0.75).
* naive loop: the same, one slice per call (timed on 8 slices, extrapolated).
* torch.compile: the pipeline's network compiled (inductor, default mode), if it compiles in time.

The last line is ``gpu_speedup_vs_reference X`` (batch-32 reference / pipeline, whole volume).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference_loops import (  # noqa: E402
    REFERENCE_CODE_BATCH,
    REFERENCE_CODE_NOISE,
    REFERENCE_CODE_STEPS,
    every_axial_slice,
    network_calls,
    reference_counterfactual,
)

QUICK = os.environ.get("QUICK", "0") == "1"
DEVICE = os.environ.get("DEVICE", "cuda")
BUDGET_S = float(os.environ.get("BUDGET", "75"))
FORCE_DEVICE_OUTPUTS = os.environ.get("OUTPUTS_ON_DEVICE", "1" if QUICK else "0") == "1"
T0 = time.perf_counter()


def _sync() -> None:
    if DEVICE.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn, repeats: int = 1):
    """(median seconds, last result) of ``fn()`` over ``repeats`` runs, synchronised."""
    times, out = [], None
    for _ in range(repeats):
        _sync()
        started = time.perf_counter()
        out = fn()
        _sync()
        times.append(time.perf_counter() - started)
    return statistics.median(times), out


def _timed_stages(run, repeats: int) -> tuple[float, str]:
    """(median seconds, the split of that median run by stage) of a ``localize`` call: the
    pipeline's own timings (``provenance["seconds_by_stage"]``) plus what they do not cover."""
    runs = []
    for _ in range(repeats):
        seconds, result = _timed(run)
        runs.append((seconds, result.provenance["seconds_by_stage"]))
    runs.sort(key=lambda r: r[0])
    seconds, stage = runs[len(runs) // 2]
    timed = sum(v for v in stage.values() if isinstance(v, float))
    return seconds, (
        f"preparing {stage['preparing']:.3f} s, network {stage['network']:.3f} s, outputs "
        f"{stage['outputs']:.3f} s (on {stage['outputs_on']}), mask {stage['mask']:.3f} s, "
        f"other {max(0.0, seconds - timed):.3f} s")


def load_model():
    """(model on DEVICE, spec, description)."""
    from napari_whatishealthy.core.model import ModelSpec, NetworkSpec, build_model

    if QUICK:
        torch.manual_seed(0)
        spec = ModelSpec(image_size=16, network=NetworkSpec(
            channels=(8, 16), attention_levels=(False, True), norm_num_groups=8,
            num_head_channels=8, label_embedding_dim=8))
        return build_model(spec).eval().to(DEVICE), spec, "tiny random-init model (QUICK=1)"
    from napari_whatishealthy.core.registry import load_model_cached, resolve_model

    path = resolve_model("default")
    model, spec, digest = load_model_cached(path, DEVICE)
    return model, spec, f"bundled default model (sha256 {digest[:12]})"


def load_volume() -> np.ndarray:
    """The sample case as ``[4, X, Y, Z]`` float32, resampled to BraTS size (QUICK: 30 x 30 x 20)."""
    from scipy import ndimage

    from napari_whatishealthy import sample_case_path
    from napari_whatishealthy.core.volume import load_volume as load

    data = load(sample_case_path()).select(("flair", "t1", "t1ce", "t2")).data
    target = (30, 30, 20) if QUICK else (240, 240, 155)
    zoom = [t / s for t, s in zip(target, data.shape[1:], strict=True)]
    return np.stack([ndimage.zoom(c, zoom, order=1) for c in data]).astype(np.float32)


def compile_row() -> dict:
    """Runs in its own process (killed by the parent's timeout): the pipeline with its network
    compiled; compile time and the time of a whole volume once compiled."""
    from napari_whatishealthy.core.pipeline import LocalizeSettings, localize, prepare_input

    model, spec, _ = load_model()
    data = load_volume()
    settings = LocalizeSettings.from_spec(spec, device=DEVICE)
    prepared = prepare_input(data, spec)
    compiled = torch.compile(model, dynamic=False)
    compile_s, _ = _timed(lambda: localize(compiled, spec, data, settings, prepared=prepared))
    volume_s, _ = _timed(lambda: localize(compiled, spec, data, settings), 3 if not QUICK else 1)
    return {"compile_s": compile_s, "volume_s": volume_s}


def main() -> int:
    if "--compile-row" in sys.argv:
        print(json.dumps(compile_row()))
        return 0
    from napari_whatishealthy.core import device_outputs
    from napari_whatishealthy.core.counterfactual import counterfactual, describe_inference, timestep_plan
    from napari_whatishealthy.core.pipeline import LocalizeSettings, localize, prepare_input

    if DEVICE.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("DEVICE=cuda but torch sees no CUDA GPU; run with DEVICE=cpu QUICK=1 to test")
    gpu = torch.cuda.get_device_name(0) if DEVICE.startswith("cuda") else platform.processor() or "cpu"
    print(f"device: {DEVICE} ({gpu}), torch {torch.__version__}, python {platform.python_version()}, "
          f"{os.cpu_count()} CPU cores" + (", QUICK=1 (tiny model and volume: a smoke test)" if QUICK else ""))
    if FORCE_DEVICE_OUTPUTS:  # the torch outputs path on any device (the CPU smoke test's)
        device_outputs.use_device_outputs = lambda device: True
    model, spec, description = load_model()
    data = load_volume()
    settings = LocalizeSettings.from_spec(spec, device=DEVICE)
    print(f"model: {description}; settings: L={settings.noise_level}, {settings.steps}+{settings.steps} "
          f"steps, guidance {settings.guidance}; network: {describe_inference(DEVICE, settings)}")
    repeats = 1 if QUICK else 3
    rows: list[tuple[str, str, float | None, str]] = []  # (name, s per volume, note)

    prepare_s, prepared = _timed(lambda: prepare_input(data, spec))
    n_brain = int(len(prepared.slice_index))
    n_all = int(data.shape[3])
    print(f"volume: {list(data.shape[1:])}, {n_brain} brain slices of {n_all}; load + warm-up ...", flush=True)
    localize(model, spec, data, settings, prepared=prepared)  # warm-up: kernels for both shapes
    volume_s, stages = _timed_stages(lambda: localize(model, spec, data, settings), repeats)
    network_s, _ = _timed(lambda: counterfactual(model, prepared.slices, settings), repeats)
    centre = int(prepared.slice_index[n_brain // 2])
    preview_s, preview_stages = _timed_stages(
        lambda: localize(model, spec, data, settings, z_slices=[centre], prepared=prepared),
        repeats)
    rows.append(("pipeline (default settings)", f"{n_brain}", volume_s,
                 f"{stages}; network alone (counterfactual on the prepared slices) "
                 f"{network_s:.3f} s; preparing alone (prepare_input) {prepare_s:.3f} s"))
    rows.append(("one-slice preview, volume prepared", "1", preview_s, preview_stages))
    if device_outputs.use_device_outputs(torch.device(DEVICE)):
        # The same run with the numpy outputs on the host (the path before they moved to the
        # device), to show what moving them saved, in the same run.
        on_device = device_outputs.use_device_outputs
        device_outputs.use_device_outputs = lambda device: False
        try:
            host_s, host_stages = _timed_stages(lambda: localize(model, spec, data, settings),
                                                repeats)
        finally:
            device_outputs.use_device_outputs = on_device
        rows.append(("pipeline, outputs mapped back on the host (numpy)", f"{n_brain}", host_s,
                     host_stages))
    fp32 = LocalizeSettings.from_spec(spec, device=DEVICE, amp=False)
    counterfactual(model, prepared.slices[:8], fp32)
    fp32_s, _ = _timed(lambda: counterfactual(model, prepared.slices, fp32), repeats)
    rows.append(("pipeline network only, float32", f"{n_brain}", fp32_s, "no autocast"))

    plan = timestep_plan(spec.schedule, settings.noise_level, settings.steps)
    alphas = spec.schedule.alphas_cumprod().numpy()
    every = every_axial_slice(prepared, spec.image_size)
    model.to(memory_format=torch.contiguous_format)  # the reference code's layout

    def reference(slices, steps_plan, b):
        return reference_counterfactual(model, slices, steps_plan, alphas, settings.guidance,
                                        settings.dynamic_normalisation, batch=b, device=DEVICE)

    reference(every[:REFERENCE_CODE_BATCH], plan, REFERENCE_CODE_BATCH)  # warm-up
    ref_s, _ = _timed(lambda: reference(every, plan, REFERENCE_CODE_BATCH), repeats)
    rows.append(("reference, batch 32, float32", f"{n_all}", ref_s,
                 f"{network_calls(n_all, len(plan), REFERENCE_CODE_BATCH)} calls"))
    naive_n = 2 if QUICK else 8
    naive_s, _ = _timed(lambda: reference(every[:naive_n], plan, 1))
    rows.append(("naive loop, 1 slice per call, float32", f"{n_all}", naive_s * n_all / naive_n,
                 f"timed on {naive_n} slices, extrapolated"))
    own_plan = timestep_plan(spec.schedule, REFERENCE_CODE_NOISE, REFERENCE_CODE_STEPS)
    if time.perf_counter() - T0 < BUDGET_S - 15:
        own_s, _ = _timed(lambda: reference(every, own_plan, REFERENCE_CODE_BATCH))
        note = f"{network_calls(n_all, len(own_plan), REFERENCE_CODE_BATCH)} calls, measured"
    else:
        own_s = ref_s * len(own_plan) / len(plan)
        note = "extrapolated from the batch-32 row (out of time budget)"
    rows.append((f"reference code's own settings ({len(own_plan)}+{len(own_plan)} steps, "
                 f"L={REFERENCE_CODE_NOISE}, batch 32)", f"{n_all}", own_s, note))
    model.to(memory_format=torch.channels_last)

    if os.environ.get("COMPILE", "1") == "0":
        rows.append(("pipeline + torch.compile", f"{n_brain}", None, "skipped (COMPILE=0)"))
    else:
        timeout = float(os.environ.get("COMPILE_TIMEOUT", "40"))
        left = BUDGET_S - (time.perf_counter() - T0)
        timeout = min(timeout, left)
        if timeout < 15:
            rows.append(("pipeline + torch.compile", f"{n_brain}", None,
                         f"skipped: {left:.0f} s of the {BUDGET_S:.0f} s budget left"))
        else:
            try:
                proc = subprocess.run([sys.executable, __file__, "--compile-row"], capture_output=True,
                                      text=True, timeout=timeout)
                if proc.returncode == 0:
                    got = json.loads(proc.stdout.strip().splitlines()[-1])
                    rows.append(("pipeline + torch.compile", f"{n_brain}", got["volume_s"],
                                 f"compiled in {got['compile_s']:.1f} s (first volume, both shapes)"))
                else:
                    tail = " ".join(proc.stderr.strip().splitlines()[-1:])[:160]
                    rows.append(("pipeline + torch.compile", f"{n_brain}", None, f"failed: {tail}"))
            except subprocess.TimeoutExpired:
                rows.append(("pipeline + torch.compile", f"{n_brain}", None,
                             f"did not compile and run within {timeout:.0f} s (process included)"))

    print()
    print("| method | slices | s per volume | vs batch-32 reference | notes |")
    print("|---|---|---|---|---|")
    for name, slices, seconds, note in rows:
        value = "-" if seconds is None else f"{seconds:.3f}"
        ratio = "-" if seconds is None or slices == "1" else f"{ref_s / seconds:.2f}x"
        print(f"| {name} | {slices} | {value} | {ratio} | {note} |")
    print()
    print(f"total time of this check: {time.perf_counter() - T0:.0f} s")
    print(f"gpu_speedup_vs_reference {ref_s / volume_s:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
