"""CPU inference backends for the network's forward pass, same model, same inputs, one table.

    python benchmarks/backends.py                 # the bundled default model, the pipeline's batches
    python benchmarks/backends.py --tiny          # smoke test: tiny random model (seconds)
    python benchmarks/backends.py --rounds 7 --batches 21,42

Backends: torch eager in float32, torch eager with bf16 autocast and channels-last (the torch
backend, as ``--backend torch`` runs it: the reference row), the product's OpenVINO backend as
the pipeline calls it (``core.openvino_network``: the exact float32 copy exported with
torch.export, bf16, the call split over throughput streams; the default on x86-64), and from one
ONNX export, plain OpenVINO (float32 and bf16 inference precision, one stream; bf16 runs on AMX
or AVX512_BF16 where present) and ONNX Runtime (float32; its CPU provider has no bf16
convolutions). ONNX Runtime and the ONNX export are optional: a backend whose package is not
installed is listed as skipped (``pip install onnxruntime onnx onnxscript`` to measure them).

The batches are the pipeline's on a CPU: a BraTS volume has about 145 brain slices, split into 7
even chunks of 20-21 (inversion calls the network with a chunk, decoding with twice that: the
null and the healthy pass in one call). Every backend is timed on the same inputs, in rounds that
alternate the backends (the machine may be shared: the median over rounds is reported, and the
best round beside it), after one warm-up call per shape. Outputs are compared with torch float32
on the same inputs (max and mean absolute difference, in the units of the predicted noise, whose
standard deviation is about 1).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

Forward = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]
TORCH_ROW = "torch bf16 autocast, channels-last (the torch backend)"


def _load(tiny: bool, model_name: str):
    from napari_whatishealthy.core.model import ModelSpec, NetworkSpec, build_model

    if tiny:
        torch.manual_seed(0)
        spec = ModelSpec(image_size=16, network=NetworkSpec(
            channels=(8, 16), attention_levels=(False, True), norm_num_groups=8,
            num_head_channels=8, label_embedding_dim=8))
        return build_model(spec).eval(), "tiny random-init model"
    from napari_whatishealthy.core.registry import load_model_cached, resolve_model

    path = resolve_model(model_name)
    model, _, digest = load_model_cached(path, "cpu")
    return model, f"{path.name} (sha256 {digest[:12]})"


def torch_forward(model: torch.nn.Module, bf16: bool) -> Forward:
    def run(x, t, labels):
        xt = torch.from_numpy(x)
        if bf16:
            xt = xt.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return model(xt, torch.from_numpy(t), torch.from_numpy(labels)).float().numpy()
    return run


def export_onnx(model: torch.nn.Module, example: tuple[torch.Tensor, ...], path: Path) -> float:
    """Export with a dynamic batch dimension; returns the seconds it took."""
    started = time.perf_counter()
    batch = torch.export.Dim("batch", min=1, max=4096)
    torch.onnx.export(model, example, str(path), input_names=["x", "t", "labels"],
                      output_names=["eps"], dynamo=True, optimize=True,
                      dynamic_shapes=({0: batch}, {0: batch}, {0: batch}))
    return time.perf_counter() - started


def openvino_forward(onnx_path: Path, precision: str, threads: int) -> Forward:
    from napari_whatishealthy.core.openvino_network import import_openvino

    ov = import_openvino()  # without its usage telemetry, as the package imports it

    core = ov.Core()
    compiled = core.compile_model(str(onnx_path), "CPU", {
        "INFERENCE_PRECISION_HINT": precision, "INFERENCE_NUM_THREADS": threads,
        "PERFORMANCE_HINT": "LATENCY"})
    request = compiled.create_infer_request()

    def run(x, t, labels):
        return request.infer([x, t, labels])[0].copy()
    return run


def onnxruntime_forward(onnx_path: Path, threads: int) -> Forward:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])

    def run(x, t, labels):
        return session.run(None, {"x": x, "t": t, "labels": labels})[0]
    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--batches", default="21,42", help="slices per call (inversion, decoding)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=3, help="calls per shape per round")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)

    from napari_whatishealthy.core.hardware import cpu_info
    from napari_whatishealthy.core.runtime import tune_allocator

    tune_allocator()
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    model, description = _load(args.tiny, args.model)
    spec = model.spec
    batches = [int(b) for b in args.batches.split(",")]
    rng = np.random.default_rng(0)
    inputs = {}
    for b in batches:
        x = rng.standard_normal((b, spec.in_channels, spec.image_size, spec.image_size)).astype(np.float32)
        t = np.full(b, 250, dtype=np.int64)
        labels = np.where(np.arange(b) < b // 2, 2, 0).astype(np.int64)  # null and healthy halves
        inputs[b] = (x, t, labels)

    backends: dict[str, Forward] = {}
    notes: dict[str, str] = {}
    backends["torch float32"] = torch_forward(model, bf16=False)
    # The pipeline's own network: channels-last weights, then the inference copy (single-token
    # cross-attention, weights already bf16) that counterfactual() calls under autocast.
    from napari_whatishealthy.core.counterfactual import use_channels_last
    from napari_whatishealthy.core.inference_network import inference_network

    pipeline_model = copy.deepcopy(model)
    use_channels_last(pipeline_model)
    backends[TORCH_ROW] = torch_forward(inference_network(pipeline_model, torch.bfloat16),
                                        bf16=True)
    if not args.tiny:  # the product's OpenVINO backend, as the pipeline calls it
        try:
            from napari_whatishealthy.core.openvino_network import openvino_network

            product = openvino_network(model, torch.bfloat16, threads)
            backends[f"OpenVINO bf16, {product.streams} streams (core.openvino_network: "
                     "the pipeline's)"] = lambda x, t, labels: product(
                torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(labels)).numpy()
        except ImportError:
            notes["OpenVINO (pipeline)"] = "skipped: openvino not installed"
    tmp = Path(tempfile.mkdtemp(prefix="whatishealthy-backends-"))
    onnx_path = tmp / "model.onnx"
    try:
        import onnx  # noqa: F401

        b0 = batches[0]
        example = tuple(torch.from_numpy(a) for a in inputs[b0])
        export_s = export_onnx(model, example, onnx_path)
        notes["export"] = f"ONNX export {export_s:.1f} s"
    except Exception as exc:  # noqa: BLE001 - any export failure is reported, not fatal
        notes["export"] = f"ONNX export failed: {type(exc).__name__}: {str(exc)[:200]}"
        onnx_path = None
    for name, make in (
        ("OpenVINO float32", lambda: openvino_forward(onnx_path, "f32", threads)),
        ("OpenVINO bf16", lambda: openvino_forward(onnx_path, "bf16", threads)),
        ("ONNX Runtime float32", lambda: onnxruntime_forward(onnx_path, threads)),
    ):
        if onnx_path is None:
            notes[name] = "skipped: no ONNX export"
            continue
        try:
            backends[name] = make()
        except ImportError as exc:
            notes[name] = f"skipped: {exc.name or exc} not installed"
        except Exception as exc:  # noqa: BLE001
            notes[name] = f"failed: {type(exc).__name__}: {str(exc)[:160]}"

    truth = {b: backends["torch float32"](*inputs[b]) for b in batches}
    errors = {}
    for name, fn in backends.items():
        diffs = [np.abs(fn(*inputs[b]) - truth[b]) for b in batches]  # also the warm-up
        errors[name] = (max(float(d.max()) for d in diffs), float(np.mean([d.mean() for d in diffs])))
    timings: dict[str, list[float]] = {name: [] for name in backends}
    for _ in range(args.rounds):
        for name, fn in backends.items():
            started = time.perf_counter()
            slices = 0
            for b in batches:
                for _ in range(args.calls):
                    fn(*inputs[b])
                    slices += b
            timings[name].append(1000 * (time.perf_counter() - started) / slices)

    info = cpu_info()
    print(f"model: {description}; batches {batches} (slices per call); {threads} threads; "
          f"torch {torch.__version__}")
    print(f"cpu: {info.describe()}")
    versions = []
    for package in ("openvino", "onnxruntime"):  # openvino is imported by now, if installed
        try:
            versions.append(f"{package} {__import__(package).__version__}")
        except ImportError:
            versions.append(f"{package} not installed")
    print(f"{', '.join(versions)}; {notes['export']}; load average {os.getloadavg()[0]:.1f} at the end")
    print()
    reference = statistics.median(timings[TORCH_ROW])
    print("| backend | ms per slice (median) | best round | vs the torch backend | max abs diff | mean abs diff |")
    print("|---|---|---|---|---|---|")
    for name in backends:
        med = statistics.median(timings[name])
        print(f"| {name} | {med:.2f} | {min(timings[name]):.2f} | {reference / med:.2f}x | "
              f"{errors[name][0]:.4f} | {errors[name][1]:.5f} |")
    for name, note in notes.items():
        if name != "export":
            print(f"| {name} | - | - | - | {note} | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
