"""Cohort runs split over processes: which cases this process runs, on which device, and
which of them are already done.

A cohort is split into ``N`` shards by case position (case ``i`` goes to shard ``i mod N``, so
shards differ by at most one case and each case belongs to exactly one shard). The shard of a
process comes from ``torchrun`` (``RANK`` / ``WORLD_SIZE``), from ``--shard K/N`` (a job array
without torchrun), or from both (job ``K`` of ``N``, each with ``W`` ranks: shard
``K * W + rank`` of ``N * W``). Under torchrun each rank takes its own GPU (``LOCAL_RANK``), or
an equal share of the CPU cores. Every case's outputs are the same files a single process
writes: the split only decides who computes them.

``--resume`` skips a case whose outputs all exist and whose provenance records the same model
(SHA-256), the same settings and the same input files, and whose outputs still have the SHA-256
the provenance recorded when they were written.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from .errors import WhatIsHealthyError

T = TypeVar("T")

__all__ = ["Shard", "current_shard", "outputs_done", "parse_shard"]

# Settings that decide where and how fast a result is computed, not what it is.
_RUN_ONLY_SETTINGS = ("device", "batch_size")


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"K/N"`` (K counted from 0, as ``$SLURM_ARRAY_TASK_ID`` with ``--array=0-(N-1)``)."""
    if text is None:
        return None
    try:
        k_text, n_text = str(text).split("/")
        k, n = int(k_text), int(n_text)
    except ValueError:
        raise WhatIsHealthyError(f"--shard {text!r}: expected K/N, e.g. 0/4 (shard K of N, "
                                 "K counted from 0)") from None
    if n < 1 or not 0 <= k < n:
        raise WhatIsHealthyError(f"--shard {text}: K must be 0..{max(n, 1) - 1} and N >= 1 "
                                 "(K counted from 0, e.g. $SLURM_ARRAY_TASK_ID with "
                                 f"--array=0-{max(n, 1) - 1})")
    return k, n


@dataclass(frozen=True)
class Shard:
    """This process's part of a cohort."""

    index: int = 0
    count: int = 1
    rank: int = 0  # torchrun rank (0 without torchrun)
    world: int = 1  # torchrun world size
    local_rank: int = 0
    local_world: int = 1

    @property
    def is_split(self) -> bool:
        return self.count > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def take(self, items: Sequence[T]) -> list[T]:
        """The items of this shard, in their order."""
        return list(items[self.index :: self.count])

    def label(self) -> str:
        return f"shard {self.index}/{self.count}" if self.is_split else ""

    def use_device(self, device: str) -> None:
        """Under torchrun: this rank's GPU (``LOCAL_RANK``) for ``cuda``/``auto``, or its share
        of the CPU cores."""
        if self.world <= 1:
            return
        import torch

        if device in ("auto", "cuda") and torch.cuda.is_available():
            torch.cuda.set_device(self.local_rank % torch.cuda.device_count())
            return
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:  # not Linux
            cores = os.cpu_count() or 1
        torch.set_num_threads(max(1, cores // max(1, self.local_world)))

    def gather(self, items: list[tuple[int, T]]) -> list[T] | None:
        """``(position, item)`` pairs of every rank, on rank 0 in position order (None on the
        other ranks); without torchrun, this process's items in order."""
        if self.world <= 1:
            return [item for _, item in sorted(items, key=lambda pair: pair[0])]
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group(backend="gloo")  # objects only: gloo on CPU and GPU alike
        received: list[Any] = [None] * self.world if self.is_main else None  # type: ignore
        dist.gather_object(items, received, dst=0)
        if not self.is_main:
            return None
        merged = [pair for part in received for pair in part]
        return [item for _, item in sorted(merged, key=lambda pair: pair[0])]

    def close(self) -> None:
        """Leave the process group, if :meth:`gather` made one."""
        if self.world > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def current_shard(shard: str | tuple[int, int] | None = None,
                  environ: Mapping[str, str] | None = None) -> Shard:
    """This process's shard from torchrun's environment and ``--shard K/N``."""
    env = os.environ if environ is None else environ
    world = int(env.get("WORLD_SIZE", "1") or 1)
    rank = int(env.get("RANK", "0") or 0) if world > 1 else 0
    local_rank = int(env.get("LOCAL_RANK", "0") or 0) if world > 1 else 0
    local_world = int(env.get("LOCAL_WORLD_SIZE", str(world)) or world) if world > 1 else 1
    if shard is None:
        k, n = 0, 1
    elif isinstance(shard, str):
        k, n = parse_shard(shard)  # type: ignore[misc]
    else:
        k, n = shard
    return Shard(index=k * world + rank, count=n * world, rank=rank, world=world,
                 local_rank=local_rank, local_world=local_world)


# --------------------------------------------------------------------------------------------
# --resume


def _comparable_settings(settings: Any) -> dict[str, Any]:
    from .provenance import jsonable

    values = dict(jsonable(settings)) if not isinstance(settings, dict) else dict(settings)
    for key in _RUN_ONLY_SETTINGS:
        values.pop(key, None)
    return values


def outputs_done(
    paths: Mapping[str, Path],
    model_hash: str | None,
    settings: Any,
    inputs: Iterable[str | Path],
    classifier_hash: str | None = None,
) -> tuple[bool | None, str]:
    """Whether a case's outputs are complete and made by this model and these settings.

    Returns ``(True, "")`` (done: skip it), ``(None, "")`` (no output yet: run it) or
    ``(False, why)`` (outputs from another run, or incomplete: replacing them needs
    ``--overwrite``).
    """
    from .output import sha256_file

    present = {k: p for k, p in paths.items() if p.exists()}
    if not present:
        return None, ""
    missing = sorted(k for k in paths if k not in present)
    if missing:
        return False, f"incomplete outputs (no {', '.join(missing)})"
    try:
        record = json.loads(Path(paths["provenance"]).read_text())
    except (OSError, ValueError) as exc:
        return False, f"unreadable provenance ({exc})"
    if not isinstance(record, dict):
        return False, "unreadable provenance (not a JSON object)"
    if (record.get("model") or {}).get("sha256") != model_hash:
        return False, "made by another model (SHA-256 differs)"
    if (record.get("classifier") or {}).get("sha256") != classifier_hash:
        return False, "made with another classifier"
    theirs = _comparable_settings(record.get("settings") or {})
    mine = _comparable_settings(settings)
    differ = sorted(k for k in set(theirs) | set(mine) if theirs.get(k) != mine.get(k))
    if differ:
        shown = ", ".join(f"{k}: {theirs.get(k)!r} -> {mine.get(k)!r}" for k in differ[:4])
        return False, f"made with other settings ({shown})"
    wanted_inputs = sorted(str(Path(p).resolve()) for p in inputs)
    if sorted(record.get("inputs") or []) != wanted_inputs:
        return False, "made from other input files"
    digests = record.get("output_sha256") or {}
    for key, path in paths.items():
        if key == "provenance":
            continue
        if digests.get(key) != sha256_file(path):
            return False, f"{path.name} changed since it was written"
    return True, ""


def run_sharded(items: Sequence[T], shard: Shard, work: Callable[[int, T], Any]) -> list[Any]:
    """``work(position, item)`` for this shard's items; returns ``(position, result)`` pairs
    (what :meth:`Shard.gather` takes)."""
    positions = shard.take(range(len(items)))
    return [(i, work(i, items[i])) for i in positions]
