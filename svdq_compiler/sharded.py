"""Sharded safetensors checkpoints (the diffusers folder layout), read and written one tensor at a time.

A diffusers model folder holds `config.json` and either one `diffusion_pytorch_model.safetensors` or shards
`diffusion_pytorch_model-0000i-of-0000N.safetensors` with an index `diffusion_pytorch_model.safetensors.index.json`
(`{"metadata": {"total_size": bytes}, "weight_map": {tensor name: shard file}}`).

`ShardedCheckpoint.open` checks the whole folder before any work: every shard the index names exists and has a
readable header, every tensor sits in the shard the index says, and the names, shapes (and float dtypes) match
what the model expects. Problems are reported together in one `CheckpointError`. Reads then use plain file
reads of one tensor's bytes (no memory map), so the resident memory of a streaming compile is the tensors it
holds, not the pages of a 24 GB file it has touched.

`write_sharded` writes a checkpoint from tensor specs and a producer called once per tensor, so a checkpoint
far larger than memory can be written; shards go to temporary names and are renamed when complete.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch

from svdq_compiler.errors import CheckpointError, InputError

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
    "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
_HEADER_LIMIT = 100 << 20  # a safetensors header larger than this is a corrupt or foreign file
_LISTED = 8  # problems of one kind listed by name in an error


def shard_name(index: int, count: int) -> str:
    return f"diffusion_pytorch_model-{index:05d}-of-{count:05d}.safetensors"


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes are: its shard, dtype, shape and absolute byte range in the file."""

    name: str
    shard: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    stop: int

    @property
    def nbytes(self) -> int:
        return self.stop - self.start


def read_safetensors_header(path: Path) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """The tensor entries and metadata of one safetensors file, from its header only."""
    try:
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise CheckpointError("the file is shorter than a safetensors header", where=str(path),
                                      fix="the file is truncated: write or copy it again")
            (length,) = struct.unpack("<Q", prefix)
            if length > _HEADER_LIMIT:
                raise CheckpointError(f"the header length {length} is not plausible: not a safetensors file",
                                      where=str(path), fix="give the checkpoint's .safetensors shards")
            header = json.loads(handle.read(length))
            size = os.fstat(handle.fileno()).st_size
    except OSError as exc:
        raise CheckpointError(f"cannot read the shard: {exc.strerror or exc}", where=str(path)) from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"the safetensors header is not JSON: {exc}", where=str(path),
                              fix="the file is corrupt or not a safetensors file") from exc
    metadata = header.pop("__metadata__", None) or {}
    base = 8 + length
    entries = {}
    for name, spec in header.items():
        try:
            dtype = SAFETENSORS_DTYPES[spec["dtype"]]
            shape = tuple(int(d) for d in spec["shape"])
            begin, end = (int(v) for v in spec["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"tensor {name!r} has an unreadable header entry {spec!r}", where=str(path)) from exc
        expected = math.prod(shape) * dtype.itemsize
        if end - begin != expected or base + end > size:
            raise CheckpointError(
                f"tensor {name!r} needs {expected} bytes at [{begin}, {end}) but the entry or the file "
                f"({size - base} data bytes) does not hold them", where=str(path),
                fix="the file is truncated or corrupt: write or copy it again")
        entries[name] = TensorEntry(name, path, dtype, shape, base + begin, base + end)
    return entries, metadata


class ShardedCheckpoint:
    """A validated sharded (or single-file) safetensors checkpoint; `read(name)` loads one tensor."""

    def __init__(self, folder: Path, entries: dict[str, TensorEntry], config: dict):
        self.folder, self.entries, self.config = folder, entries, config

    @classmethod
    def open(cls, folder: str | Path,
             expected: Mapping[str, tuple[tuple[int, ...], torch.dtype]] | None = None) -> "ShardedCheckpoint":
        """Open and validate `folder`; `expected` maps each tensor name to (shape, dtype) the model needs.

        Float tensors may be stored in another float dtype (they are converted on read); everything else —
        a missing index entry or shard, a tensor missing from its shard, a shape mismatch, a missing or an
        unexpected tensor — raises one CheckpointError that lists the problems."""
        folder = Path(folder)
        if not folder.is_dir():
            raise InputError("the checkpoint folder does not exist", where=str(folder),
                             fix="give a diffusers model folder with config.json and safetensors weights")
        config = _read_json(folder / "config.json", "model config")
        entries = _index_entries(folder)
        if expected is not None:
            _check_expected(folder, entries, expected)
        return cls(folder, entries, config)

    def names(self) -> list[str]:
        return list(self.entries)

    @property
    def total_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """One tensor, read with a plain file read (optionally converted to `dtype`)."""
        entry = self.entries.get(name)
        if entry is None:
            raise CheckpointError(f"the checkpoint has no tensor {name!r}", where=str(self.folder))
        buffer = torch.empty(entry.nbytes, dtype=torch.uint8)
        try:
            with open(entry.shard, "rb", buffering=0) as handle:
                handle.seek(entry.start)
                view = memoryview(buffer.numpy())
                done = 0
                while done < entry.nbytes:
                    count = handle.readinto(view[done:])
                    if not count:
                        raise CheckpointError(f"unexpected end of file while reading {name!r}", where=str(entry.shard),
                                              fix="the shard is truncated: write or copy it again")
                    done += count
        except OSError as exc:
            raise CheckpointError(f"cannot read tensor {name!r}: {exc.strerror or exc}", where=str(entry.shard)) from exc
        tensor = buffer.view(entry.dtype).reshape(entry.shape)
        return tensor if dtype is None or dtype == entry.dtype else tensor.to(dtype)


def _read_json(path: Path, what: str) -> dict:
    if not path.exists():
        raise CheckpointError(f"the {what} {path.name} is missing", where=str(path.parent),
                              fix="a diffusers model folder holds config.json beside its weights")
    try:
        value = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read the {what}: {exc}", where=str(path)) from exc
    if not isinstance(value, dict):
        raise CheckpointError(f"the {what} is not a JSON object", where=str(path))
    return value


def _index_entries(folder: Path) -> dict[str, TensorEntry]:
    index_path = folder / INDEX_NAME
    if not index_path.exists():
        single = folder / WEIGHTS_NAME
        if not single.exists():
            raise CheckpointError(f"neither {INDEX_NAME} nor {WEIGHTS_NAME} is in the folder", where=str(folder),
                                  fix="give a diffusers model folder with its safetensors weights")
        return read_safetensors_header(single)[0]
    weight_map = _read_json(index_path, "shard index").get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError("the shard index has no weight_map", where=str(index_path))
    shard_files = sorted(set(weight_map.values()))
    missing = [name for name in shard_files if not (folder / name).is_file()]
    if missing:
        raise CheckpointError(f"{len(missing)} of {len(shard_files)} shard(s) named in the index are missing: "
                              f"{', '.join(missing)}", where=str(folder),
                              fix="copy the missing shard files into the folder (or re-download the checkpoint)")
    headers = {name: read_safetensors_header(folder / name)[0] for name in shard_files}
    entries, absent = {}, []
    for tensor, shard in weight_map.items():
        entry = headers[shard].get(tensor)
        if entry is None:
            absent.append(f"{tensor} (in {shard})")
        else:
            entries[tensor] = entry
    if absent:
        raise CheckpointError(f"{len(absent)} tensor(s) the index lists are not in their shard: "
                              f"{_listing(absent)}", where=str(folder),
                              fix="the index and the shards come from different checkpoints; copy them together")
    return entries


def _check_expected(folder: Path, entries: dict[str, TensorEntry],
                    expected: Mapping[str, tuple[tuple[int, ...], torch.dtype]]) -> None:
    problems = []
    missing = [name for name in expected if name not in entries]
    unexpected = [name for name in entries if name not in expected]
    mismatched = []
    for name, (shape, dtype) in expected.items():
        entry = entries.get(name)
        if entry is None:
            continue
        if tuple(entry.shape) != tuple(shape):
            mismatched.append(f"{name}: {list(entry.shape)} in {entry.shard.name}, the model needs {list(shape)}")
        elif entry.dtype.is_floating_point != dtype.is_floating_point:
            mismatched.append(f"{name}: {entry.dtype} in {entry.shard.name}, the model needs {dtype}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape/dtype mismatch(es): {_listing(mismatched)}")
    if missing:
        problems.append(f"{len(missing)} tensor(s) missing: {_listing(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s): {_listing(unexpected)}")
    if problems:
        raise CheckpointError("the checkpoint does not fit the model's config: " + "; ".join(problems),
                              where=str(folder), fix="give the config.json the weights were saved with, or "
                                                      "re-export the checkpoint from that model")


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:_LISTED])
    return shown + (f", … ({len(items) - _LISTED} more)" if len(items) > _LISTED else "")


# ---- writing --------------------------------------------------------------------------------------------------


def plan_shards(specs: Mapping[str, tuple[tuple[int, ...], torch.dtype]], max_shard_bytes: int
                ) -> list[list[str]]:
    """Tensor names per shard, in order, each shard at most `max_shard_bytes` (a larger tensor gets its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, (shape, dtype) in specs.items():
        nbytes = math.prod(shape) * dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def write_sharded(folder: str | Path, config: dict, specs: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
                  produce: Callable[[str], torch.Tensor], *, max_shard_bytes: int = 10 << 30,
                  metadata: Mapping[str, str] | None = None,
                  progress: Callable[[Iterable[str]], Iterable[str]] = iter) -> list[Path]:
    """Write a diffusers-layout checkpoint tensor by tensor: `produce(name)` returns each tensor (shape and
    dtype as in `specs`) and is called once, in order, so only one tensor is held at a time.

    Shards are written to temporary names and renamed when complete; the index and config.json last. A failure
    (including a full disk) removes every temporary file of this run."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create the checkpoint folder: {exc.strerror or exc}", where=str(folder)) from exc
    shards = plan_shards(specs, max_shard_bytes)
    names = [WEIGHTS_NAME] if len(shards) == 1 else [shard_name(i + 1, len(shards)) for i in range(len(shards))]
    temporaries: list[Path] = []
    try:
        for shard, file_name in zip(shards, names):
            temporary = folder / f".{file_name}.tmp"
            temporaries.append(temporary)
            _write_shard(temporary, shard, specs, produce, metadata, progress)
        index = {"metadata": {"total_size": sum(math.prod(s) * d.itemsize for s, d in specs.values())},
                 "weight_map": {name: file_name for shard, file_name in zip(shards, names) for name in shard}}
        extras = [("config.json", config)] + ([(INDEX_NAME, index)] if len(shards) > 1 else [])
        for file_name, value in extras:
            temporary = folder / f".{file_name}.tmp"
            temporaries.append(temporary)
            temporary.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")
        finals = []
        for temporary in temporaries:
            final = folder / temporary.name[1:-len(".tmp")]
            os.replace(temporary, final)
            finals.append(final)
        return finals
    except BaseException:
        for temporary in temporaries:
            temporary.unlink(missing_ok=True)
        raise


def _write_shard(path: Path, names: list[str], specs, produce, metadata, progress) -> None:
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name in names:
        shape, dtype = specs[name]
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # tensor data starts 8-byte aligned
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        for name in progress(names):
            shape, dtype = specs[name]
            tensor = produce(name)
            if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
                raise CheckpointError(f"the producer returned {tensor.dtype} {list(tensor.shape)} for {name!r}, "
                                      f"the plan says {dtype} {list(shape)}", where=str(path))
            handle.write(tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy())
        handle.flush()
        os.fsync(handle.fileno())
