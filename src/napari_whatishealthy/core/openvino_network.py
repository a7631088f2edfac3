"""The network compiled by OpenVINO: the CPU backend where it is installed (issue 16).

On the AMD EPYC (AVX512_BF16, no AMX) where it was measured, quiet, two threads, the bundled
default model: OpenVINO's bf16 forward took 6.4-6.5 ms per slice at the pipeline's batches of
21 and 42 against 7.8-8.2 ms for torch's bf16 autocast (1.2x), and 7-8 ms against 19-28 ms for a
one- or two-slice preview call (2.5x); in float32 14.5 against 15.7 ms. Its outputs differ from
torch float32 as much as torch's own bf16 does (mean 0.0033 in units of the predicted noise;
docs/benchmarks.md, ``benchmarks/backends.py``).

What is compiled is the exact float32 inference copy (:mod:`.inference_network`: the one-token
cross-attention reads its value), exported with ``torch.export`` (dynamic batch) and converted
by OpenVINO's PyTorch front end; no ONNX. The conversion takes about 5 s, so its result (an IR
``.xml``/``.bin`` pair) is kept on disk in the user cache, keyed by a hash of the weights, the
spec, the torch and OpenVINO versions and :data:`EXPORT_RECIPE`; a later process reads it in
well under a second, and compiling it for this CPU takes a quarter of a second. Nothing happens
at import. The DDIM arithmetic around the network stays in torch, float32.

Backends (``LocalizeSettings.backend``, ``--backend``): ``"torch"`` always calls torch;
``"openvino"`` insists (a clear error when it cannot); ``"auto"`` uses OpenVINO for a
:class:`~.model.ConditionalUNet` on an x86-64 CPU where the package is installed and the
precision is bf16 or float32, and torch otherwise (GPUs, other predictors, fp16); if the
conversion fails there, it says so once and stays on torch.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import platform
import shutil
import sys
import tempfile
import threading
import warnings
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import WhatIsHealthyError
from .runtime import user_cache_dir

__all__ = ["BACKENDS", "EXPORT_RECIPE", "OpenVINONetwork", "choose_backend", "forget_networks",
           "openvino_installed", "openvino_network"]

BACKENDS = ("auto", "torch", "openvino")
#: Bump when the export below changes: IRs cached by an older recipe are then not read.
EXPORT_RECIPE = 1
_X86 = {"x86_64", "amd64", "x64", "i686", "i386"}

_log = logging.getLogger(__name__)
_LOCK = threading.Lock()
_IMPORT_LOCK = threading.Lock()
# model -> {(precision, threads): (weights key, network or the reason it failed)}
_NETWORKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def import_openvino() -> Any:
    """``import openvino``, without its usage telemetry.

    OpenVINO's Python package reports usage (an event when it is imported, more on each
    conversion) to Google Analytics unless the user opted out in its consent file or it runs in
    CI. This package never reaches the network at run time, so it imports OpenVINO with the
    telemetry module hidden, and OpenVINO falls back to its own no-op stub. Where OpenVINO was
    imported before, by the user's own code, its telemetry is as the user left it."""
    if "openvino" not in sys.modules:
        with _IMPORT_LOCK:
            hidden = "openvino_telemetry" not in sys.modules
            if hidden:
                sys.modules["openvino_telemetry"] = None  # type: ignore[assignment] # import fails
            try:
                import openvino  # noqa: F401
            finally:
                if hidden:
                    sys.modules.pop("openvino_telemetry", None)
    import openvino

    return openvino


def openvino_installed() -> bool:
    return importlib.util.find_spec("openvino") is not None


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise WhatIsHealthyError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")


def choose_backend(backend: str, device: torch.device | str, amp_dtype: torch.dtype | None) -> str:
    """``"torch"`` or ``"openvino"``: what ``backend`` means for a ConditionalUNet run on
    ``device`` at ``amp_dtype`` (None: float32). ``"openvino"`` where it cannot run is an error
    that says why and what to do."""
    check_backend(backend)
    if backend == "torch":
        return "torch"
    cpu = torch.device(device).type == "cpu"
    if backend == "openvino":
        if not cpu:
            raise WhatIsHealthyError(f"backend openvino runs on a CPU, not {device}; use "
                                     "--device cpu, or --backend auto (torch on a GPU)")
        if amp_dtype not in (None, torch.bfloat16):
            raise WhatIsHealthyError("backend openvino computes in bf16 or float32, not "
                                     f"{amp_dtype}; use --amp auto, bf16 or off")
        if not openvino_installed():
            raise WhatIsHealthyError("backend openvino needs the openvino package: pip install "
                                     "openvino (or use --backend torch)")
        return "openvino"
    ok = (cpu and amp_dtype in (None, torch.bfloat16) and platform.machine().lower() in _X86
          and openvino_installed())
    return "openvino" if ok else "torch"


def forget_networks() -> None:
    """Drop the compiled networks kept in this process (the disk cache stays): a later call
    compiles again, as a new process would."""
    with _LOCK:
        _NETWORKS.clear()


def _precision(amp_dtype: torch.dtype | None) -> str:
    return "bf16" if amp_dtype == torch.bfloat16 else "f32"


class OpenVINONetwork:
    """Called like the model, ``network(x, t, labels) -> eps`` on CPU tensors (float32 out), by
    an OpenVINO model compiled for this CPU in its throughput mode: a call's slices are split
    over the model's streams (on 2 cores, 2 streams of one thread each), which run at once. On
    the 2-core EPYC that was 6.1-6.3 ms per slice at the pipeline's batches against 6.4-7.1 ms
    for one stream of two threads, and no slower for a one- or two-slice preview (13 ms per
    call either way at 2 slices). Requests are not thread-safe (the compiled model is): a call
    takes a set from a pool and puts it back, so concurrent calls use different sets. The pool
    belongs to this object, not to threads: requests kept in thread-local storage were destroyed
    when a Qt worker thread ended, in the middle of Python's thread teardown, which crashed
    napari."""

    def __init__(self, compiled: Any, precision: str, threads: int, source: str) -> None:
        self.compiled = compiled
        self.precision = precision
        self.threads = threads
        self.source = source  # where the IR came from: "converted" or "cache"
        self.streams = max(1, int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
        self._idle: list[list[Any]] = []  # request sets not in use
        self._idle_lock = threading.Lock()

    @property
    def description(self) -> str:
        version = import_openvino().get_version().split("-")[0]
        return (f"openvino {version}, {self.precision}, {self.threads} threads in "
                f"{self.streams} streams")

    def __call__(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with self._idle_lock:
            requests = self._idle.pop() if self._idle else None
        if requests is None:
            requests = [self.compiled.create_infer_request() for _ in range(self.streams)]
        try:
            return self._infer(requests, x, t, labels)
        finally:
            with self._idle_lock:
                self._idle.append(requests)

    def _infer(self, requests: list[Any], x: torch.Tensor, t: torch.Tensor,
               labels: torch.Tensor) -> torch.Tensor:
        arrays = [np.ascontiguousarray(a.detach().cpu().numpy())
                  for a in (x.float().contiguous(), t.long(), labels.long())]
        batch = arrays[0].shape[0]
        edges = np.linspace(0, batch, min(self.streams, batch) + 1).round().astype(int)
        parts = list(zip(edges[:-1], edges[1:], requests, strict=False))
        for lo, hi, request in parts:
            request.start_async([a[lo:hi] for a in arrays])
        out = np.empty(arrays[0].shape, dtype=np.float32)
        for lo, hi, request in parts:
            request.wait()
            out[lo:hi] = request.get_output_tensor(0).data  # copied: the request reuses it
        return torch.from_numpy(out)


def _weights_digest(network: torch.nn.Module) -> str:
    """What the cached IR depends on: weights, spec, library versions, the export recipe."""
    openvino = import_openvino()
    digest = hashlib.sha256()
    spec = getattr(network, "spec", None)
    digest.update(repr((EXPORT_RECIPE, torch.__version__, openvino.get_version(),
                        spec.to_json() if spec is not None else type(network).__name__)).encode())
    for name, tensor in network.state_dict().items():
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _convert(network: torch.nn.Module) -> Any:
    """The float32 network as an OpenVINO model with a dynamic batch."""
    ov = import_openvino()
    spec = network.spec
    # An example of 2 slices: torch.export specialises a dimension seen as 1.
    example = (torch.zeros(2, spec.in_channels, spec.image_size, spec.image_size),
               torch.full((2,), 1, dtype=torch.long), torch.zeros(2, dtype=torch.long))
    batch = torch.export.Dim("batch", min=1, max=4096)
    with warnings.catch_warnings():  # torch.export's own deprecation notices, not the user's
        warnings.simplefilter("ignore", FutureWarning)
        exported = torch.export.export(network, example, strict=False,
                                       dynamic_shapes=({0: batch}, {0: batch}, {0: batch}))
        return ov.convert_model(exported)


def _cached_model(network: torch.nn.Module, cache: Path | None, core: Any) -> tuple[Any, str]:
    """(OpenVINO model, "cache" or "converted"): read by ``core`` from ``cache`` when it holds
    this network's IR, else converted and (when ``cache`` is writable) saved there atomically."""
    ov = import_openvino()
    digest = _weights_digest(network)
    folder = cache / digest[:32] if cache is not None else None
    if folder is not None and (folder / "network.xml").is_file():
        try:
            return core.read_model(str(folder / "network.xml")), "cache"
        except Exception as exc:  # noqa: BLE001 - a damaged cache entry is remade
            _log.warning("the cached OpenVINO network in %s could not be read (%s); converting "
                         "it again", folder, exc)
            shutil.rmtree(folder, ignore_errors=True)
    _log.info("converting the network for OpenVINO (once per model and version, a few seconds)")
    model = _convert(network)
    if folder is not None:
        try:
            folder.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{digest[:8]}-", dir=folder.parent))
            ov.save_model(model, str(staging / "network.xml"), compress_to_fp16=False)
            try:
                os.rename(staging, folder)  # whole or absent, for concurrent processes too
            except OSError:  # another process saved it first: theirs is the same network
                shutil.rmtree(staging, ignore_errors=True)
        except OSError as exc:
            _log.warning("could not keep the OpenVINO network in %s (%s); it will be converted "
                         "again next time", folder, exc)
    return model, "converted"


def default_cache() -> Path | None:
    """Where converted networks are kept: ``$WHATISHEALTHY_OPENVINO_CACHE`` (empty: nowhere),
    else the user cache."""
    chosen = os.environ.get("WHATISHEALTHY_OPENVINO_CACHE")
    if chosen is not None:
        return Path(chosen) if chosen else None
    return user_cache_dir() / "openvino"


def openvino_network(model: Any, amp_dtype: torch.dtype | None, threads: int | None = None,
                     cache: Path | None | str = "default") -> OpenVINONetwork:
    """``model`` (a :class:`~.model.ConditionalUNet`) compiled by OpenVINO at ``amp_dtype``'s
    precision for ``threads`` (default: torch's) threads, made once per model, weights,
    precision and thread count in this process, and converted once per machine (the IR is kept
    in ``cache``; ``"default"``: :func:`default_cache`, None: not kept). Raises what the
    conversion raised."""
    from .inference_network import inference_network, weights_key

    ov = import_openvino()
    threads = int(threads or torch.get_num_threads())
    precision = _precision(amp_dtype)
    key = (weights_key(model),)
    with _LOCK:
        kept = _NETWORKS.setdefault(model, {}).get((precision, threads))
        if kept is not None and kept[0] == key:
            if isinstance(kept[1], BaseException):
                raise kept[1]
            return kept[1]
        try:
            exact = inference_network(model, None)  # float32, one-token cross-attention
            folder = default_cache() if cache == "default" else (Path(cache) if cache else None)
            core = ov.Core()
            ov_model, source = _cached_model(exact, folder, core)
            compiled = core.compile_model(ov_model, "CPU", {
                "INFERENCE_PRECISION_HINT": precision, "INFERENCE_NUM_THREADS": threads,
                "PERFORMANCE_HINT": "THROUGHPUT"})
        except Exception as exc:
            _NETWORKS[model][(precision, threads)] = (key, exc)  # not retried for these weights
            raise
        network = OpenVINONetwork(compiled, precision, threads, source)
        _NETWORKS[model][(precision, threads)] = (key, network)
        return network
