"""What the CPU can do, for the run-time choices that depend on it and for benchmark headers.

The network's speed on a CPU depends on a few instruction-set features: AVX-512, AVX-512 BF16
(bf16 dot products in vector registers) and AMX (bf16 matrix tiles, Intel Xeon from Sapphire
Rapids on). They are read from ``/proc/cpuinfo`` (Linux); elsewhere only torch's own view of the
CPU (``torch.backends.cpu.get_cpu_capability()``) is known.
"""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass

__all__ = ["CpuInfo", "cpu_info"]

_FEATURES = {
    "avx2": "AVX2",
    "avx512f": "AVX-512",
    "avx512_bf16": "AVX512_BF16",
    "amx_bf16": "AMX-BF16",
    "amx_tile": "AMX-TILE",
}


@dataclass(frozen=True)
class CpuInfo:
    """The CPU model, the relevant feature flags it reports and torch's CPU capability."""

    model: str
    flags: frozenset[str]
    torch_capability: str
    cores: int

    @property
    def has_amx(self) -> bool:
        return "amx_bf16" in self.flags and "amx_tile" in self.flags

    @property
    def has_avx512_bf16(self) -> bool:
        return "avx512_bf16" in self.flags

    @property
    def native_bf16(self) -> bool:
        """bf16 arithmetic in hardware (AMX or AVX512_BF16): where bf16 autocast pays."""
        return self.has_amx or self.has_avx512_bf16

    def describe(self) -> str:
        """One line: ``AMD EPYC, 2 cores, AVX2 AVX-512 AVX512_BF16 (no AMX), torch AVX512``."""
        present = [name for flag, name in _FEATURES.items() if flag in self.flags]
        missing = "" if self.has_amx else " (no AMX)"
        return (f"{self.model}, {self.cores} cores, {' '.join(present) or 'no AVX2/AVX-512'}"
                f"{missing}, torch CPU capability {self.torch_capability}")


def _proc_cpuinfo() -> tuple[str, frozenset[str]]:
    model, flags = "", frozenset()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and not model:
                    model = value.strip()
                elif key == "flags" and not flags:
                    flags = frozenset(value.split())
                if model and flags:
                    break
    except OSError:
        pass
    return model, flags


@functools.lru_cache(maxsize=1)
def cpu_info() -> CpuInfo:
    """This machine's :class:`CpuInfo` (read once)."""
    import torch

    model, flags = _proc_cpuinfo()
    try:
        capability = str(torch.backends.cpu.get_cpu_capability())
    except (AttributeError, RuntimeError):
        capability = "unknown"
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return CpuInfo(model=model or platform.processor() or platform.machine(),
                   flags=frozenset(f for f in flags if f in _FEATURES),
                   torch_capability=capability, cores=cores)
