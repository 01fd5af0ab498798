"""Saving and loading compiled graphs (`graph.pt`).

`save` re-exports the GraphModule with the dynamic dimensions the capture recorded and writes it as a PT2
archive (svdq_compiler.archive: the bytes of each view only, a SHA-256 per entry, reproducible bytes) to a
temporary file that is then renamed, so a failed save leaves nothing behind. Beside the program the archive
carries extra files:

- `svdq_manifest.json`: the format marker and version, and the project/torch/triton/python versions;
- `svdq_capture.json`: the capture report (inputs, dynamic and static dimensions, relaxed guards);
- `svdq_config.json`: the QuantConfig of the compile (null for a graph that was only captured);
- `svdq_report.json`: the compile report (passes with statistics, per-linear annotations; wall times and other
  measurements of the compiling run stay out, so two identical compiles write identical files);
- `svdq_ir.py`: the IR as `format_ir` printed it (node.meta["svdq"] does not survive serialization);
- `svdq_graph.json`: the graph as `load` rebuilds it (written by the archive, svdq_compiler.graph_record);
- `svdq_loras.json`, when LoRAs are applied: what they are (the program holds the graph as compiled and their
  factors as buffers; `load` applies them again: svdq_compiler/lora.py).

`load` maps the file, checks the marker and version, verifies every digest, refuses anything that could run
code (archive_check), builds the weights as windows on the map (or copies them one by one to `device`),
rebuilds the graph from `svdq_graph.json` (svdq_compiler.graph_record), and restores the reports into
`gm.meta` and the input checks.
"""

from __future__ import annotations

import json
import platform
import zlib
from pathlib import Path
from typing import Any

import torch
import torch.fx

from svdq_compiler.capture import (CapturedDim, capture_report, dynamic_shapes_of, export_program,
                                   install_shape_check)
from svdq_compiler.archive import GraphArchive, StreamingArchive, corrupt, digest
from svdq_compiler.archive_check import check_archive
from svdq_compiler.dropin import as_pipeline_component
from svdq_compiler.errors import CheckpointError, InputError, first_line
from svdq_compiler.eager import EAGER_FILE
from svdq_compiler.graph_record import GRAPH_FILE, rebuild
from svdq_compiler.ir import (CAPTURE_META, EAGER_META, INPUTS_META, IR_META, MANIFEST_META, REPORT_META, format_ir,
                              split_inputs)
from svdq_compiler.lora import LORA_FILE, restore_loras, saved_form

FORMAT = "svdq-graph"
# Bump when a reader of the old format would misread the new one (2: digests, view bytes; 3: graph record).
FORMAT_VERSION = 3

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

    from svdq_compiler.eager import is_eager, stub_with_tensors

    if is_eager(gm):  # a model the eager path compiled: its stub graph, with the model's tensors
        with stub_with_tensors(gm) as stub:
            return save(stub, path)
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
            program = export_program(gm, args, kwargs, dynamic_shapes_of(gm, list(args) or kwargs))
        except Exception as exc:  # a graph the passes left un-exportable is a compiler bug; say which step failed
            raise CheckpointError(f"the compiled graph could not be re-exported for saving: {first_line(exc)}",
                                  where=str(path), fix="rerun with --verify to find the pass that broke the "
                                                       "graph") from exc
        extra = {**extra_files(gm), **loras}
    with StreamingArchive(path) as archive:
        for fqn, tensor in program.state_dict.items():
            archive.add(fqn, tensor)
        archive.finish(program, extra)
    return path


# Keys of the reports that measure the compiling run (time, memory), not the graph: the compile report that
# svdq-compile --report writes keeps them; the graph file does not, so that it is reproducible.
RUN_MEASUREMENTS = frozenset({"wall_s", "cpu_s", "steps_s", "peak_rss_bytes", "rss_bytes"})


def without_run_measurements(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: without_run_measurements(v) for k, v in value.items() if k not in RUN_MEASUREMENTS}
    if isinstance(value, (list, tuple)):
        return [without_run_measurements(v) for v in value]
    return value


def extra_files(gm: torch.fx.GraphModule) -> dict[str, str]:
    """The svdq extra files of a graph file for `gm` (also written by the streaming compile's archive)."""
    report = without_run_measurements(gm.meta.get(REPORT_META, {}))
    eager = {EAGER_FILE: json.dumps(gm.meta[EAGER_META])} if EAGER_META in gm.meta else {}
    return {
        **eager,
        MANIFEST_FILE: json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION, **versions()}),
        CAPTURE_FILE: json.dumps(without_run_measurements(capture_report(gm))),
        CONFIG_FILE: json.dumps(report.get("config")),
        REPORT_FILE: json.dumps(report, default=_unsaved),
        IR_FILE: zlib.decompress(gm.meta[IR_META]).decode() if IR_META in gm.meta else format_ir(gm),
    }


def _unsaved(value: Any) -> str:
    """A report value JSON cannot hold: its type name (its repr may carry an object id, which differs between
    two identical compiles)."""
    return f"<{type(value).__name__}>"


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of a graph file, after checking that it is one this version can read."""
    with GraphArchive(path) as archive:
        return manifest_of(archive)


def manifest_of(archive: GraphArchive) -> dict[str, Any]:
    """The manifest of an opened graph file, checked: the marker, and a format version this reads."""
    where = archive.where
    if f"extra/{MANIFEST_FILE}" not in archive.infos:
        raise CheckpointError("not an svdq-compiler graph: the file has no svdq manifest (made by another tool?)",
                              where=where, fix="compile the model with svdq-compile first")
    try:
        manifest = json.loads(archive.read(f"extra/{MANIFEST_FILE}"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise corrupt(f"the manifest is not JSON: {first_line(exc)}", where) from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError("not an svdq-compiler graph: unknown format marker", where=where,
                              fix="compile the model with svdq-compile first")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"the graph was written by svdq-compiler {manifest.get('svdq_compiler')} in format "
                              f"version {version}; this version reads up to {FORMAT_VERSION}", where=where,
                              fix="upgrade svdq-compiler, or compile the model again with this version")
    if version < FORMAT_VERSION:
        raise CheckpointError(f"the graph was written by an older svdq-compiler ({manifest.get('svdq_compiler')}, "
                              f"format version {version}); this version reads format "
                              f"{FORMAT_VERSION}", where=where, fix="compile the model again with this version")
    return manifest


def read_extra(path: str | Path) -> dict[str, str]:
    """The svdq extra files of a graph file, checked against their digests, without loading the program (for
    inspection)."""
    with GraphArchive(path) as archive:
        manifest_of(archive)
        digests = archive.digests()
        extra = {}
        for name in EXTRA_FILES:
            entry = f"extra/{name}"
            data = archive.read(entry)
            if digests.get(entry) != digest(data):
                raise corrupt(f"{entry} does not match its SHA-256 digest", archive.where)
            extra[name] = data.decode()
        return extra


def saved_reports(extra: dict[str, str], where: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The capture and compile reports of a graph file, checked to have the structure the input checks and
    svdq-inspect read (a crafted file can hold any JSON, digests and all)."""
    try:
        capture, report = json.loads(extra[CAPTURE_FILE]), json.loads(extra[REPORT_FILE] or "{}")
        valid = isinstance(capture, dict) and isinstance(report, dict) \
            and isinstance(capture.get("positional"), bool) and isinstance(capture.get("module_class"), str) \
            and isinstance(capture.get("adapter"), str) \
            and isinstance(capture.get("relaxed_guards"), (dict, type(None))) \
            and isinstance(capture.get("inputs"), list) and isinstance(capture.get("dims"), list) \
            and all(isinstance(i, dict) and isinstance(i.get("path"), str) and isinstance(i.get("dtype"), str)
                    and isinstance(i.get("shape"), list) and all(type(n) is int for n in i["shape"])
                    for i in capture["inputs"]) \
            and all(isinstance(d, dict) and _usable_dim(CapturedDim(**d)) for d in capture["dims"])
    except (json.JSONDecodeError, TypeError, ValueError, AttributeError, KeyError, InputError, RecursionError) as exc:
        raise corrupt(f"its capture report is unreadable ({first_line(exc)})", where) from exc
    if not valid:
        raise corrupt("its capture or compile report lacks the expected fields", where)
    return capture, report


def _usable_dim(dim: CapturedDim) -> bool:
    if type(dim.index) is not int or type(dim.size) is not int or not isinstance(dim.input, str):
        return False
    return dim.status != "dynamic" or dim.dyn() is not None  # DynDim checks its name and range


def load(path: str | Path, device: str | torch.device | None = None) -> torch.nn.Module:
    """The GraphModule saved at `path`, ready to run, with its capture and compile reports in gm.meta; for a
    graph of a diffusers model, wrapped as a drop-in pipeline component (svdq_compiler.dropin); for a model the
    eager path compiled, that diffusers model rebuilt around the saved quantized linears (svdq_compiler.eager).

    The file is mapped, not read: every entry is checked against its digest, the file is checked to hold
    nothing that runs when loaded (archive_check), the weights are windows on the map, and the graph is rebuilt
    from its record (svdq_compiler.graph_record), not by torch's program deserializer. With `device` (e.g.
    "cuda") the weights are copied there one at a time, never all held on the CPU first."""
    import svdq_compiler.api  # noqa: F401  (registers the svdq ops and fused ops a graph calls)

    try:
        target = torch.device(device) if device is not None else torch.device("cpu")
    except (RuntimeError, TypeError) as exc:
        raise InputError(f"unknown device {device!r}", where="load", fix="give e.g. 'cpu' or 'cuda'") from exc
    try:  # before any work: a CUDA device on a machine without one is an AssertionError deep in the first copy
        torch.empty(0, device=target)
    except (RuntimeError, AssertionError) as exc:
        raise InputError(f"device {str(target)!r} is not available here ({first_line(exc)})", where="load",
                         fix="load onto 'cpu', or on a machine that has this device") from exc
    with GraphArchive(path) as archive:
        manifest = manifest_of(archive)
        archive.verify()  # first, so that damage reads as damage, not as a hostile file
        args, kwargs = check_archive(archive)
        where = archive.where
        # the manifest is read above, and the config only by inspection (read_extra)
        extra = {name: archive.read(f"extra/{name}").decode() for name in (CAPTURE_FILE, REPORT_FILE, IR_FILE)}
        capture, report = saved_reports(extra, where)
        # kept deflated: only saving the graph again reads it, and as text it is ~2 bytes a character (the IR has
        # non-ASCII arrows), 0.4 MiB for tiny-flux, whose weights are 7.7 MiB. Deflated, and the texts dropped,
        # before the graph is rebuilt: that is the peak of a load, which they would add to.
        ir = zlib.compress(extra.pop(IR_FILE).encode())
        del extra
        record = archive.read(f"extra/{GRAPH_FILE}")
        loras = archive.read(f"extra/{LORA_FILE}").decode() if f"extra/{LORA_FILE}" in archive.entries() else ""
        eager = archive.read(f"extra/{EAGER_FILE}").decode() if f"extra/{EAGER_FILE}" in archive.entries() else ""
        on_cpu = target.type == "cpu"
        tensors = {**archive.tensors("data/weights/model_weights_config.json", "data/weights/",
                                     None if on_cpu else target),
                   **archive.tensors("data/constants/model_constants_config.json", "data/constants/",
                                     None if on_cpu else target)}
    gm = rebuild(record, tensors, where, target, check_guards=capture.get("relaxed_guards") is None)
    gm.meta[CAPTURE_META] = capture
    gm.meta[REPORT_META] = report
    gm.meta[IR_META] = ir
    gm.meta[MANIFEST_META] = manifest
    gm.meta[INPUTS_META] = tuple(args) if args else dict(kwargs)
    install_shape_check(gm)
    restore_loras(gm, loras, where)
    if eager:
        from svdq_compiler.eager import rebuild as rebuild_eager

        return rebuild_eager(gm, eager, where)
    return as_pipeline_component(gm)
