"""The graph file: a torch.export PT2 archive (what `torch.export.load` reads), written one tensor at a time with a
SHA-256 digest per entry, and read back through a memory map.

A PT2 archive is a zip of stored (uncompressed) entries under one top folder, `archive/`: each weight is its own
record `data/weights/weight_<i>` (raw bytes), described by `data/weights/model_weights_config.json` (record,
shape, stride, dtype, parameter or buffer); tensor constants likewise under `data/constants/`; the graph is
`models/model.json`; extra files go under `extra/`. What this module adds:

- **Our own graph record.** `extra/svdq_graph.json` (svdq_compiler.graph_record) describes the same graph in a
  compact form that svdq_compiler.load rebuilds without torch's deserializer; `models/model.json` stays, so
  `torch.export.load` still reads the file.
- **Only the bytes of each view.** A weight that is a view of a larger storage (a slice of a stacked q/k/v
  matrix, a smoothing vector cut from a buffer) is written as its own contiguous bytes, not the whole storage
  the way `torch.export.save` does. Tensors that are the same view (tied weights) share one record.
- **Digests.** `extra/svdq_digests.json` holds the SHA-256 of every other entry we write. `GraphArchive` checks
  them all before any byte reaches torch, so a flipped byte is one clear error, not a graph that runs wrong.
- **Compact, reproducible bytes.** The zip is written here (not by torch's writer): tensor records stored and
  aligned to 64 bytes, the JSON and text entries deflated, fixed timestamps, the top folder always `archive`
  (torch names it after the file, which would put the temporary name inside); node metadata that records
  object ids and source paths (`from_node`, `stack_trace`, `torch_fn`) is dropped from `models/model.json`.
  The same program and extra files give the same bytes.
- **Streaming.** `add(fqn, tensor)` writes each weight as it is produced, and the graph (which may be exported
  on the meta device) is added by `finish`, so a model larger than memory can be written.
- **Mapped loading.** `GraphArchive.tensors` returns tensors that are windows on one read-only-to-disk (private)
  memory map of the file: nothing is copied, and a CUDA load copies one tensor at a time to the device.

The archive is written to a temporary file beside the target and renamed only when complete: an error, a full
disk or SIGTERM removes the temporary file and leaves no partial output.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import inspect
import json
import mmap
import os
import weakref
import zipfile
import zlib
from pathlib import Path
from typing import IO, Any, Mapping

import torch
from torch._export.serde import schema
from torch._export.serde.serialize import serialize, serialize_tensor_meta
from torch.export.pt2_archive._package import _package_payload_config
from torch.export.pt2_archive.constants import (ARCHIVE_FORMAT_PATH, ARCHIVE_FORMAT_VALUE, ARCHIVE_VERSION_PATH,
                                                ARCHIVE_VERSION_VALUE, CONSTANTS_CONFIG_FILENAME_FORMAT,
                                                CONSTANTS_DIR, EXTRA_DIR,
                                                MODELS_FILENAME_FORMAT, SAMPLE_INPUTS_FILENAME_FORMAT,
                                                TENSOR_CONSTANT_FILENAME_PREFIX, WEIGHT_FILENAME_PREFIX,
                                                WEIGHTS_CONFIG_FILENAME_FORMAT, WEIGHTS_DIR)

from svdq_compiler.errors import CheckpointError, InputError, first_line
from svdq_compiler.files import temporary_beside, terminate_as_exception
from svdq_compiler.graph_record import GRAPH_FILE, graph_record

MODEL_NAME = "model"  # the name torch.export.save gives a single program
ARCHIVE_ROOT = "archive"  # the top folder torch.export.save gives an archive written to a file object
_ALIGNMENT = 64  # tensor records start at multiples of this in the file (torch's own writer does the same)
_PADDING_FIELD = 0x5653  # zip "extra field" id of the padding before a record (readers skip unknown ids)
DIGESTS_FILE = "svdq_digests.json"
DIGESTS_ENTRY = f"{EXTRA_DIR}{DIGESTS_FILE}"
# Node metadata that names object ids, source files and Python functions of the compiling process: it changes
# from run to run and nothing reads it back (nn_module_stack stays: the IR printer names modules with it).
_UNREPRODUCIBLE_NODE_META = ("from_node", "stack_trace", "torch_fn")
_MAX_JSON_ENTRY = 1 << 30  # a JSON entry larger than this is not one we wrote
_VERIFY_CHUNK = 1 << 20  # tensor records are hashed through a buffer of this size


def digest(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


class StreamingArchive:
    """Write a graph file weight by weight: `add(fqn, tensor)` as tensors are produced, then
    `finish(program, extra_files)` with the ExportedProgram whose state_dict names them (its own tensors may be
    on the meta device; their shapes and dtypes must match what was added)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.temporary = temporary_beside(self.path, "graph file")
        self._handle: IO[bytes] = open(self.temporary, "wb")
        self._zip = zipfile.ZipFile(self._handle, "w", allowZip64=True)
        self._weights: dict[str, tuple[str, torch.Tensor]] = {}  # fqn → (record, meta-device stand-in)
        self._records: dict[tuple, tuple[str, weakref.ref]] = {}  # a view's storage and layout → record, tensor
        self._digests: dict[str, str] = {}
        self._counts: dict[str, int] = {}  # records written per folder
        self.bytes_written = 0
        self._open = True
        self._terminate = terminate_as_exception()
        self._terminate.__enter__()

    def __enter__(self) -> "StreamingArchive":
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if self._open:
            self.abort()

    def _write(self, entry: str, data: Any, *, tensor: bool = False) -> None:
        """One zip entry under the archive folder: tensor bytes stored and aligned to 64 bytes (so loading
        maps them in place), everything else deflated; fixed timestamps, so equal content gives equal bytes."""
        info = zipfile.ZipInfo(f"{ARCHIVE_ROOT}/{entry}", date_time=(1980, 1, 1, 0, 0, 0))
        info.create_system = 3  # unix, whatever the writing platform
        info.external_attr = 0o644 << 16
        if tensor:
            info.compress_type = zipfile.ZIP_STORED
            size = len(data)
            header = 30 + len(info.filename.encode()) + 4 + (20 if size > zipfile.ZIP64_LIMIT else 0)
            padding = -(self._handle.tell() + header) % _ALIGNMENT
            info.extra = _PADDING_FIELD.to_bytes(2, "little") + padding.to_bytes(2, "little") + bytes(padding)
        else:
            info.compress_type = zipfile.ZIP_DEFLATED
        self._zip.writestr(info, data)
        if entry != DIGESTS_ENTRY:
            self._digests[entry] = digest(data)

    def _write_tensor(self, folder: str, prefix: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor]:
        """Write the bytes of `tensor`'s view (once per distinct view of a live storage: tied weights share a
        record); the record name and a contiguous meta-device stand-in with its shape and dtype."""
        key = None
        if tensor.device.type != "meta" and tensor.numel() and tensor.untyped_storage().data_ptr():
            key = (folder, tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(),
                   tuple(tensor.shape), tensor.stride(), tensor.dtype)
        seen = self._records.get(key) if key is not None else None
        # The first tensor must still be alive: a streamed weight is freed after `add`, and the allocator may
        # hand its address to the next one.
        if seen is not None and seen[1]() is not None:
            record = seen[0]
        else:
            record = f"{prefix}{self._counts.get(folder, 0)}"
            self._counts[folder] = self._counts.get(folder, 0) + 1
            data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy() \
                if tensor.numel() else b""
            self._write(f"{folder}{record}", data, tensor=True)
            self.bytes_written += len(data)
            if key is not None:
                self._records[key] = (record, weakref.ref(tensor))
        return record, torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")

    def add(self, fqn: str, tensor: torch.Tensor) -> None:
        """Write one weight's bytes now; the caller may free the tensor afterwards."""
        if fqn in self._weights:
            raise CheckpointError(f"weight {fqn!r} was written twice", where=str(self.path))
        if tensor.device.type == "meta":
            raise CheckpointError(f"weight {fqn!r} has no data (meta device)", where=str(self.path))
        self._weights[fqn] = self._write_tensor(WEIGHTS_DIR, WEIGHT_FILENAME_PREFIX, tensor)

    def written(self) -> set[str]:
        return set(self._weights)

    def finish(self, program: torch.export.ExportedProgram, extra_files: Mapping[str, str] | None = None) -> Path:
        """Write the weights config, constants, graph, extra files and digests, then move the archive into
        place."""
        state = program.state_dict
        missing = sorted(set(state) - set(self._weights))
        unknown = sorted(set(self._weights) - set(state))
        if missing or unknown:
            raise CheckpointError(f"the streamed weights do not match the program: missing {missing[:8]}, not in "
                                  f"the program {unknown[:8]}", where=str(self.path))
        weights = {}
        for fqn, expected in state.items():
            record, written = self._weights[fqn]
            if written.shape != expected.shape or written.dtype != expected.dtype:
                raise CheckpointError(f"weight {fqn!r} was written as {written.dtype} {list(written.shape)}, the "
                                      f"program has {expected.dtype} {list(expected.shape)}", where=str(self.path))
            weights[fqn] = schema.PayloadMeta(path_name=record, is_param=isinstance(expected, torch.nn.Parameter),
                                              use_pickle=False, tensor_meta=_cpu_tensor_meta(written, expected))
        constants = {}
        for fqn, value in program.constants.items():
            if not isinstance(value, torch.Tensor) or value.device.type == "meta":
                raise CheckpointError(f"constant {fqn!r} is a {type(value).__name__} without data; a graph file "
                                      f"holds tensors only", where=str(self.path))
            record, written = self._write_tensor(CONSTANTS_DIR, TENSOR_CONSTANT_FILENAME_PREFIX, value)
            constants[fqn] = schema.PayloadMeta(path_name=record, is_param=False, use_pickle=False,
                                                tensor_meta=_cpu_tensor_meta(written, value))
        for config, entry in ((weights, WEIGHTS_CONFIG_FILENAME_FORMAT.format(MODEL_NAME)),
                              (constants, CONSTANTS_CONFIG_FILENAME_FORMAT.format(MODEL_NAME))):
            _package_payload_config(self, schema.PayloadConfig(config=dict(sorted(config.items()))), entry)
        artifact = _serialize_without_weights(program)
        program_json = json.loads(artifact.exported_program)
        self._write(MODELS_FILENAME_FORMAT.format(MODEL_NAME), reproducible_program(program_json))
        self._write(SAMPLE_INPUTS_FILENAME_FORMAT.format(MODEL_NAME), artifact.example_inputs)
        for name, content in (extra_files or {}).items():
            self._write(f"{EXTRA_DIR}{name}", content.encode())
        # What svdq_compiler.load rebuilds the graph from (torch's deserializer reads models/model.json).
        record = json.dumps(graph_record(program, program_json.get("guards_code") or []), separators=(",", ":"))
        self._write(f"{EXTRA_DIR}{GRAPH_FILE}", record.encode())
        self._write(DIGESTS_ENTRY, json.dumps({"sha256": self._digests}, sort_keys=True).encode())
        # The records torch's own reader expects (what its writer adds when it closes an archive).
        for entry, text in ((ARCHIVE_FORMAT_PATH, ARCHIVE_FORMAT_VALUE), (ARCHIVE_VERSION_PATH, ARCHIVE_VERSION_VALUE),
                            (".data/version", "6\n"), ("byteorder", "little")):
            self._write(entry, text.encode())
        self._zip.close()
        self._handle.close()
        self._open = False
        try:
            os.replace(self.temporary, self.path)
        except OSError as exc:
            self.temporary.unlink(missing_ok=True)
            raise InputError(f"cannot move the graph file into place: {exc.strerror or exc}", where=str(self.path),
                             fix="choose a writable output path") from exc
        finally:
            self._terminate.__exit__(None, None, None)
        return self.path

    def write_string(self, entry: str, text: str) -> None:  # what torch's _package_payload_config calls
        self._write(entry, text.encode())

    def abort(self) -> None:
        """Drop everything written so far."""
        self._open = False
        for close in (self._zip.close, self._handle.close):
            try:
                close()
            except Exception:  # the writer may be the thing that failed (a full disk): the file goes anyway
                pass
        self.temporary.unlink(missing_ok=True)
        self._terminate.__exit__(None, None, None)


def reproducible_program(program: dict[str, Any]) -> bytes:
    """models/model.json (the serialized program, parsed) without the node metadata that differs between two
    identical compiles."""
    for node in program["graph_module"]["graph"]["nodes"]:
        for key in _UNREPRODUCIBLE_NODE_META:
            node.get("metadata", {}).pop(key, None)
    return json.dumps(program).encode()


def _serialize_without_weights(program: torch.export.ExportedProgram):
    """torch.export's serialized program and example inputs, without pickling the weights (written above).

    torch ≥ 2.12 can leave the state dict and constants out; older ones always pickle them, so there the
    program is serialized with meta stand-ins of the same shapes, which pickle without bytes."""
    if "serialize_state_dict" in inspect.signature(serialize).parameters:
        return serialize(program, None, serialize_state_dict=False, serialize_constants=False)

    def stand_in(value):
        if not isinstance(value, torch.Tensor):
            return value
        meta = torch.empty_like(value, device="meta")
        return torch.nn.Parameter(meta, value.requires_grad) if isinstance(value, torch.nn.Parameter) else meta

    shell = copy.copy(program)
    shell._state_dict = {name: stand_in(value) for name, value in program.state_dict.items()}
    shell._constants = {name: stand_in(value) for name, value in program.constants.items()}
    return serialize(shell)


def _cpu_tensor_meta(written: torch.Tensor, expected: torch.Tensor) -> schema.TensorMeta:
    """The tensor meta of the written bytes (contiguous shape and stride, dtype) on the CPU, with the program's
    requires_grad."""
    meta = serialize_tensor_meta(written)
    return dataclasses.replace(meta, device=schema.Device(type="cpu"),
                               requires_grad=bool(expected.requires_grad and written.is_floating_point()))


# ---- reading ----------------------------------------------------------------------------------------------

def corrupt(what: str, where: str) -> CheckpointError:
    return CheckpointError(f"the graph file is corrupt or truncated ({what})", where=where,
                           fix="write it again with svdq-compile or svdq_compiler.save")


class GraphArchive:
    """A graph file opened for reading: its zip directory, and one private memory map of the whole file.

    `read(entry)` returns a small entry's bytes; `verify()` checks every entry against the digests;
    `tensors(config_entry, folder)` builds the tensors a payload config describes as windows on the map."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.where = str(self.path)
        if not self.path.is_file():
            raise CheckpointError("no such graph file" if not self.path.exists() else "not a file",
                                  where=self.where, fix="give the path svdq-compile --out (or svdq_compiler.save) "
                                                        "wrote")
        try:
            with open(self.path, "rb") as handle:
                size = os.fstat(handle.fileno()).st_size
                if size == 0:
                    raise corrupt("the file is empty", self.where)
                self.map = mmap.mmap(handle.fileno(), size, access=mmap.ACCESS_COPY)
            self.zip = zipfile.ZipFile(self.path)
        except (zipfile.BadZipFile, EOFError, OSError, ValueError) as exc:
            raise corrupt(first_line(exc), self.where) from exc
        names = self.zip.namelist()
        if len(names) != len(set(names)):
            raise corrupt("an entry name occurs twice", self.where)
        self.root = names[0].split("/", 1)[0] if names else ""
        self.infos = {info.filename.split("/", 1)[1] if "/" in info.filename else info.filename: info
                      for info in self.zip.infolist()}

    def close(self) -> None:
        self.zip.close()  # the map stays open while tensors look into it; it closes with the last of them

    def __enter__(self) -> "GraphArchive":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def entries(self) -> list[str]:
        return list(self.infos)

    def read(self, entry: str) -> bytes:
        """The bytes of a (small) entry, checked against the zip's CRC."""
        info = self.infos.get(entry)
        if info is None:
            raise corrupt(f"no entry {entry}", self.where)
        if info.file_size > _MAX_JSON_ENTRY:
            raise corrupt(f"{entry} is {info.file_size} bytes", self.where)
        try:
            return self.zip.read(info)
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError, ValueError,
                RuntimeError) as exc:
            raise corrupt(f"{entry}: {first_line(exc)}", self.where) from exc

    def span(self, entry: str) -> tuple[int, int]:
        """(offset, size) of a stored entry's bytes in the file, from its local header (which must agree with
        the zip directory)."""
        info = self.infos[entry]
        start = info.header_offset
        name = info.orig_filename.encode()
        # Read with pread, not through the map: touching the map faults in (and reads ahead) pages around
        # every header, tens of MiB of weights for a large graph.
        header = os.pread(self.zip.fp.fileno(), 30 + len(name), start)
        if len(header) < 30 or header[:4] != b"PK\x03\x04" or info.compress_type != zipfile.ZIP_STORED:
            raise corrupt(f"{entry} is not a stored zip entry", self.where)
        name_length = int.from_bytes(header[26:28], "little")
        extra_length = int.from_bytes(header[28:30], "little")
        if header[30:30 + name_length] != name:
            raise corrupt(f"{entry}: its header names another entry", self.where)
        offset = start + 30 + name_length + extra_length
        if offset + info.file_size > len(self.map) or info.compress_size != info.file_size:
            raise corrupt(f"{entry} runs past the end of the file", self.where)
        return offset, info.file_size

    def digests(self) -> dict[str, str]:
        raw = self.read(DIGESTS_ENTRY) if DIGESTS_ENTRY in self.infos else None
        try:
            table = json.loads(raw)["sha256"] if raw is not None else None
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, RecursionError) as exc:
            raise corrupt(f"{DIGESTS_ENTRY} is damaged ({first_line(exc)})", self.where) from exc
        if not isinstance(table, dict) or not all(isinstance(v, str) for v in table.values()):
            raise corrupt(f"{DIGESTS_ENTRY} is damaged", self.where)
        return table

    def verify(self) -> None:
        """Check every entry other than the zip-format records against its SHA-256. Tensor records are read
        through one small buffer, not the map: the map stays untouched, so verifying a file keeps none of it
        resident (a page faulted in through the map would stay, with the pages the kernel maps around it)."""
        table = self.digests()
        for entry in self.infos:
            if entry == DIGESTS_ENTRY or not (entry.startswith("data/") or entry.startswith("models/")
                                              or entry.startswith(EXTRA_DIR)):
                continue
            expected = table.get(entry)
            if expected is None:
                raise corrupt(f"{entry} has no digest (added after the file was written?)", self.where)
            if self.infos[entry].compress_type == zipfile.ZIP_STORED:
                actual = self._stored_digest(*self.span(entry))
            else:
                actual = self._deflated_digest(entry)
            if actual != expected:
                raise corrupt(f"{entry} does not match its SHA-256 digest: the file was damaged after it was "
                              f"written", self.where)
        absent = sorted(set(table) - set(self.infos))
        if absent:
            raise corrupt(f"entries listed in the digests are missing: {absent[:4]}", self.where)

    def _stored_digest(self, offset: int, size: int) -> str:
        sha = hashlib.sha256()
        buffer = bytearray(min(size, _VERIFY_CHUNK))
        view = memoryview(buffer)
        done = 0
        while done < size:
            count = os.preadv(self.zip.fp.fileno(), [view[:min(len(buffer), size - done)]], offset + done)
            if count <= 0:
                raise corrupt("the file ends inside a record", self.where)
            sha.update(view[:count])
            done += count
        return sha.hexdigest()

    def _deflated_digest(self, entry: str) -> str:
        """The SHA-256 of a compressed entry, inflated chunk by chunk (models/model.json is ~1 KB a node: read
        whole, it would be a transient as large as a small graph's weights)."""
        sha = hashlib.sha256()
        try:
            with self.zip.open(self.infos[entry]) as handle:
                while chunk := handle.read(_VERIFY_CHUNK // 4):
                    sha.update(chunk)
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError, ValueError,
                RuntimeError) as exc:
            raise corrupt(f"{entry}: {first_line(exc)}", self.where) from exc
        return sha.hexdigest()

    def _release(self, offset: int, size: int) -> None:
        page = mmap.PAGESIZE
        start = offset // page * page
        end = min(len(self.map), -(-(offset + size) // page) * page)
        if end > start and hasattr(mmap, "MADV_DONTNEED"):
            self.map.madvise(mmap.MADV_DONTNEED, start, end - start)

    def tensors(self, config_entry: str, folder: str, device: torch.device | None = None) -> dict[str, torch.Tensor]:
        """fqn → tensor for a payload config (checked by archive_check: raw records only). On the CPU each
        tensor is a window on the map; on another device it is copied there one tensor at a time."""
        from torch._export.serde.serialize import deserialize_scalar_type

        config = json.loads(self.read(config_entry))["config"]
        tensors: dict[str, torch.Tensor] = {}
        for fqn, meta in config.items():
            tensor_meta = meta["tensor_meta"]
            try:
                dtype = deserialize_scalar_type(tensor_meta["dtype"])
                shape = [size["as_int"] for size in tensor_meta["sizes"]]
                stride = [step["as_int"] for step in tensor_meta["strides"]]
                storage_offset = tensor_meta["storage_offset"]["as_int"]
            except (KeyError, TypeError, ValueError) as exc:
                raise corrupt(f"{fqn!r} has an unreadable tensor description ({first_line(exc)})",
                              self.where) from exc
            offset, size = self.span(f"{folder}{meta['path_name']}")
            element = torch.empty((), dtype=dtype).element_size()
            extent = 1 + storage_offset + sum((n - 1) * s for n, s in zip(shape, stride)) if all(shape) else 0
            if not all(isinstance(v, int) and v >= 0 for v in [*shape, *stride, storage_offset]) or \
                    size % element or extent * element > size:
                raise corrupt(f"{fqn!r}: {dtype} {shape} does not fit its {size}-byte record", self.where)
            if size == 0:
                flat = torch.empty(0, dtype=dtype)
            elif offset % element == 0:
                flat = torch.frombuffer(self.map, dtype=dtype, count=size // element, offset=offset)
            else:  # a file rewritten by another zip tool: records lose their alignment, so copy this one
                flat = torch.frombuffer(bytearray(self.map[offset:offset + size]), dtype=dtype)
            tensor = flat.as_strided(shape, stride, storage_offset)
            if device is not None and device != tensor.device:
                tensor = tensor.to(device)
                self._release(offset, size)
            if meta["is_param"]:
                grad = tensor_meta.get("requires_grad") is True and tensor.is_floating_point()
                tensor = torch.nn.Parameter(tensor, requires_grad=grad)
            tensors[fqn] = tensor
        return tensors
