"""Progress for terminals and for logs: a live bar in a terminal, nothing per step elsewhere.

A tqdm bar redraws itself with carriage returns; written to a file, a pipe or a cluster's job
log every redraw becomes another chunk of the same line, and a cohort's log becomes unreadable.
:func:`progress_bar` therefore gives a real tqdm bar only when its stream is a terminal, and
otherwise a silent counter with the same methods: the callers write their own one line per case
(or per training log interval), which is what a log should hold.
"""

from __future__ import annotations

import sys
from typing import IO, Any

__all__ = ["SilentBar", "interval_line", "is_live", "is_terminal", "progress_bar"]


def is_terminal(stream: IO[str] | None = None) -> bool:
    """Whether ``stream`` (default: stderr, where bars go) is an interactive terminal."""
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return False


class SilentBar:
    """The parts of tqdm's interface the project uses, counting without writing anything."""

    def __init__(self, total: int | None = None, initial: int = 0, desc: str = "") -> None:
        self.total = total
        self.n = initial
        self.desc = desc

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_description(self, desc: str = "", refresh: bool = True) -> None:
        self.desc = desc

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        pass

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        pass

    def reset(self, total: int | None = None) -> None:
        self.n = 0
        if total is not None:
            self.total = total

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> SilentBar:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def progress_bar(total: int | None = None, *, desc: str = "", unit: str = "step", initial: int = 0,
                 file: IO[str] | None = None, leave: bool = True) -> Any:
    """A tqdm bar on ``file`` (default stderr) if it is a terminal, else a :class:`SilentBar`."""
    stream = sys.stderr if file is None else file
    if not is_terminal(stream):
        return SilentBar(total, initial, desc)
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit=unit, file=stream,
                dynamic_ncols=True, leave=leave)


def interval_line(record: dict[str, Any], total: int) -> str:
    """One log line for a training log interval: ``step 50/1000: loss 0.0412, val_loss 0.0391,
    acc 0.91, 812 slices/s, 61.0 s``."""
    parts = [f"{key} {record[key]:.4g}" for key in ("loss", "val_loss", "acc", "val_acc")
             if isinstance(record.get(key), int | float)]
    if "slices_per_s" in record:
        parts.append(f"{record['slices_per_s']:.0f} slices/s")
    if "elapsed_s" in record:
        parts.append(f"{record['elapsed_s']:.1f} s")
    return f"step {record['step']}/{total}: " + ", ".join(parts)


def is_live(bar: Any) -> bool:
    """Whether ``bar`` (from :func:`progress_bar`, or None) draws itself in a terminal."""
    return bar is not None and not isinstance(bar, SilentBar)
