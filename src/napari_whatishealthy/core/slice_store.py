"""An on-disk slice store: the model-space training slices of a cohort, built once, read by rows.

Training used to hold every slice of every case in RAM on every rank (BraTS 2021 at 64 px:
~5.7 GB per rank, 23 GB at 128 px). The store keeps them in one flat float16 ``.npy`` file
instead, and each rank reads only the rows of its current batch (``os.preadv`` into the batch
buffer, no copy of the store and no memory mapping, so a rank's resident memory is the model and
one batch whatever the cohort's size; the operating system's page cache, shared by all ranks on
a machine, holds what is hot).

Layout of a store folder::

    STORE/slices.npy        [N, C, S, S] float16, the rows of all cases in case order
    STORE/labels.npy        [N] int64 HEALTHY / UNHEALTHY (a slice with any lesion voxel)
    STORE/case_of_slice.npy [N] int64 index into the cases
    STORE/index.json        written last: format, preprocessing, cases (files with size,
                            mtime and SHA-256, first row, row count); its presence = complete
    STORE/parts/            while building: one finished case per file (kept on interruption)

Why ``.npy`` and not zarr: the reads are random single slices (32 KB at 64 px, four
channels); a flat uncompressed file makes each one a single positioned read with no chunk
index, no decompression and no new dependency. (zarr would pay off for compressed storage on
object stores, which training on a cluster filesystem does not need.)

Reuse and safety: a store is keyed by its :class:`Preprocessing` (image size, modalities,
normalisation, dtype, version of the slicing code) and by the content (SHA-256) of every file
it was built from. On open, each file's size and modification time are compared with the index
(a file whose stat differs is hashed again: a touched but unchanged file is still reused). A
store of other preprocessing is refused with what differs; a changed case folder (cases added,
removed or edited) is rebuilt, copying unchanged cases from the old store; a half-built store
(no ``index.json``) resumes from its finished parts.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError
from .model import HEALTHY, UNHEALTHY, ModelSpec
from .output import sha256_file, write_file
from .progress import progress_bar

FORMAT = "napari-whatishealthy/slice-store/1"
INDEX_FILE = "index.json"
SLICES_FILE = "slices.npy"
LABELS_FILE = "labels.npy"
OWNERS_FILE = "case_of_slice.npy"
PARTS_DIR = "parts"
#: Bump when preprocess.prepare or the slice labels change what a stored slice holds.
SLICING_VERSION = 1

__all__ = [
    "Preprocessing",
    "SliceStore",
    "StoreError",
    "default_workers",
    "open_or_build",
    "wait_for_store",
]


class StoreError(InputError):
    """A slice store that cannot be used as it is (other preprocessing, unreadable, ...)."""


@dataclass(frozen=True)
class Preprocessing:
    """What a stored slice depends on besides the input files."""

    image_size: int
    modalities: tuple[str, ...]
    normalisation: str = ModelSpec.normalisation
    dtype: str = "float16"
    slicing_version: int = SLICING_VERSION

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["modalities"] = list(self.modalities)
        return data

    def key(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    def differences(self, other: dict[str, Any]) -> list[str]:
        mine = self.to_dict()
        return [f"{k}: store {other.get(k)!r}, this run {mine[k]!r}" for k in mine
                if other.get(k) != mine[k]]


def default_workers() -> int:
    """Processes for building: the cores this process may use, at most 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(8, cores))


# --------------------------------------------------------------------------------------------
# Case files and their fingerprints.


def _case_files(case_dir: Path, modalities: Sequence[str]) -> dict[str, Path]:
    from .volume import find_case_files

    files = find_case_files(case_dir)
    missing = [m for m in modalities if m not in files]
    if missing:
        raise InputError(f"{case_dir}: no {', '.join(missing)} file; the model uses "
                         f"{', '.join(modalities)}")
    if "seg" not in files:
        raise InputError(
            f"{case_dir}: no segmentation (<case>_seg.nii.gz); training needs it for the "
            "image-level labels (healthy / unhealthy slice)"
        )
    return {m: files[m] for m in (*modalities, "seg")}


def _stat(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"name": path.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _stat_key(case_dir: Path, files: dict[str, Path], prep: Preprocessing) -> str:
    """Names a finished part: the case, its files' stat and the preprocessing."""
    text = json.dumps([case_dir.name, {m: _stat(p) for m, p in files.items()}, prep.key()],
                      sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _unchanged(case_dir: Path, record: dict[str, Any], prep: Preprocessing) -> bool:
    """Whether a case's files are those the store was built from (stat, else content)."""
    try:
        files = _case_files(case_dir, prep.modalities)
    except InputError:
        return False
    if set(files) != set(record["files"]):
        return False
    for modality, path in files.items():
        old = record["files"][modality]
        now = _stat(path)
        if now["name"] != old["name"] or now["size"] != old["size"]:
            return False
        if now["mtime_ns"] != old["mtime_ns"] and sha256_file(path) != old["sha256"]:
            return False
    return True


# --------------------------------------------------------------------------------------------
# Building one case (in a worker process).


def _build_part(case_dir: str, modalities: tuple[str, ...], size: int, part: str) -> dict:
    """Prepare one case into ``part`` (an .npz written through a temporary file); returns its
    index record (files with hashes, row count)."""
    import torch

    torch.set_num_threads(1)  # one case per process: the processes are the parallelism
    from .data import slice_labels
    from .preprocess import prepare
    from .volume import load_volume

    folder = Path(case_dir)
    files = _case_files(folder, modalities)
    record_files = {m: {**_stat(p), "sha256": sha256_file(p)} for m, p in files.items()}
    volume = load_volume(folder).select(modalities)
    if volume.segmentation is None:
        raise InputError(f"{folder}: no segmentation; training needs it for the slice labels")
    prepared = prepare(volume.data, size)
    slices = prepared.slices.astype(np.float16)
    labels = slice_labels(volume.segmentation, prepared.slice_index)
    record = {"name": folder.name, "files": record_files, "rows": int(len(labels))}
    write_file(part, lambda tmp: np.savez(tmp, slices=slices, labels=labels,
                                          record=np.array(json.dumps(record))),
               inputs=files.values(), overwrite=True)
    return record


def _read_part(part: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    with np.load(part, allow_pickle=False) as data:
        return data["slices"], data["labels"], json.loads(str(data["record"]))


# --------------------------------------------------------------------------------------------
# The store.


class SliceStore:
    """Rows of a built store (all of them, or the rows of some cases: :meth:`subset`).

    ``labels``, ``case_of_slice`` and ``cases`` are small and held in memory; the slices are
    read on demand with :meth:`read`. Safe to use after ``fork`` (the file is reopened).
    """

    def __init__(self, path: str | Path, rows: np.ndarray | None = None,
                 _index: dict | None = None) -> None:
        self.path = Path(path)
        self.index = _index if _index is not None else json.loads(
            (self.path / INDEX_FILE).read_text())
        all_labels = np.load(self.path / LABELS_FILE, allow_pickle=False)
        all_owners = np.load(self.path / OWNERS_FILE, allow_pickle=False)
        self.rows = None if rows is None else np.asarray(rows, dtype=np.int64)
        self.labels = all_labels if rows is None else all_labels[self.rows]
        self.case_of_slice = all_owners if rows is None else all_owners[self.rows]
        self.cases = [c["name"] for c in self.index["cases"]]
        shape = self.index["shape"]
        self.row_shape = tuple(int(s) for s in shape[1:])
        self.dtype = np.dtype(self.index["dtype"])
        self.row_bytes = int(np.prod(self.row_shape)) * self.dtype.itemsize
        with open(self.path / SLICES_FILE, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            disk_shape, fortran, disk_dtype = read_header(fh)
            self.data_offset = fh.tell()
        if (tuple(disk_shape), disk_dtype, fortran) != (tuple(shape), self.dtype, False):
            raise StoreError(f"{self.path}: {SLICES_FILE} does not match {INDEX_FILE}; "
                             "delete the store folder to rebuild it")
        self._fd: int | None = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __del__(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            try:
                os.close(self._fd)
            except OSError:
                pass

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self.row_shape)

    @property
    def nbytes(self) -> int:
        return len(self) * self.row_bytes

    def counts(self) -> dict[str, int]:
        return {
            "healthy": int((self.labels == HEALTHY).sum()),
            "unhealthy": int((self.labels == UNHEALTHY).sum()),
        }

    def subset(self, case_ids: np.ndarray) -> SliceStore:
        """The rows of the cases ``case_ids`` (no slice is read or copied)."""
        keep = np.flatnonzero(np.isin(self.case_of_slice, case_ids))
        rows = keep if self.rows is None else self.rows[keep]
        return SliceStore(self.path, rows, _index=self.index)

    def _file(self) -> int:
        if self._fd is None or self._pid != os.getpid():
            self._fd = os.open(self.path / SLICES_FILE, os.O_RDONLY)
            self._pid = os.getpid()
        return self._fd

    def read(self, index: np.ndarray | Sequence[int]) -> np.ndarray:
        """Slices ``index`` (positions in this view) as a new ``[B, C, S, S]`` array."""
        index = np.asarray(index, dtype=np.int64).reshape(-1)
        if index.size and (index.min() < 0 or index.max() >= len(self)):
            raise IndexError(f"rows {index.min()}..{index.max()} outside 0..{len(self) - 1}")
        rows = index if self.rows is None else self.rows[index]
        out = np.empty((len(rows), *self.row_shape), dtype=self.dtype)
        flat = out.reshape(len(rows), -1).view(np.uint8)
        fd = self._file()
        for i, row in enumerate(rows.tolist()):
            got = os.preadv(fd, [flat[i]], self.data_offset + row * self.row_bytes)
            if got != self.row_bytes:
                raise StoreError(f"{self.path / SLICES_FILE}: short read (truncated file?); "
                                 "delete the store folder to rebuild it")
        return out

    def load(self) -> np.ndarray:
        """Every slice of this view in memory (the in-RAM path)."""
        return self.read(np.arange(len(self)))


def _matching_index(store: Path, case_dirs: Sequence[Path], prep: Preprocessing,
                    ) -> tuple[dict | None, str]:
    """(index, "") when ``store`` is complete and matches the cases and preprocessing;
    (index or None, why not) otherwise. Other preprocessing raises :class:`StoreError`."""
    path = store / INDEX_FILE
    if not path.exists():
        return None, "no complete store yet"
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        return None, f"unreadable index ({exc})"
    if index.get("format") != FORMAT:
        raise StoreError(f"{store}: a slice store of format {index.get('format')!r}, this "
                         f"version reads {FORMAT!r}; pass --rebuild-store or choose another "
                         "--store")
    diffs = prep.differences(index.get("preprocessing", {}))
    if diffs:
        raise StoreError(f"{store}: built with other preprocessing ({'; '.join(diffs)}); "
                         "choose another --store folder, or pass --rebuild-store to replace it")
    old = {c["name"]: c for c in index["cases"]}
    names = [d.name for d in case_dirs]
    added = [n for n in names if n not in old]
    removed = [n for n in old if n not in set(names)]
    changed = [d.name for d in case_dirs if d.name in old and not _unchanged(d, old[d.name], prep)]
    if added or removed or changed or names != [c["name"] for c in index["cases"]]:
        parts = []
        for what, items in (("added", added), ("removed", removed), ("changed", changed)):
            if items:
                shown = ", ".join(items[:3]) + (" ..." if len(items) > 3 else "")
                parts.append(f"{len(items)} {what} ({shown})")
        return index, "the case folder changed: " + ("; ".join(parts) or "case order")
    return index, ""


def open_or_build(
    store: str | Path,
    case_dirs: Sequence[Path],
    prep: Preprocessing,
    *,
    workers: int | None = None,
    rebuild: bool = False,
    log: Callable[[str], None] = print,
    show_progress: bool = True,
) -> SliceStore:
    """The store at ``store`` for these cases and preprocessing: reused when it matches,
    built (or resumed, or rebuilt) otherwise. See the module docstring."""
    store = Path(store)
    case_dirs = [Path(d) for d in case_dirs]
    names = [d.name for d in case_dirs]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise InputError(f"two case folders share the name(s) {dup[:3]}; case names must be "
                         "unique")
    if store.exists() and not store.is_dir():
        raise StoreError(f"{store}: not a folder; --store takes a folder")
    old_index = None
    if rebuild:
        why = "--rebuild-store"
    else:
        old_index, why = _matching_index(store, case_dirs, prep)
        if not why:
            return SliceStore(store, _index=old_index)
    log(f"slice store {store}: {why}; building {len(case_dirs)} cases")
    _build(store, case_dirs, prep, old_index if not rebuild else None,
           workers or default_workers(), log, show_progress)
    return SliceStore(store)


def wait_for_store(store: str | Path, case_dirs: Sequence[Path], prep: Preprocessing,
                   log: Callable[[str], None] = print, poll_s: float = 2.0,
                   not_before: float | None = None) -> SliceStore:
    """Wait for another process (rank 0) to finish the store, then open it (other ranks).

    ``not_before``: a time; only a store finished after it is taken (a forced rebuild)."""
    store = Path(store)
    last_note = time.time()
    while True:
        index, why = _matching_index(store, [Path(d) for d in case_dirs], prep)
        if not why and not_before is not None and index.get("finished_at", 0) < not_before:
            why = "being rebuilt"
        if not why:
            return SliceStore(store, _index=index)
        if time.time() - last_note > 60:
            log(f"waiting for the slice store {store} ({why})")
            last_note = time.time()
        time.sleep(poll_s)


def _plan_sources(store: Path, parts: Path, case_dirs: list[Path], prep: Preprocessing,
                  old_index: dict | None) -> tuple[Any, list[tuple[str, Any]], list]:
    """Where each case's rows come from: copied from the old store (unchanged case), a part
    finished by an earlier, interrupted build, or prepared now (``todo``)."""
    old_cases = {c["name"]: c for c in (old_index or {}).get("cases", [])}
    old_store = None
    if old_index is not None and (store / SLICES_FILE).exists():
        try:
            old_store = SliceStore(store, _index=old_index)
        except (OSError, ValueError, StoreError):
            old_store = None
    sources: list[tuple[str, Any]] = []
    todo: list[tuple[int, Path, Path]] = []
    for i, case in enumerate(case_dirs):
        record = old_cases.get(case.name)
        if old_store is not None and record is not None and _unchanged(case, record, prep):
            sources.append(("old", record))
            continue
        files = _case_files(case, prep.modalities)
        part = parts / f"{case.name}-{_stat_key(case, files, prep)}.npz"
        sources.append(("part", part))
        if not part.exists():
            todo.append((i, case, part))
    return old_store, sources, todo


def _write_index(store: Path, prep: Preprocessing, shape: tuple[int, ...], records: list[dict],
                 started: float, workers: int, inputs: list[Path]) -> None:
    """The index, written last: its presence means the store is complete."""
    index = {
        "format": FORMAT,
        "preprocessing": prep.to_dict(),
        "shape": list(shape),
        "dtype": prep.dtype,
        "cases": records,
        "built_s": round(time.time() - started, 2),
        "finished_at": time.time(),
        "workers": workers,
    }
    text = json.dumps(index, indent=1)
    write_file(store / INDEX_FILE, lambda tmp: Path(tmp).write_text(text), inputs,
               overwrite=True)


def _build(store: Path, case_dirs: list[Path], prep: Preprocessing, old_index: dict | None,
           workers: int, log: Callable[[str], None], show_progress: bool) -> None:
    started = time.time()
    store.mkdir(parents=True, exist_ok=True)
    # Not complete from here on: a crash leaves a store that is seen as half-built.
    (store / INDEX_FILE).unlink(missing_ok=True)
    parts = store / PARTS_DIR
    parts.mkdir(exist_ok=True)
    old_store, sources, todo = _plan_sources(store, parts, case_dirs, prep, old_index)
    reused = len(case_dirs) - len(todo)
    if reused:
        log(f"slice store: {reused} of {len(case_dirs)} cases already prepared, "
            f"{len(todo)} to prepare")
    dtype = np.dtype(prep.dtype)
    row_shape = (len(prep.modalities), prep.image_size, prep.image_size)
    labels_parts: list[np.ndarray] = []
    records: list[dict] = []
    inputs = [p for case in case_dirs for p in _case_files(case, prep.modalities).values()]

    def assemble(tmp: Path) -> None:
        # Cases are appended in case order as soon as they and all before them are ready, while
        # the workers prepare the next ones (the serial part overlaps the parallel part). Plain
        # writes, not a memory map: written pages sit in the file cache, not in this process's
        # resident memory, which stays one case whatever the cohort.
        pending = {i for i, _, _ in todo}
        ready = set(range(len(sources))) - pending
        with open(tmp, "wb") as fh:
            fh.write(_npy_header(0, row_shape, dtype))  # rewritten with the count at the end
            state = {"next": 0, "row": 0}

            def flush() -> None:
                while state["next"] < len(sources) and state["next"] in ready:
                    i = state["next"]
                    kind, source = sources[i]
                    if kind == "old":
                        first, n = source["first_row"], source["rows"]
                        block = old_store.read(np.arange(first, first + n))
                        block_labels = old_store.labels[first : first + n]
                        record = {k: v for k, v in source.items() if k != "first_row"}
                    else:
                        block, block_labels, record = _read_part(source)
                        n = len(block_labels)
                    fh.write(np.ascontiguousarray(block, dtype=dtype).tobytes())
                    labels_parts.append(np.asarray(block_labels, dtype=np.int64))
                    records.append({**record, "first_row": state["row"], "rows": n})
                    state["row"] += n
                    state["next"] += 1

            flush()
            for i in _prepare_parts(todo, prep, workers, show_progress):
                ready.add(i)
                flush()
            flush()
            fh.seek(0)
            fh.write(_npy_header(state["row"], row_shape, dtype))

    # One flat file, then the small arrays, then the index: its presence means complete.
    write_file(store / SLICES_FILE, assemble, inputs, overwrite=True)
    old_store = None
    labels = np.concatenate(labels_parts) if labels_parts else np.zeros(0, np.int64)
    owners = np.repeat(np.arange(len(records), dtype=np.int64), [r["rows"] for r in records])
    shape = (len(labels), *row_shape)
    for name, values in ((LABELS_FILE, labels), (OWNERS_FILE, owners)):
        write_file(store / name, lambda tmp, v=values: np.save(tmp, v), inputs, overwrite=True)
    _write_index(store, prep, shape, records, started, workers, inputs)
    shutil.rmtree(parts, ignore_errors=True)
    log(f"slice store {store}: {shape[0]} slices of {len(case_dirs)} cases, "
        f"{shape[0] * int(np.prod(row_shape)) * dtype.itemsize / 2**20:.0f} MiB, "
        f"{time.time() - started:.1f} s with {workers} process(es)")


def _holds_threads() -> bool:
    """Whether this process runs CUDA or torch.distributed (threads that fork must not copy)."""
    import torch

    initialised = torch.distributed.is_available() and torch.distributed.is_initialized()
    return bool(torch.cuda.is_initialized() or initialised)


def _npy_header(rows: int, row_shape: tuple[int, ...], dtype: np.dtype) -> bytes:
    """An .npy (version 2.0) header of fixed length whatever ``rows`` is, so that it can be
    written before the row count is known and rewritten in place after."""
    shape = ", ".join([f"{rows:>15d}", *map(str, row_shape)])
    text = (f"{{'descr': {np.lib.format.dtype_to_descr(dtype)!r}, 'fortran_order': False, "
            f"'shape': ({shape}), }}")
    prefix = 8 + 4  # magic and version, then the header length
    text += " " * (-(prefix + len(text) + 1) % 64) + "\n"
    return (np.lib.format.magic(2, 0) + len(text).to_bytes(4, "little")
            + text.encode("latin1"))


def _prepare_parts(todo: list[tuple[int, Path, Path]], prep: Preprocessing, workers: int,
                   show_progress: bool) -> Iterator[int]:
    """Prepare the cases of ``todo`` into their part files; yields each case's index as it
    is finished (in the order they finish)."""
    if not todo:
        return
    bar = progress_bar(len(todo), unit="case", desc="slice store") if show_progress else None
    args = {i: (str(case), tuple(prep.modalities), prep.image_size, str(part))
            for i, case, part in todo}
    try:
        if workers <= 1 or len(todo) == 1:
            for i, a in args.items():
                _build_part(*a)
                if bar is not None:
                    bar.update(1)
                yield i
            return
        import multiprocessing

        from . import data, preprocess, volume  # noqa: F401  imported once, before forking

        # fork on Linux: workers start at once with the modules already imported (a fresh
        # interpreter per worker costs ~2 s of imports, which ate the gain on small cohorts).
        # Workers use one torch thread and no GPU, which is what makes forking safe here; a
        # process that already holds CUDA or a process group (a DDP rank 0) starts clean
        # workers from a fork server instead.
        method = "fork" if sys.platform.startswith("linux") and not _holds_threads() else (
            "forkserver" if sys.platform.startswith("linux") else "spawn")
        context = multiprocessing.get_context(method)
        with ProcessPoolExecutor(min(workers, len(todo)), mp_context=context) as pool:
            futures = {pool.submit(_build_part, *a): i for i, a in args.items()}
            try:
                for future in as_completed(futures):
                    future.result()  # a case's InputError stops the build with its message
                    if bar is not None:
                        bar.update(1)
                    yield futures[future]
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
    finally:
        if bar is not None:
            bar.close()


def resident_on_device(slices: Any, device: Any, fraction: float = 0.25,
                       chunk_rows: int = 4096) -> Any:
    """The rows of ``slices`` (a :class:`SliceStore` view or an in-RAM set) as one float16
    tensor on a CUDA ``device`` when they take at most ``fraction`` of its free memory, copied
    in chunks (host memory stays one chunk); None otherwise (batches are then read from the
    store), and always None off CUDA."""
    import torch

    if getattr(device, "type", str(device)) != "cuda" or len(slices) == 0:
        return None
    first = slices.read(np.arange(1))
    need = len(slices) * first.nbytes
    free, _ = torch.cuda.mem_get_info(device)
    if need > fraction * free:
        return None
    out = torch.empty((len(slices), *first.shape[1:]), dtype=torch.from_numpy(first).dtype,
                      device=device)
    for start in range(0, len(slices), chunk_rows):
        stop = min(start + chunk_rows, len(slices))
        out[start:stop] = torch.from_numpy(slices.read(np.arange(start, stop))).to(device)
    return out
