"""Editing graph files in tests: rewrite entries of a saved archive to build damaged or hostile variants."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Callable


def rewrite_archive(source: Path, target: Path, edit: Callable[[str, bytes], bytes | None],
                    add: dict[str, bytes] | None = None) -> Path:
    """Copy `source` to `target`, passing each entry (name below the archive's top folder, bytes) through
    `edit`: its result replaces the bytes, None drops the entry. `add` appends entries (names below the top
    folder)."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        root = old.namelist()[0].split("/", 1)[0]
        for item in old.infolist():
            data = edit(item.filename.split("/", 1)[1], old.read(item))
            if data is not None:
                new.writestr(item, data)
        for name, data in (add or {}).items():
            new.writestr(f"{root}/{name}", data)
    return target
