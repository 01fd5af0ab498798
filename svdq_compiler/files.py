"""Writing outputs safely: every file goes to a temporary name in its target folder and is renamed into place,
so a failed or interrupted run leaves nothing half-written."""

from __future__ import annotations

import json
import os
import tempfile
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


@contextmanager
def atomic_path(path: str | Path, what: str = "output file") -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed to `path`, on failure removed."""
    path = Path(path)
    folder = ensure_dir(path.parent, f"folder of the {what}")
    if path.is_dir():
        raise InputError(f"the {what} is a folder", where=str(path), fix="give a file name")
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    os.close(handle)
    temporary_path = Path(temporary)
    try:
        yield temporary_path
        os.replace(temporary_path, path)
    except BaseException:
        temporary_path.unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str, what: str = "output file") -> Path:
    with atomic_path(path, what) as temporary:
        temporary.write_text(text)
    return Path(path)


def write_json(path: str | Path, value: Any, what: str = "output file") -> Path:
    return write_text(path, json.dumps(value, indent=2, sort_keys=True, default=str) + "\n", what)
