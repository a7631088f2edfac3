"""One in-memory cache for loaded checkpoints (diffusion models and classifiers).

Entries are keyed by (resolved folder, modification time and size of the weights and spec files,
device): a checkpoint rewritten in the same folder (a retrained model) is reloaded, older versions
of it on the same device are dropped at once, and at most ``size`` entries are kept (least
recently used first out). Loading happens under a lock, so two threads asking for the same
checkpoint load it once.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .model import SPEC_FILE, WEIGHTS_FILE, CheckpointError, checkpoint_hash


class CheckpointCache:
    """``get(folder, device, load)`` -> ``(network, spec, sha256)``, loaded once per version."""

    def __init__(self, size: int, what: str) -> None:
        self.size = size
        self.what = what  # "model" or "classifier": for error messages
        self._entries: OrderedDict[tuple, tuple[Any, Any, str]] = OrderedDict()
        self._lock = threading.Lock()

    def get(
        self,
        folder: Path,
        device: torch.device,
        load: Callable[[Path, torch.device], Any],
    ) -> tuple[Any, Any, str]:
        try:
            stats = [(folder / name).stat() for name in (WEIGHTS_FILE, SPEC_FILE)]
        except OSError as exc:
            raise CheckpointError(f"{folder}: cannot read the {self.what} ({exc})") from exc
        key = (str(folder), tuple((s.st_mtime_ns, s.st_size) for s in stats), str(device))
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key]
            try:
                digest = checkpoint_hash(folder)
            except OSError as exc:
                raise CheckpointError(f"{folder}: cannot read the {self.what} ({exc})") from exc
            network = load(folder, device)
            for param in network.parameters():
                param.requires_grad_(False)
            entry = (network, network.spec, digest)
            for old in [k for k in self._entries if k[0] == key[0] and k[2] == key[2]]:
                del self._entries[old]
            self._entries[key] = entry
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)
            return entry

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
