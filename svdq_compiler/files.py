"""Writing outputs safely: every file goes to a temporary name in its target folder and is renamed into place,
so a failed or interrupted run leaves nothing half-written. Outputs get the permissions the umask gives a new
file (the temporary files `tempfile` makes are 0600 whatever the umask), and one output has one writer at a
time (`exclusive_output`)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from svdq_compiler.errors import InputError


def ensure_dir(path: str | Path, what: str = "output folder") -> Path:
    """Create `path` (and parents) or raise a clear InputError naming it."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create the {what}: {exc.strerror or exc}", where=str(path),
                         fix=f"choose a writable {what}") from exc
    if not os.access(path, os.W_OK):
        raise InputError(f"the {what} is not writable", where=str(path), fix=f"choose a writable {what}")
    return path


def umask_mode(mode: int = 0o666) -> int:
    """`mode` as the process umask leaves it for a newly created file."""
    mask = os.umask(0)
    os.umask(mask)
    return mode & ~mask


def temporary_beside(path: str | Path, what: str = "output file") -> Path:
    """A new empty hidden file in `path`'s folder (created if needed), with the umask's permissions."""
    path = Path(path)
    folder = ensure_dir(path.parent, f"folder of the {what}")
    if path.is_dir():
        raise InputError(f"the {what} is a folder", where=str(path), fix="give a file name")
    try:
        handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise InputError(f"cannot write beside the {what}: {exc.strerror or exc}", where=str(path),
                         fix=f"choose a writable folder for the {what}") from exc
    os.fchmod(handle, umask_mode())
    os.close(handle)
    return Path(temporary)


@contextmanager
def atomic_path(path: str | Path, what: str = "output file") -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed to `path`, on failure removed."""
    path = Path(path)
    temporary_path = temporary_beside(path, what)
    try:
        with terminate_as_exception():
            yield temporary_path
            # Writers that replace the file (safetensors writes a new 0600 one) lose the umask's permissions.
            os.chmod(temporary_path, umask_mode())
            os.replace(temporary_path, path)
    except BaseException:
        temporary_path.unlink(missing_ok=True)
        raise


class StagedOutputs:
    """Outputs of one command that appear together or not at all: `file(path)`, `files_beside(path)` and
    `folder(path)` give temporary names beside the targets; `commit()` moves them into place; `discard()` (on any failure,
    SIGTERM included) removes them, so a failed run adds nothing."""

    def __init__(self) -> None:
        self._files: list[tuple[Path, Path]] = []
        self._folders: list[tuple[Path, Path]] = []

    def file(self, path: str | Path, what: str = "output file") -> Path:
        temporary = temporary_beside(path, what)
        self._files.append((temporary, Path(path)))
        return temporary

    def folder(self, path: str | Path, what: str = "output folder") -> Path:
        path = Path(path)
        ensure_dir(path.parent, f"folder of the {what}")
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        self._folders.append((staging, path))
        return staging

    def files_beside(self, path: str | Path, what: str = "output file") -> Path:
        """A temporary name for `path` in a hidden folder beside it, for an output that is several files (an
        ONNX model and its external data, which the model names relative to itself): whatever is written into
        that folder moves into `path`'s folder on commit."""
        path = Path(path)
        folder = ensure_dir(path.parent, f"folder of the {what}")
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder))
        self._folders.append((staging, folder))
        return staging / path.name

    def commit(self) -> None:
        for staging, path in self._folders:
            ensure_dir(path, "output folder")
            for item in sorted(staging.iterdir()):
                os.replace(item, path / item.name)
        for temporary, path in self._files:
            os.replace(temporary, path)
        self.discard()

    def discard(self) -> None:
        for staging, _ in self._folders:
            shutil.rmtree(staging, ignore_errors=True)
        for temporary, _ in self._files:
            temporary.unlink(missing_ok=True)
        self._files, self._folders = [], []


@contextmanager
def staged_outputs() -> Iterator[StagedOutputs]:
    """A StagedOutputs committed when the block succeeds and discarded when it fails or SIGTERM arrives."""
    staged = StagedOutputs()
    try:
        with terminate_as_exception():
            yield staged
            staged.commit()
    finally:
        staged.discard()


def write_text(path: str | Path, text: str, what: str = "output file") -> Path:
    with atomic_path(path, what) as temporary:
        temporary.write_text(text)
    return Path(path)


def write_json(path: str | Path, value: Any, what: str = "output file") -> Path:
    return write_text(path, json.dumps(value, indent=2, sort_keys=True, default=str) + "\n", what)


class Terminated(InputError):
    """SIGTERM arrived while an output was being written; the output was not written."""


@contextmanager
def terminate_as_exception() -> Iterator[None]:
    """Within the block, SIGTERM raises `Terminated`, so the temporary files of the outputs being written are
    removed on the way out instead of left behind (the default action ends the process on the spot)."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is _raise_terminated:
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _raise_terminated(signum, frame) -> None:
    raise Terminated("terminated by SIGTERM before the outputs were complete; nothing was written",
                     fix="run it again (outputs appear only when complete)")


@contextmanager
def exclusive_output(path: str | Path, what: str = "output") -> Iterator[None]:
    """Hold a lock on `path` for the block: a second writer of the same output (another svdq-compile with the
    same --out) is refused at once instead of both reporting success for one file. The lock is a hidden file
    beside `path` with an flock on it, which the kernel releases if the process dies; the file is removed
    when the block ends."""
    import fcntl

    path = Path(path)
    lock = path.parent / f".{path.name}.lock"
    ensure_dir(path.parent, f"folder of the {what}")
    while True:
        handle = os.open(lock, os.O_RDWR | os.O_CREAT, umask_mode())
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(handle)
            raise InputError(f"another process is writing this {what} now", where=str(path),
                             fix="wait for it to finish, or choose another output path") from None
        try:
            same = os.fstat(handle).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(handle)  # the holder removed the lock file between our open and our flock: take a fresh one
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)
        os.close(handle)
