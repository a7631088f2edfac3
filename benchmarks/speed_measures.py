"""Each speed measure of issue 16 (second session) against its absence, in one process, rounds
interleaved, outputs compared: what each one buys on this CPU, measured so that the machine's
load (shared cores) moves both sides alike.

    python benchmarks/speed_measures.py              # bundled default model, BraTS-size volume
    python benchmarks/speed_measures.py --jit        # ... and torch.jit trace + freeze (rejected)
    python benchmarks/speed_measures.py --tiny       # smoke test: tiny random model, tiny volume

Input: the bundled sample case resampled to 240 x 240 x 155 (as ``gpu_check.py``). Rows, each
"before" (the code as it was) against "now" (the pipeline's code):

* network forward, the model itself against the inference copy (``core.inference_network``:
  cross-attention on the one label token is its value, weights already in bf16), at the
  pipeline's CPU batches (21 and 42: 145 brain slices in 7 chunks, decoding doubles them) and
  the one-slice preview's (1 and 2);
* the counterfactual of ``--slices`` slices (the whole-volume path in chunks) and of one slice
  (the preview): the model and a full sort in the dynamic normalisation against the inference
  copy and ``topk``;
* the model-space slices of the volume: crop, normalise, transpose (before) against one strided
  read into the slice-first layout (now);
* the volume outputs on the CPU: numpy (what the CPU uses) against the torch path that CUDA runs
  (``core.device_outputs``), to show why the CPU keeps numpy;
* with ``--jit``: the inference copy traced and frozen (``torch.jit``) against it, eager.

Times are medians over rounds; "now vs before" is the median of the per-round ratios (before /
now: above 1 is faster now). "outputs" is the largest absolute difference between the two sides.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

# The CLI's OpenMP wait policy, set before torch loads, as speed.py does for every row.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402


def _sorted_dynamic_normalise(x0: torch.Tensor, percentile: float = 99.0) -> torch.Tensor:
    """The dynamic normalisation as it was: the percentile from a full sort."""
    flat = x0.float().abs().flatten(2)
    values = flat.sort(dim=2).values
    pos = (percentile / 100.0) * (values.shape[2] - 1)
    lo, frac = int(math.floor(pos)), pos - math.floor(pos)
    hi = min(lo + 1, values.shape[2] - 1)
    q = (values[..., lo] + frac * (values[..., hi] - values[..., lo])).clamp_min(1.0)
    q = q.reshape(*q.shape, *([1] * (x0.dim() - 2)))
    return torch.maximum(torch.minimum(x0.float(), q), -q) / q


def _model_slices_before(data, brain, scales, box, index, size):
    """The model-space slices as they were made: crop, normalise, transpose, resize."""
    from napari_whatishealthy.core.preprocess import _crop, _resize, normalise_with

    x0, y0, side, _ = box
    crop = _crop(data[..., index], x0, y0, side, 0.0)
    crop_brain = _crop(brain[None, ..., index], x0, y0, side, False)[0]
    return _resize(normalise_with(crop, crop_brain, scales).transpose(3, 0, 1, 2), size)


def _max_diff(a, b) -> float:
    if isinstance(a, tuple):
        return max(_max_diff(x, y) for x, y in zip(a, b, strict=True))
    a = a.float().numpy() if isinstance(a, torch.Tensor) else np.asarray(a, dtype=np.float64)
    b = b.float().numpy() if isinstance(b, torch.Tensor) else np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max()) if a.size else 0.0


def compare(before: Callable[[], object], now: Callable[[], object], rounds: int,
            setup: Callable[[str], None] = lambda side: None) -> tuple[float, float, float, float]:
    """(before s, now s, median per-round ratio before/now, max |difference| of the outputs):
    one warm-up each, then ``rounds`` rounds alternating which side goes first."""
    sides = {"before": before, "now": now}
    outputs = {}
    for name, run in sides.items():
        setup(name)
        outputs[name] = run()
    times: dict[str, list[float]] = {"before": [], "now": []}
    for r in range(rounds):
        for name in (("before", "now") if r % 2 == 0 else ("now", "before")):
            setup(name)
            started = time.perf_counter()
            sides[name]()
            times[name].append(time.perf_counter() - started)
    setup("now")
    ratios = [b / n for b, n in zip(times["before"], times["now"], strict=True)]
    return (statistics.median(times["before"]), statistics.median(times["now"]),
            statistics.median(ratios), _max_diff(outputs["before"], outputs["now"]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--slices", type=int, default=42,
                        help="slices of the whole-volume counterfactual row (2 chunks at 42)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--jit", action="store_true", help="also torch.jit trace + freeze")
    parser.add_argument("--tiny", action="store_true", help="smoke test: tiny model and volume")
    args = parser.parse_args(argv)
    if args.tiny:
        os.environ["QUICK"] = "1"
    os.environ.setdefault("DEVICE", "cpu")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import gpu_check

    from napari_whatishealthy.core import counterfactual as cf
    from napari_whatishealthy.core import ddim
    from napari_whatishealthy.core import pipeline as pl
    from napari_whatishealthy.core.device_outputs import DeviceOutputs
    from napari_whatishealthy.core.hardware import cpu_info
    from napari_whatishealthy.core.inference_network import inference_network
    from napari_whatishealthy.core.pipeline import LocalizeSettings, localize, prepare_input
    from napari_whatishealthy.core.preprocess import _model_slices
    from napari_whatishealthy.core.runtime import tune_allocator

    tune_allocator()  # as the CLI and speed.py: without it, page faults move every timing
    torch.set_num_threads(args.threads)
    model, spec, description = gpu_check.load_model()
    data = gpu_check.load_volume()
    settings = LocalizeSettings.from_spec(spec, device="cpu")
    amp = cf.autocast_dtype(settings.amp, "cpu")
    cf.use_channels_last(model)
    copy = inference_network(model, amp)
    prepared = prepare_input(data, spec)
    slices = prepared.slices
    print(f"cpu: {cpu_info().describe()}; torch {torch.__version__}, {args.threads} threads, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'default')}")
    print(f"model: {description}; network: {cf.describe_inference('cpu', settings)}; volume "
          f"{list(data.shape[1:])}, {len(slices)} brain slices; {args.rounds} rounds")
    rows: list[tuple[str, str, float, float, float, float, str]] = []

    size, channels = spec.image_size, spec.in_channels
    rng = np.random.default_rng(0)

    def forward(network, x, t, y):
        def run():
            with torch.inference_mode(), torch.autocast("cpu", dtype=amp or torch.bfloat16,
                                                        enabled=amp is not None):
                return network(x, t, y).float()
        return run

    full = cf.default_batch_size("cpu")
    chunk = cf.chunk_bounds(len(slices), full)[0][1] if len(slices) else 1
    for batch in (chunk, 2 * chunk, 1, 2):
        x = torch.from_numpy(rng.standard_normal((batch, channels, size, size)).astype(np.float32))
        x = x.contiguous(memory_format=torch.channels_last)
        t = torch.from_numpy(rng.integers(0, 300, batch))
        y = torch.from_numpy(rng.integers(0, len(spec.labels), batch))
        repeats = 10 if batch <= 2 else 2

        def many(run, repeats=repeats):
            return lambda: [run() for _ in range(repeats)][-1]

        got = compare(many(forward(model, x, t, y)), many(forward(copy, x, t, y)), args.rounds)
        rows.append(("network forward: model -> inference copy", f"batch {batch}, ms per call",
                     got[0] * 1000 / repeats, got[1] * 1000 / repeats, got[2], got[3], "ms"))
        if args.jit and batch in (2 * chunk, 2):
            with warnings.catch_warnings(), torch.inference_mode(), torch.autocast(
                    "cpu", dtype=amp or torch.bfloat16, enabled=amp is not None):
                warnings.simplefilter("ignore")
                started = time.perf_counter()
                frozen = torch.jit.freeze(torch.jit.trace(copy, (x, t, y), check_trace=False).eval())
                frozen(x, t, y)
                made = time.perf_counter() - started
            got = compare(many(forward(copy, x, t, y)), many(forward(frozen, x, t, y)), args.rounds)
            rows.append((f"network forward: inference copy -> jit trace + freeze ({made:.1f} s "
                         "to make)", f"batch {batch}, ms per call", got[0] * 1000 / repeats,
                         got[1] * 1000 / repeats, got[2], got[3], "ms"))

    topk_dynamic_normalise = ddim.dynamic_normalise

    def counterfactual_mode(side: str) -> None:
        if side == "before":
            cf.inference_network = lambda model, dtype: model
            ddim.dynamic_normalise = _sorted_dynamic_normalise
        else:
            cf.inference_network = inference_network
            ddim.dynamic_normalise = topk_dynamic_normalise
    n = min(args.slices, len(slices))
    some = slices[np.linspace(0, len(slices) - 1, n).round().astype(int)]
    run = lambda: cf.counterfactual(model, some, settings)  # noqa: E731
    got = compare(run, run, args.rounds, counterfactual_mode)
    rows.append(("counterfactual: model + sort -> inference copy + topk",
                 f"{n} slices, s", *got, "s"))
    centre = int(prepared.slice_index[len(prepared.slice_index) // 2])
    preview = lambda: localize(model, spec, data, settings, z_slices=[centre],  # noqa: E731
                               prepared=prepared).difference
    got = compare(preview, preview, args.rounds, counterfactual_mode)
    rows.append(("one-slice preview (localize, volume prepared): the same", "1 slice, s",
                 *got, "s"))

    parts = (data, prepared.brain, prepared.scale, prepared.box, prepared.slice_index, size)
    got = compare(lambda: _model_slices_before(*parts), lambda: _model_slices(*parts), args.rounds)
    rows.append(("model-space slices: crop + normalise + transpose -> one strided read",
                 f"{len(slices)} slices, s", *got, "s"))

    healthy = (slices + 0.05 * rng.standard_normal(slices.shape)).astype(np.float32)
    erosion, median = int(settings.edge_erosion), int(settings.median_size)

    def host():
        scored = pl._scored_region(prepared.brain, prepared.slice_index, erosion)
        return pl._volume_outputs(data, prepared, prepared, healthy, median, scored)

    got = compare(host, lambda: DeviceOutputs(data, prepared, prepared, median, erosion, "cpu")(healthy),
                  args.rounds)
    rows.append(("volume outputs on the CPU: numpy (used) -> torch (CUDA's path)",
                 f"{len(slices)} slices, s", *got, "s"))

    print()
    print("| measure | workload | before | now | now vs before | outputs max abs diff |")
    print("|---|---|---|---|---|---|")
    for name, work, before, now, ratio, diff, unit in rows:
        digits = 2 if unit == "ms" else 3
        print(f"| {name} | {work} | {before:.{digits}f} | {now:.{digits}f} | {ratio:.3f}x | "
              f"{diff:.2e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
