"""Editing graph files in tests: rewrite entries of a saved archive to build damaged or hostile variants."""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path
from typing import Callable

from svdq_compiler.archive import DIGESTS_ENTRY


def rewrite_archive(source: Path, target: Path, edit: Callable[[str, bytes], bytes | None],
                    add: dict[str, bytes] | None = None, *, redigest: bool = True) -> Path:
    """Copy `source` to `target`, passing each entry (name below the archive's top folder, bytes) through
    `edit`: its result replaces the bytes, None drops the entry. `add` appends entries (names below the top
    folder). With `redigest` the digest table is recomputed, as anyone crafting a file would do (a digest
    detects damage, it is not a signature): the file then tests the checks after the digests."""
    entries: dict[str, bytes] = {}
    with zipfile.ZipFile(source) as old:
        root = old.namelist()[0].split("/", 1)[0]
        for item in old.infolist():
            name = item.filename.split("/", 1)[1]
            data = edit(name, old.read(item))
            if data is not None:
                entries[name] = data
    entries.update(add or {})
    if redigest and DIGESTS_ENTRY in entries:
        try:
            table = dict(json.loads(entries[DIGESTS_ENTRY])["sha256"])
        except (ValueError, TypeError, KeyError, RecursionError):  # the edit replaced the table: keep it
            table = None
    if redigest and DIGESTS_ENTRY in entries and table is not None:
        entries[DIGESTS_ENTRY] = json.dumps({"sha256": {
            name: hashlib.sha256(data).hexdigest() for name, data in entries.items()
            if name in table or name not in (DIGESTS_ENTRY, "archive_format", "archive_version", ".data/version",
                                             "byteorder", ".data/serialization_id")}}).encode()
    with zipfile.ZipFile(target, "w") as new:
        for name, data in entries.items():
            new.writestr(f"{root}/{name}", data)
    return target
