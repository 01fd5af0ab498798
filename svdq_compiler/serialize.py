"""Saving and loading compiled graphs (`graph.pt`).

`save` re-exports the GraphModule with the dynamic dimensions the capture recorded and writes it with
`torch.export.save` to a temporary file that is then renamed, so a failed save leaves nothing behind. Beside
the program the archive carries extra files:

- `svdq_manifest.json`: the format marker and version, and the project/torch/triton/python versions;
- `svdq_capture.json`: the capture report (inputs, dynamic and static dimensions, relaxed guards);
- `svdq_config.json`: the QuantConfig of the compile (null for a graph that was only captured);
- `svdq_report.json`: the compile report (passes with statistics and wall time, per-linear annotations);
- `svdq_ir.py`: the IR as `format_ir` printed it (node.meta["svdq"] does not survive serialization);
- `svdq_loras.json`, when LoRAs are applied: what they are (the program holds the graph as compiled and their
  factors as buffers; `load` applies them again: svdq_compiler/lora.py).

`load` checks the marker and version before reading the program, restores the reports into `gm.meta` and
re-installs the shape check.
"""

from __future__ import annotations

import io
import json
import platform
import zipfile
from pathlib import Path
from typing import Any

import torch
import torch.fx

from svdq_compiler.capture import (CAPTURE_META, INPUTS_META, capture_report, dynamic_shapes_of, install_shape_check,
                                   split_inputs, unlift)
from svdq_compiler.archive_check import check_archive
from svdq_compiler.dropin import as_pipeline_component
from svdq_compiler.errors import CheckpointError, first_line
from svdq_compiler.files import atomic_path
from svdq_compiler.ir import format_ir
from svdq_compiler.lora import LORA_FILE, restore_loras, saved_form

FORMAT = "svdq-graph"
FORMAT_VERSION = 1  # bump when a reader of the old format would misread the new one
REPORT_META = "svdq_report"  # the compile report, set by svdq_compiler.compile
IR_META = "svdq_ir"  # the saved IR text, on a loaded graph

MANIFEST_FILE = "svdq_manifest.json"
CAPTURE_FILE = "svdq_capture.json"
CONFIG_FILE = "svdq_config.json"
REPORT_FILE = "svdq_report.json"
IR_FILE = "svdq_ir.py"
EXTRA_FILES = (MANIFEST_FILE, CAPTURE_FILE, CONFIG_FILE, REPORT_FILE, IR_FILE)


def versions() -> dict[str, str | None]:
    from svdq_compiler import __version__

    try:
        import triton

        triton_version: str | None = triton.__version__
    except ImportError:
        triton_version = None
    return {"svdq_compiler": __version__, "torch": torch.__version__, "triton": triton_version,
            "python": platform.python_version()}


def save(gm: torch.fx.GraphModule, path: str | Path) -> Path:
    """Write `gm` (from capture, compile or load) to `path` as a graph file; returns the path."""
    from svdq_compiler.dropin import graph_module_of

    path = Path(path)
    gm = graph_module_of(gm)
    capture_report(gm)  # a graph capture did not make cannot be re-exported: this says so
    inputs = gm.meta.get(INPUTS_META)
    if inputs is None:
        raise CheckpointError("the graph has no example inputs to re-export it with",
                              fix="save graphs made by svdq_compiler.capture, compile or load")
    args, kwargs = split_inputs(inputs)
    with saved_form(gm) as loras:  # applied LoRAs travel as LoRAs (svdq_compiler/lora.py)
        try:
            with torch.no_grad():
                spec = dynamic_shapes_of(gm, list(args) or kwargs)
                program = torch.export.export(gm, args, kwargs, dynamic_shapes=spec, strict=False)
        except Exception as exc:  # a graph the passes left un-exportable is a compiler bug; say which step failed
            raise CheckpointError(f"the compiled graph could not be re-exported for saving: {first_line(exc)}",
                                  where=str(path), fix="rerun with --verify to find the pass that broke the "
                                                       "graph") from exc
        extra = {**extra_files(gm), **loras}
    with atomic_path(path, "graph file") as temporary, open(temporary, "wb") as handle:
        # A file object rather than a name: torch names the archive after a file name (and wants ".pt2").
        torch.export.save(program, handle, extra_files=extra)
    return path


def extra_files(gm: torch.fx.GraphModule) -> dict[str, str]:
    """The svdq extra files of a graph file for `gm` (also written by the streaming compile's archive)."""
    report = gm.meta.get(REPORT_META, {})
    return {
        MANIFEST_FILE: json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION, **versions()}),
        CAPTURE_FILE: json.dumps(capture_report(gm)),
        CONFIG_FILE: json.dumps(report.get("config")),
        REPORT_FILE: json.dumps(report, default=str),
        IR_FILE: gm.meta.get(IR_META) or format_ir(gm),
    }


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of a graph file, after checking that it is one this version can read."""
    return manifest_of(read_graph_bytes(path), str(path))


def read_graph_bytes(path: str | Path) -> bytes:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError("no such graph file" if not path.exists() else "not a file", where=str(path),
                              fix="give the path svdq-compile --out (or svdq_compiler.save) wrote")
    return path.read_bytes()


def manifest_of(data: bytes, where: str) -> dict[str, Any]:
    """The manifest inside a graph file's bytes, checked: the marker, and a format version this reads."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            name = next((n for n in archive.namelist() if n.endswith(MANIFEST_FILE)), None)
            if name is None:
                raise CheckpointError("not an svdq-compiler graph: the file has no svdq manifest (made by another "
                                      "tool?)", where=where, fix="compile the model with svdq-compile first")
            manifest = json.loads(archive.read(name))
    except (zipfile.BadZipFile, EOFError, OSError, json.JSONDecodeError, KeyError) as exc:
        raise CheckpointError(f"the graph file is corrupt or truncated ({first_line(exc)})", where=where,
                              fix="write it again with svdq-compile or svdq_compiler.save") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError("not an svdq-compiler graph: unknown format marker", where=where,
                              fix="compile the model with svdq-compile first")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"the graph was written by svdq-compiler {manifest.get('svdq_compiler')} in format "
                              f"version {version}; this version reads up to {FORMAT_VERSION}", where=where,
                              fix="upgrade svdq-compiler, or compile the model again with this version")
    return manifest


def read_extra(path: str | Path) -> dict[str, str]:
    """The svdq extra files of a graph file, without loading the program (for inspection)."""
    data = read_graph_bytes(path)
    manifest_of(data, str(path))
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        return {extra: archive.read(name).decode() for name in archive.namelist()
                for extra in EXTRA_FILES if name.endswith(extra)}


def load(path: str | Path) -> torch.nn.Module:
    """The GraphModule saved at `path`, ready to run, with its capture and compile reports in gm.meta; for a
    graph of a diffusers model, wrapped as a drop-in pipeline component (svdq_compiler.dropin).

    The file is read once; its bytes are checked to hold nothing that runs when loaded (archive_check) and
    those same bytes are deserialized."""
    data = read_graph_bytes(path)
    manifest = manifest_of(data, str(path))
    check_archive(data, str(path))
    extra = {name: "" for name in (*EXTRA_FILES, LORA_FILE)}
    try:
        program = torch.export.load(io.BytesIO(data), extra_files=extra)
    except Exception as exc:  # torch raises many types for damaged archives
        raise CheckpointError(f"the graph file could not be loaded ({first_line(exc)}); it was written with torch "
                              f"{manifest.get('torch')}, this is torch {torch.__version__}", where=str(path),
                              fix="compile the model again with this torch, or load it with the torch it was "
                                  "written with") from exc
    capture = json.loads(extra[CAPTURE_FILE])
    gm = unlift(program, check_guards=capture.get("relaxed_guards") is None)
    gm.meta[CAPTURE_META] = capture
    gm.meta[REPORT_META] = json.loads(extra[REPORT_FILE] or "{}")
    gm.meta[IR_META] = extra[IR_FILE]
    gm.meta["svdq_manifest"] = manifest
    examples = getattr(program, "example_inputs", None)  # kept by torch.export.save since torch 2.6
    if examples is not None:
        gm.meta[INPUTS_META] = tuple(examples[0]) if examples[0] else dict(examples[1])
    install_shape_check(gm)
    restore_loras(gm, extra[LORA_FILE], str(path))
    return as_pipeline_component(gm)
