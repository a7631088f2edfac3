"""Step-by-step work: the long computations are generators that yield after every network call
(so that a GUI can show progress and stop between steps) and *return* their result as the
``StopIteration`` value. These are the two ways to consume one, written once.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

T = TypeVar("T")
R = TypeVar("R")

__all__ = ["Progress", "drain", "relay"]


@dataclass(frozen=True)
class Progress:
    """One network step done: ``step`` of ``total`` (both counted over all chunks)."""

    step: int
    total: int
    phase: Literal["invert", "decode"]


def drain(gen: Generator[T, Any, R], callback: Callable[[T], Any] | None = None) -> R:
    """Run a step generator to the end and return its value; ``callback`` gets each step."""
    while True:
        try:
            item = next(gen)
        except StopIteration as stop:
            return stop.value
        if callback is not None:
            callback(item)


def relay(gen: Generator[T, Any, R], step: Callable[[T], Any]) -> Generator[Any, None, R]:
    """``yield from gen``, yielding ``step(item)`` for each of its steps; closing the relay
    closes ``gen`` too (a cancelled run stops the inner work at once)."""
    try:
        while True:
            try:
                item = next(gen)
            except StopIteration as stop:
                return stop.value
            yield step(item)
    finally:
        gen.close()
