"""Whether a volume fits in memory: the estimated peak of localizing it, and the check that
refuses it before any work when the system cannot give that much."""

from __future__ import annotations

from .errors import InputError

__all__ = ["available_memory", "check_memory", "peak_bytes"]


def peak_bytes(voxels: int, channels: int) -> int:
    """Estimated peak memory of localizing a volume of ``voxels`` voxels per channel: the input,
    healthy and per-channel difference maps (float32 per channel) plus the difference, brain,
    mask and their napari-order copies. A 640^3 single-channel volume peaked at 10.1 GB, 38
    bytes per voxel (issue 17); this gives 38."""
    return int(voxels) * (12 * int(channels) + 26)


def available_memory() -> int | None:
    """Bytes the system can still give (MemAvailable); None where that is unknown."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_memory(voxels: int, channels: int, where: str = "") -> None:
    """Refuse a volume whose estimated peak (:func:`peak_bytes`) exceeds the available memory,
    before any work, with the estimate."""
    need, have = peak_bytes(voxels, channels), available_memory()
    if have is not None and need > have:
        prefix = f"{where}: " if where else ""
        raise InputError(
            f"{prefix}localizing this volume ({voxels / 1e6:.0f} M voxels x {channels} channel(s)) "
            f"needs about {need / 2**30:.1f} GiB of memory, {have / 2**30:.1f} GiB are available; "
            "crop or resample it, or close other programs"
        )
