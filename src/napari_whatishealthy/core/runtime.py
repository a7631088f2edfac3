"""Process-level settings: an allocator that makes the CPU path fast and steady, OpenMP threads
that sleep rather than spin while waiting (shared cores; a bounded spin in napari's process),
and SIGTERM handled like Ctrl-C.

glibc by default returns large activation buffers to the system after every forward pass, which
costs about a million page faults per pass on a big batch and makes timings jump; keeping the
memory mapped made forward passes about 2x faster here (docs/engine.md). Call once at start-up.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_tuned = False


def user_cache_dir() -> Path:
    """This package's folder in the user cache (``$XDG_CACHE_HOME``, else ``~/.cache``)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "napari-whatishealthy"


def worker_threads() -> int:
    """Threads for numpy and scipy work that releases the GIL (filters over a volume): as many
    as torch may use, which is what the user or the environment allowed this process."""
    import torch

    return max(1, int(torch.get_num_threads()))


def run_in_threads(tasks: list[Callable[[], Any]], workers: int | None = None) -> list[Any]:
    """Each task's result, in order, the tasks run on up to ``workers`` threads (default
    :func:`worker_threads`); one worker or one task: run here, in order."""
    workers = min(len(tasks), workers or worker_threads())
    if workers <= 1:
        return [task() for task in tasks]
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="whatishealthy") as pool:
        return list(pool.map(lambda task: task(), tasks))


def tune_allocator() -> bool:
    """Keep freed memory mapped (glibc only); returns whether it applied. Safe to call twice."""
    global _tuned
    if _tuned:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 2**30) == 1
    except (OSError, AttributeError):
        return False
    _tuned = ok
    return ok


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, ``timeout``, a cluster's preemption), raised like Ctrl-C so that the
    same clean-up runs: outputs stay whole, temporary files go, a training run saves."""


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` in the main thread (elsewhere it
    does nothing). Background jobs ignore SIGINT, so SIGTERM is the signal that reaches them."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise Terminated(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def prefer_passive_omp_wait(environ: MutableMapping[str, str] | None = None) -> bool:
    """Ask OpenMP (torch's CPU threads) to sleep rather than spin while waiting, unless the user
    chose a policy (``OMP_WAIT_POLICY`` already set); returns whether it was set here.

    Only effective before torch is imported (libgomp reads it once). With the default policy, a
    waiting thread spins; when the cores are shared with other jobs (a cluster node, a busy
    workstation) the thread it waits for is often descheduled and every network call pays for
    it: the default model's forward took 264-357 ms per slice with two threads on a 2-core
    machine at load 9, and 52-62 ms with ``OMP_WAIT_POLICY=PASSIVE`` (docs/benchmarks.md).
    """
    environ = os.environ if environ is None else environ
    if _user_chose_omp_wait(environ):
        return False
    environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return True


#: Iterations a waiting OpenMP thread spins (libgomp's ``GOMP_SPINCOUNT``) before it sleeps, in
#: napari's process. A previews' network calls are short, so a thread that sleeps at once
#: (PASSIVE) pays a wake-up on every parallel region; one that spins without bound (OpenMP's
#: default) starves the other jobs' threads on shared cores. Measured on the 2-core development
#: machine, one-slice preview / 48 slices, s (docs/benchmarks.md, *Threads*): quiet, PASSIVE
#: 0.40 / 7.8-8.1, this bound 0.23-0.25 / 7.2-7.8, the default 0.24 / 7.4; with two busy
#: processes on the two cores, PASSIVE 0.40 / 13.8, this bound 0.55 / 15.5, the default 0.96 /
#: 24.4 (and up to 43 s per preview in an earlier, busier measurement).
BOUNDED_SPIN_COUNT = 10_000


def prefer_bounded_omp_spin(environ: MutableMapping[str, str] | None = None,
                            torch_loaded: bool | None = None) -> bool:
    """For the napari widget, which shares napari's process (the CLI uses
    :func:`prefer_passive_omp_wait`): torch's OpenMP threads spin for a bounded time
    (:data:`BOUNDED_SPIN_COUNT`) before they sleep, unless the user chose a policy
    (``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` set) or torch is already loaded
    (``torch_loaded``, default: imported in this process; libgomp reads the setting once, when
    it loads). Returns whether it was set here."""
    environ = os.environ if environ is None else environ
    if torch_loaded is None:
        torch_loaded = "torch" in sys.modules
    if torch_loaded or _user_chose_omp_wait(environ):
        return False
    environ["GOMP_SPINCOUNT"] = str(BOUNDED_SPIN_COUNT)
    return True


def _user_chose_omp_wait(environ: MutableMapping[str, str]) -> bool:
    return "OMP_WAIT_POLICY" in environ or "GOMP_SPINCOUNT" in environ
