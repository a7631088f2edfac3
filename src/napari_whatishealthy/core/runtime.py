"""Process-level settings: an allocator that makes the CPU path fast and steady, OpenMP threads
that sleep rather than spin while waiting (shared cores), and SIGTERM handled like Ctrl-C.

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
from collections.abc import Iterator, MutableMapping

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_tuned = False


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
    if "OMP_WAIT_POLICY" in environ:
        return False
    environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return True
