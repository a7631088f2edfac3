"""Every file the project writes goes through here, under four rules.

1. **Never an input.** A target that is an input of the run, under another spelling, through a
   symbolic link, or as a hard link of it, is refused (:func:`check_target`).
2. **Never half a file, never half a set.** Files are written to temporary names in the target
   folder (``.<name>.<token>.wih-tmp<ext>``), flushed to disk, then renamed over their targets.
   A set of files (a case's outputs) is renamed together, in the order it was staged (the caller
   stages the provenance last), while an exclusive lock on the folder is held and SIGINT/SIGTERM
   are held back; the files being replaced are kept as hard links until the last rename, so a
   failed commit restores them. On any failure or signal the temporary files are removed and the
   previous files stay as they were.
3. **Never an existing file unless asked,** and never an existing file with other hard links
   (replacing one name would leave the other names with the old content).
4. **Normal file modes:** every output gets ``0o666 & ~umask``, whatever the writer library does.

Clean-up only ever removes a file this process created, or a temporary file of a run that no
longer exists: each run holds a lock on its temporary files while it lives, and the next run
writing to the folder removes the ones nobody holds.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from .errors import InputError

try:  # POSIX; without it (Windows) the locks are skipped and the rest still holds
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "LOCK_NAME",
    "OutputSet",
    "check_folder",
    "check_outside",
    "check_target",
    "clean_stale_temps",
    "current_umask",
    "output_mode",
    "source_grid_image",
    "write_file",
    "write_json",
    "write_nifti",
]

LOCK_NAME = ".whatishealthy.lock"  # exists only while a commit runs
NAME_MAX_BYTES = 255
_TEMP_RE = re.compile(r"^\..*\.[0-9a-f]{8}\.wih-(tmp|old)(\.[A-Za-z0-9.]*)?$")
_TEMP_OVERHEAD = len(".") + len(".0123abcd.wih-tmp")
_LOCK_WAIT_S = 120.0
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


# ------------------------------------------------------------------------------------------------
# File modes


def current_umask() -> int:
    """The process umask, read without changing it (os.umask would, for a moment, in every
    thread)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def output_mode() -> int:
    """The mode of every output file: what ``open()`` would give under the umask."""
    return 0o666 & ~current_umask()


# ------------------------------------------------------------------------------------------------
# Checks (all cheap; callers run them before any computing)


def _name_max(folder: Path) -> int:
    try:
        return int(os.pathconf(folder, "PC_NAME_MAX"))
    except (OSError, ValueError, AttributeError):
        return NAME_MAX_BYTES


def _existing_ancestor(folder: Path) -> Path:
    folder = folder.absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def _identities(inputs: Iterable[str | Path]) -> tuple[set[Path], set[tuple[int, int]]]:
    paths: set[Path] = set()
    inodes: set[tuple[int, int]] = set()
    for item in inputs:
        try:
            st = os.stat(item)
            paths.add(Path(item).resolve())
        except (OSError, ValueError):
            continue
        inodes.add((st.st_dev, st.st_ino))
    return paths, inodes


def _input_hit(path: Path, identities: tuple[set[Path], set[tuple[int, int]]]) -> bool:
    paths, inodes = identities
    try:
        if path.resolve() in paths:
            return True
        st = os.stat(path)  # follows links: a link to an input is the input
    except (OSError, ValueError):
        return False
    return (st.st_dev, st.st_ino) in inodes


def check_target(
    path: str | Path, inputs: Iterable[str | Path] = (), overwrite: bool = False,
    _identity: tuple[set[Path], set[tuple[int, int]]] | None = None,
) -> Path:
    """Refuse a target that is (or links to, or shares its data with) an input, a folder, a name
    longer than the file system allows, or an existing file unless ``overwrite`` (and then not
    one with other hard links)."""
    path = Path(path)
    limit = _name_max(_existing_ancestor(path.parent))
    size = len(os.fsencode(path.name))
    if size > limit:
        raise InputError(f"{path.name[:40]}...: the output file name is {size} bytes, more than "
                         f"the {limit} the file system allows; use a shorter case name or file "
                         "name")
    identity = _identity if _identity is not None else _identities(inputs)
    if _input_hit(path, identity):
        raise InputError(f"{path}: refusing to overwrite an input file; choose another name")
    if path.is_dir():
        raise InputError(f"{path}: is a folder; give a file name for the output")
    if path.is_symlink() or path.exists():
        if not overwrite:
            raise InputError(f"{path}: already exists; pass --overwrite or choose another folder")
        with contextlib.suppress(OSError):
            links = _other_links(path)
            if links > 0 and not path.is_symlink():
                raise InputError(
                    f"{path}: has {links + 1} hard links; replacing it would leave the other "
                    "names with the old content: remove it first or choose another folder"
                )
    return path


def _other_links(path: Path) -> int:
    """Hard links of ``path`` besides itself, not counting a commit's backups of it (``.wih-old``
    names in its folder): another run replacing the same file keeps those for the milliseconds
    of its renames, and they are not a user's second name for the file."""
    st = os.lstat(path)
    if st.st_nlink <= 1:
        return 0
    backups = 0
    for entry in os.scandir(path.parent):
        match = _TEMP_RE.match(entry.name)
        if match and match.group(1) == "old":
            with contextlib.suppress(OSError):
                other = entry.stat(follow_symlinks=False)
                backups += (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino)
    # The commit may end between the two looks (its backups gone, the count not yet updated):
    # read the count again and keep the smaller.
    return max(min(st.st_nlink, os.lstat(path).st_nlink) - 1 - backups, 0)


def check_folder(folder: str | Path, need_bytes: int = 0) -> Path:
    """Refuse a folder that cannot be created or written, or whose file system has less free
    space than ``need_bytes`` (an estimate of the outputs)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{folder}: is a file, not a folder; choose another output folder")
    base = _existing_ancestor(folder)
    if not base.is_dir():
        raise InputError(f"{folder}: cannot be created ({base} is a file); choose another "
                         "output folder")
    if not os.access(base, os.W_OK | os.X_OK) or _read_only_fs(base):
        raise InputError(f"{folder}: cannot write there (permission denied or a read-only file "
                         "system); choose another output folder")
    if need_bytes > 0:
        free = shutil.disk_usage(base).free
        if free < need_bytes:
            raise InputError(
                f"{folder}: {free / 2**20:.0f} MiB free, the outputs need up to "
                f"{need_bytes / 2**20:.0f} MiB; free some space or choose another folder"
            )
    return folder


def check_outside(folder: str | Path, input_folder: str | Path, option: str = "--out") -> None:
    """Refuse an output folder that is, or lies inside, an input folder (files written there
    would sit beside the inputs and could be read back as inputs)."""
    out = Path(folder).resolve()
    source = Path(input_folder).resolve()
    if out == source or source in out.parents:
        raise InputError(f"{folder}: {option} is inside the input folder {input_folder}; "
                         "choose a folder outside it")


def _read_only_fs(folder: Path) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        return False


# ------------------------------------------------------------------------------------------------
# Temporary files and stale ones


def _temp_name(target: Path, kind: str = "tmp") -> str:
    name = target.name
    lower = name.lower()
    ext = ".nii.gz" if lower.endswith(".nii.gz") else Path(name).suffix
    if not re.fullmatch(r"(\.[A-Za-z0-9]+)*", ext):
        ext = ""
    room = NAME_MAX_BYTES - _TEMP_OVERHEAD - len(ext)
    stem = os.fsencode(name)[:room].decode("utf-8", "ignore")
    return f".{stem}.{secrets.token_hex(4)}.wih-{kind}{ext}"


def _try_lock(fd: int) -> bool:
    if fcntl is None:  # pragma: no cover
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            return False
        return True  # no locks on this file system: nothing can hold it either
    return True


def clean_stale_temps(folder: str | Path, include_backups: bool = False) -> list[Path]:
    """Remove the temporary files of runs that no longer exist (nobody holds their lock).

    ``include_backups`` also removes the replaced-file links of an interrupted commit; only
    call it while holding the folder lock (a live commit holds it). Returns what was removed.
    """
    removed: list[Path] = []
    if fcntl is None:  # pragma: no cover - no way to tell a live run's file from a dead one's
        return removed
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        match = _TEMP_RE.match(entry.name)
        if not match or not entry.is_file(follow_symlinks=False):
            continue
        path = Path(entry.path)
        if match.group(1) == "old":
            if include_backups:
                with contextlib.suppress(OSError):
                    path.unlink()
                    removed.append(path)
            continue
        try:
            if time.time() - entry.stat(follow_symlinks=False).st_mtime < 2.0:
                continue  # just created: its writer may not hold the lock yet
            fd = os.open(path, os.O_RDONLY | _NOFOLLOW)
        except OSError:
            continue
        try:
            if _try_lock(fd):
                path.unlink(missing_ok=True)
                removed.append(path)
        finally:
            os.close(fd)
    return removed


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """An exclusive lock on the folder's outputs (the file ``.whatishealthy.lock``, there only
    while a commit runs); waits, up to two minutes, for another run's commit (milliseconds)."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    lock_path = folder / LOCK_NAME
    deadline = time.monotonic() + _LOCK_WAIT_S
    while True:
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | _NOFOLLOW, output_mode())
        except OSError as exc:
            raise InputError(f"{folder}: cannot write there ({exc.strerror}); choose another "
                             "output folder") from exc
        if _wait_for_lock(fd, folder, deadline):
            break
        os.close(fd)  # the holder removed that lock file meanwhile: take the current one
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            lock_path.unlink()  # still held, so nobody else has it; waiters then start over
        os.close(fd)


def _wait_for_lock(fd: int, folder: Path, deadline: float) -> bool:
    """Lock ``fd``; True when it is still the folder's lock file once locked."""
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                return True  # no locks on this file system
            if time.monotonic() > deadline:
                os.close(fd)
                raise InputError(
                    f"{folder}: another whatishealthy run has held {LOCK_NAME} for "
                    f"{_LOCK_WAIT_S:.0f} s; wait for it to finish or choose another folder"
                ) from None
            time.sleep(0.02)
    try:
        now = os.stat(folder / LOCK_NAME, follow_symlinks=False)
    except OSError:
        return False
    held = os.fstat(fd)
    return (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino)


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back until the block ends: the renames of a set are not cut in
    half by Ctrl-C or ``kill``; the signal acts right after.

    Blocking the signals in this thread's mask is not enough where a library has started native
    threads (OpenVINO's, OpenMP's): the kernel hands a process signal to any thread that does
    not block it, and Python then raises it in the main thread all the same. So in the main
    thread the Python-level handlers are replaced for the block by ones that only note the
    signal, which is raised again when the block ends."""
    signals = (signal.SIGINT, signal.SIGTERM)
    masked = hasattr(signal, "pthread_sigmask")
    previous_mask = signal.pthread_sigmask(signal.SIG_BLOCK, set(signals)) if masked else None
    received: list[int] = []
    handlers: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for signum in signals:
            handlers[signum] = signal.signal(signum, lambda n, _frame: received.append(n))
    try:
        yield
    finally:
        for signum, handler in handlers.items():  # None: a handler not set from Python
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        if masked:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous_mask)
        if received:
            signal.raise_signal(received[0])  # now, to the handler the program had


def _fsync_folder(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_error(target: Path, exc: OSError) -> InputError:
    reason = exc.strerror or str(exc)
    todo = ("free some space or choose another folder" if exc.errno in (errno.ENOSPC, errno.EDQUOT)
            else "choose another folder")
    return InputError(f"{target}: could not be written ({reason}); {todo}")


# ------------------------------------------------------------------------------------------------
# The writer


class OutputSet:
    """Files written as one unit: :meth:`stage` each (checked, written to a temporary name),
    then :meth:`commit` renames them all, in staging order, under the folder lock. Leaving the
    ``with`` block without a commit (an error, a signal) removes the temporary files.

    ``inputs`` are the run's input files (rule 1); ``overwrite`` allows replacing outputs.
    """

    def __init__(self, inputs: Iterable[str | Path] = (), overwrite: bool = False) -> None:
        self.overwrite = overwrite
        self._identity = _identities(inputs)
        self._staged: list[tuple[Path, Path, int]] = []  # target, temporary file, its lock fd
        self._cleaned: set[Path] = set()

    def __enter__(self) -> OutputSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.discard()

    def check(self, target: str | Path) -> Path:
        return check_target(target, overwrite=self.overwrite, _identity=self._identity)

    def stage(self, target: str | Path, write: Callable[[Path], Any]) -> Path:
        """Check ``target``, then call ``write(temporary_path)``; returns the temporary path
        (complete and on disk when this returns)."""
        target = self.check(target)
        folder = target.parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _write_error(target, exc) from exc
        if folder not in self._cleaned:
            clean_stale_temps(folder)
            self._cleaned.add(folder)
        temp = folder / _temp_name(target)
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW,
                         output_mode())
        except OSError as exc:
            raise _write_error(target, exc) from exc
        _try_lock(fd)  # held while this run lives: the file is not stale
        self._staged.append((target, temp, fd))
        try:
            write(temp)
            os.chmod(temp, output_mode())  # some writers create files private (0600)
            with open(temp, "rb") as fh:
                os.fsync(fh.fileno())
        except OSError as exc:
            self.discard()
            raise _write_error(target, exc) from exc
        except BaseException:
            self.discard()
            raise
        return temp

    def commit(self) -> list[Path]:
        """Rename every staged file over its target, in order; all or none."""
        if not self._staged:
            return []
        targets = [t for t, _, _ in self._staged]
        folders = sorted({t.parent for t in targets})
        with contextlib.ExitStack() as stack:
            for folder in folders:
                stack.enter_context(_folder_lock(folder))
            for folder in folders:
                clean_stale_temps(folder, include_backups=True)
            for target in targets:  # again: another run may have written meanwhile
                self.check(target)
            with _signals_held():
                self._rename_all()
        for folder in folders:
            _fsync_folder(folder)
        return targets

    def _rename_all(self) -> None:
        backups: list[tuple[Path, Path]] = []  # (target, link to the file it replaces)
        done: list[Path] = []
        try:
            for target, _, _ in self._staged:
                if target.exists() and not target.is_symlink():
                    backup = target.parent / _temp_name(target, "old")
                    try:
                        os.link(target, backup)
                        backups.append((target, backup))
                    except OSError:
                        pass  # no hard links here: no restore for this one
            for target, temp, _ in self._staged:
                os.replace(temp, target)
                done.append(target)
        except BaseException:
            restored = {t for t, _ in backups}
            for target, backup in backups:
                with contextlib.suppress(OSError):
                    os.replace(backup, target)
            for target in done:  # new files without an old one to restore: ours to remove
                if target not in restored:
                    with contextlib.suppress(OSError):
                        target.unlink()
            raise
        finally:
            for _, backup in backups:
                with contextlib.suppress(OSError):
                    backup.unlink()
            for _, _, fd in self._staged:
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._staged = [(t, p, -1) for t, p, _ in self._staged if p.exists()]

    def discard(self) -> None:
        """Remove the temporary files this set created (never anything else)."""
        for _, temp, fd in self._staged:
            with contextlib.suppress(OSError):
                temp.unlink()
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._staged = []


# ------------------------------------------------------------------------------------------------
# One file


def write_file(
    path: str | Path, write: Callable[[Path], Any], inputs: Iterable[str | Path] = (),
    overwrite: bool = False,
) -> Path:
    """Write one file through :class:`OutputSet`: ``write(temporary_path)`` makes it."""
    with OutputSet(inputs, overwrite) as outputs:
        outputs.stage(path, write)
        outputs.commit()
    return Path(path)


def write_nifti(
    img: nib.Nifti1Image, path: str | Path, inputs: Iterable[str | Path] = (),
    overwrite: bool = False,
) -> Path:
    """A NIfTI image to ``path`` (``.nii.gz`` or ``.nii``) under the rules above."""
    from .volume import is_nifti_path

    if not is_nifti_path(path):
        raise InputError(f"{path}: output must end in .nii.gz or .nii")
    return write_file(path, lambda tmp: nib.save(img, tmp), inputs, overwrite)


def json_text(data: Any) -> str:
    from .provenance import jsonable

    return json.dumps(jsonable(data), indent=2, allow_nan=False) + "\n"


def write_json(
    data: Any, path: str | Path, inputs: Iterable[str | Path] = (), overwrite: bool = False,
) -> Path:
    """``data`` as JSON (no NaN) to ``path`` under the rules above."""
    text = json_text(data)
    return write_file(path, lambda tmp: Path(tmp).write_text(text), inputs, overwrite)


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------------
# Masks and maps on the grid of their source file


def source_grid_image(
    stored: np.ndarray, affine: np.ndarray, header: nib.Nifti1Header, dtype: type | np.dtype,
    description: str = "napari-whatishealthy",
) -> nib.Nifti1Image:
    """An array already in the source file's voxel order, as a NIfTI image with the source's
    affine and header (NIfTI-2 stays NIfTI-2), stored as ``dtype``; the one image builder of the
    CLI's outputs and the napari writer's masks."""
    header = header.copy()
    image_class = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
    img = image_class(np.asarray(stored).astype(dtype), affine, header)
    img.set_data_dtype(dtype)
    if np.issubdtype(np.dtype(dtype), np.integer):
        img.header.set_slope_inter(1, 0)
        img.header["cal_min"] = 0
        img.header["cal_max"] = 0
    img.header["descrip"] = description.encode()[:79]
    return img
