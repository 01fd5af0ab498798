"""A torch.export PT2 archive (what `torch.export.save` writes and `torch.export.load` reads) written one
tensor at a time, for graphs whose weights never sit in memory together.

A PT2 archive is a zip: each weight is its own record `data/weights/weight_<i>` (raw bytes), described by
`data/weights/<model>_weights_config.json` (record, shape, stride, dtype, parameter or buffer); the graph is
`models/<model>.json`, written without weights; extra files go under `extra/`. So the weights can be
streamed in as they are produced, and the graph — exported on the meta device, where it costs no memory —
added at the end. `torch.export.load` cannot tell the result from a `torch.export.save` of the same program.

The archive is written to a temporary file beside the target and renamed only when complete: an error (a full
disk included) removes the temporary file and leaves no partial output.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path
from typing import Mapping

import torch
from torch._export.serde import schema
from torch._export.serde.serialize import serialize, serialize_tensor_meta
from torch.export.pt2_archive._package import PT2ArchiveWriter, _package_constants, _package_payload_config
from torch.export.pt2_archive.constants import (CONSTANTS_CONFIG_FILENAME_FORMAT, EXTRA_DIR,
                                                MODELS_FILENAME_FORMAT, SAMPLE_INPUTS_FILENAME_FORMAT,
                                                WEIGHT_FILENAME_PREFIX, WEIGHTS_CONFIG_FILENAME_FORMAT,
                                                WEIGHTS_DIR)

from svdq_compiler.errors import CheckpointError, InputError

MODEL_NAME = "model"  # the name torch.export.save gives a single program


class StreamingArchive:
    """Write a PT2 archive weight by weight: `add(fqn, tensor)` as tensors are produced, then
    `finish(program, extra_files)` with the ExportedProgram whose state_dict names them (its own tensors may be
    on the meta device; their shapes and dtypes must match what was added)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if self.path.is_dir():
            raise InputError("the output path is a folder", where=str(self.path), fix="give a file name")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            handle, temporary = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        except OSError as exc:
            raise InputError(f"cannot write beside the output: {exc.strerror or exc}", where=str(self.path),
                             fix="choose a writable output folder") from exc
        os.close(handle)
        self.temporary = Path(temporary)
        self._writer = PT2ArchiveWriter(str(self.temporary))
        self._weights: dict[str, tuple[str, torch.Tensor]] = {}  # fqn → (record, meta-device stand-in)
        self.bytes_written = 0
        self._open = True

    def __enter__(self) -> "StreamingArchive":
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if self._open:
            self.abort()

    def add(self, fqn: str, tensor: torch.Tensor) -> None:
        """Write one weight's bytes now; the caller may free the tensor afterwards."""
        if fqn in self._weights:
            raise CheckpointError(f"weight {fqn!r} was written twice", where=str(self.path))
        tensor = tensor.detach().contiguous().cpu()
        record = f"{WEIGHT_FILENAME_PREFIX}{len(self._weights)}"
        data = tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
        self._writer.write_bytes(os.path.join(WEIGHTS_DIR, record), data)
        self._weights[fqn] = (record, torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype,
                                                          device="meta"))
        self.bytes_written += len(data)

    def written(self) -> set[str]:
        return set(self._weights)

    def finish(self, program: torch.export.ExportedProgram, extra_files: Mapping[str, str] | None = None) -> Path:
        """Write the weights config, constants, graph and extra files, then move the archive into place."""
        state = program.state_dict
        missing = sorted(set(state) - set(self._weights))
        unknown = sorted(set(self._weights) - set(state))
        if missing or unknown:
            raise CheckpointError(f"the streamed weights do not match the program: missing {missing[:8]}, not in "
                                  f"the program {unknown[:8]}", where=str(self.path))
        config = {}
        for fqn, expected in state.items():
            record, written = self._weights[fqn]
            if written.shape != expected.shape or written.dtype != expected.dtype:
                raise CheckpointError(f"weight {fqn!r} was written as {written.dtype} {list(written.shape)}, the "
                                      f"program has {expected.dtype} {list(expected.shape)}", where=str(self.path))
            config[fqn] = schema.PayloadMeta(path_name=record, is_param=isinstance(expected, torch.nn.Parameter),
                                             use_pickle=False, tensor_meta=_cpu_tensor_meta(written, expected))
        writer = self._writer
        _package_payload_config(writer, schema.PayloadConfig(config=config),
                                WEIGHTS_CONFIG_FILENAME_FORMAT.format(MODEL_NAME))
        _package_payload_config(writer, _package_constants(MODEL_NAME, program, writer),
                                CONSTANTS_CONFIG_FILENAME_FORMAT.format(MODEL_NAME))
        artifact = serialize(program, None, serialize_state_dict=False, serialize_constants=False)
        writer.write_bytes(MODELS_FILENAME_FORMAT.format(MODEL_NAME), artifact.exported_program)
        writer.write_bytes(SAMPLE_INPUTS_FILENAME_FORMAT.format(MODEL_NAME), artifact.example_inputs)
        for name, content in (extra_files or {}).items():
            writer.write_string(f"{EXTRA_DIR}{name}", content)
        writer.__exit__(None, None, None)  # writes the archive format/version records and the zip directory
        self._open = False
        try:
            os.replace(self.temporary, self.path)
        except OSError:
            self.temporary.unlink(missing_ok=True)
            raise
        return self.path

    def abort(self) -> None:
        """Drop everything written so far."""
        self._open = False
        try:
            self._writer.close()
        except Exception:  # the writer may be the thing that failed (a full disk): the file goes anyway
            pass
        self.temporary.unlink(missing_ok=True)


def _cpu_tensor_meta(written: torch.Tensor, expected: torch.Tensor) -> schema.TensorMeta:
    """The tensor meta of the written bytes (shape, stride, dtype) on the CPU, with the program's requires_grad."""
    meta = serialize_tensor_meta(written)
    return dataclasses.replace(meta, device=schema.Device(type="cpu"),
                               requires_grad=bool(expected.requires_grad and written.is_floating_point()))
