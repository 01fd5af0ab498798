"""Streaming compile: a model far larger than memory (a 12B FLUX.1 is 24 GB in bf16) compiled one block at a
time, its quantized weights written into graph.pt as they are produced.

1. The checkpoint folder is validated against the model its config.json describes (`ShardedCheckpoint`):
   every shard present, every name and shape right — before any work.
2. The model is built and captured on the meta device (`meta_capture`), then `annotate_linears` runs on the
   whole graph: roles and groups come from the complete structure, as in a normal compile.
3. The parameters are split into *units*: one per repeated block (`transformer_blocks.7`,
   `single_transformer_blocks.30`, …) and one for everything else. For each unit: its tensors are read from the
   checkpoint into the graph, the unit passes (calibration and smoothing as below, compress, lower, fuse) run
   through `run_passes` with only that unit's linears visible (the others' annotations are set aside), every
   tensor the unit now has is appended to the archive
   (`StreamingArchive`) and replaced by a meta-device stand-in. Memory holds one block.
4. The compiled graph becomes an ExportedProgram without a second trace (`program_from_graph`) and is written
   after the weights, with the same extra files `svdq_compiler.save` writes, so `svdq_compiler.load` opens the
   result like any graph.pt.

Calibration. `calibration` chooses what smoothing works from:
- "none" (the default): λ = 1; the low-rank branch still absorbs the weights' outliers;
- "weight-only": λ = 1/b^β from the weights' per-column ranges b, with β picked per group among `betas`
  (0 included) by the smooth pass's own search on synthetic isotropic rows (`isotropic_calibration`, the
  data-free calibration `calib_source="weights"` uses too) — three SVDs per group more;
- "activations": real calibration inputs, block by block (`svdq_compiler.blockwise`): the unit passes are
  calibrate_blocks → smooth (the activation-aware search of a normal compile) → compress → lower → fuse. The
  rest of the model (embeddings, output head) is read first, stays resident while the blocks run, and is
  compiled last; the units go in the order the graph runs them. Every block runs on every input, so this
  costs the model's forward passes on the calibration set on top of the compile.
The effect of each against the normal calibrated compile is measured by `tools/bench_streaming.py quality`.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import gc
import logging
import re
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.fx

from svdq_compiler.archive import StreamingArchive
from svdq_compiler.blockwise import DEFAULT_MEMORY_BUDGET, REST_UNIT, BlockRunner, spill_summary, unit_of
from svdq_compiler.config import QuantConfig
from svdq_compiler.calibration import isotropic_calibration
from svdq_compiler.calibration_set import CalibrationSet
from svdq_compiler.checks import check_finite_weight
from svdq_compiler.errors import CheckpointError, InputError, SvdqError
from svdq_compiler.ir import (LAYERS_META, LinearInfo, SetAside, annotated_linears, get_attr_value, set_attr_value,
                              set_info)
from svdq_compiler.meta_capture import META, capture_on_meta, program_from_graph
from svdq_compiler.models.base import cast_module
from svdq_compiler.pipeline import (PASS_REGISTRY, Pass, PassContext, PassResult, make_pass, remove_dumps,
                                    run_passes, svdquant_pipeline)
from svdq_compiler.sharded import ShardedCheckpoint

log = logging.getLogger("svdq_compiler")

CALIBRATIONS = ("none", "weight-only", "activations")
DEFAULT_BETAS = (0.0, 0.25, 0.5)
SYNTHETIC_ROWS = 64
_SPLIT_PART = re.compile(r"^(?P<base>.+)\.part(?P<index>\d+)\.weight$")


def peak_rss_bytes() -> int:
    """The peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    """The resident set size of this process now (Linux)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


@dataclass
class UnitRecord:
    name: str
    tensors_read: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    rss_bytes: int = 0  # resident after the unit was written and its memory released
    wall_s: dict[str, float] = field(default_factory=dict)
    passes: dict[str, Any] = field(default_factory=dict)  # each pass's statistics on this unit


class MetaModel:
    """The model a checkpoint folder describes, built on the meta device, and what its state dict must hold."""

    def __init__(self, folder: Path):
        from svdq_compiler.models import adapter_for_class
        from svdq_compiler.models.loading import class_name_of, model_folder, read_config

        self.folder = model_folder(Path(folder))
        self.config = read_config(self.folder / "config.json")
        self.adapter = adapter_for_class(class_name_of(self.config, self.folder / "config.json"))
        model_config = {k: v for k, v in self.config.items() if not k.startswith("_")}
        with torch.device("meta"):
            self.module = self.adapter.model_class().from_config(model_config).eval()
        self.expected = {name: (tuple(t.shape), t.dtype) for name, t in self.module.state_dict().items()}

    def open_checkpoint(self, dtype: torch.dtype | None) -> tuple[ShardedCheckpoint, torch.dtype]:
        checkpoint = ShardedCheckpoint.open(self.folder, self.expected)
        if dtype is None:
            by_dtype: dict[torch.dtype, int] = {}
            for entry in checkpoint.entries.values():
                if entry.dtype.is_floating_point:
                    by_dtype[entry.dtype] = by_dtype.get(entry.dtype, 0) + entry.nbytes
            dtype = max(by_dtype, key=by_dtype.get)
        cast_module(self.module, dtype)
        return checkpoint, dtype


def checkpoint_bytes(folder: Path) -> int:
    """Bytes of tensor data in a diffusers model (or pipeline) folder, from the shard headers alone."""
    from svdq_compiler.models.loading import model_folder

    try:
        return ShardedCheckpoint.open(model_folder(folder)).total_bytes
    except SvdqError:
        return 0  # not a safetensors folder: the normal compile reports what is wrong with it


# ---- reading a unit's tensors ---------------------------------------------------------------------------------


def unit_attributes(gm: torch.fx.GraphModule) -> dict[str, list[str]]:
    """{unit: [parameter and buffer paths]} in first-seen order, the rest of the model first."""
    units: dict[str, list[str]] = {REST_UNIT: []}
    for name, _ in list(gm.named_parameters()) + list(gm.named_buffers()):
        units.setdefault(unit_of(name), []).append(name)
    return units


def read_attribute(gm: torch.fx.GraphModule, target: str, checkpoint: ShardedCheckpoint) -> torch.Tensor:
    """The checkpoint tensor behind a graph attribute: the tensor of that name, or — for the parts
    annotate_linears split off a linear reading a concatenation (`<base>.part<i>.weight`) — its columns of
    `<base>.weight`."""
    stand_in = get_attr_value(gm, target)
    if target in checkpoint.entries:
        return checkpoint.read(target, stand_in.dtype)
    match = _SPLIT_PART.match(target)
    if match and f"{match['base']}.weight" in checkpoint.entries:
        base, index = match["base"], int(match["index"])
        start = sum(get_attr_value(gm, f"{base}.part{i}.weight").shape[1] for i in range(index))
        whole = checkpoint.read(f"{base}.weight", stand_in.dtype)
        return whole[:, start:start + stand_in.shape[1]].contiguous()
    raise CheckpointError(f"the graph attribute {target!r} has no tensor in the checkpoint",
                          where=str(checkpoint.folder), fix="the checkpoint does not belong to this model's config")


def load_unit(gm: torch.fx.GraphModule, targets: list[str], checkpoint: ShardedCheckpoint, record: UnitRecord) -> None:
    for target in targets:
        tensor = read_attribute(gm, target, checkpoint)
        check_finite_weight(target, tensor, str(checkpoint.folder))
        record.tensors_read += 1
        record.bytes_read += tensor.numel() * tensor.element_size()
        set_attr_value(gm, target, tensor)


def real_tensors(gm: torch.fx.GraphModule) -> Iterator[tuple[str, torch.Tensor]]:
    for name, tensor in list(gm.named_parameters()) + list(gm.named_buffers()):
        if tensor.device != META:
            yield name, tensor


def release_freed_memory() -> None:
    """Hand memory freed by the last unit back to the system. glibc raises its mmap threshold to the size of
    the largest block freed (up to 32 MiB), after which a block's tensors of a few MiB come from the heap and
    its holes stay resident: without this the 12B compile grew to 13 GiB although it holds one block at a time."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def flush_unit(gm: torch.fx.GraphModule, archive: StreamingArchive, record: UnitRecord,
               resident: str | None = None) -> None:
    """Append every real tensor of the graph but those of the unit `resident` (the rest of the model, whose
    weights stay in memory while the blocks are calibrated and which is compiled last) to the archive, and
    replace each with a meta-device stand-in of the same shape and dtype."""
    before = archive.bytes_written
    buffers = {name for name, _ in gm.named_buffers()}
    for name, tensor in list(real_tensors(gm)):
        if resident is not None and unit_of(name) == resident:
            continue
        archive.add(name, tensor)
        set_attr_value(gm, name, torch.empty_like(tensor, device=META), as_buffer=name in buffers)
    record.bytes_written = archive.bytes_written - before


# ---- one unit through the passes ------------------------------------------------------------------------------


class VisibleUnit:
    """Sets aside the annotations of every linear outside `unit`, so the passes work on that unit only."""

    def __init__(self, gm: torch.fx.GraphModule, unit: str):
        self.gm, self.unit = gm, unit
        self.hidden: list[tuple[torch.fx.Node, LinearInfo]] = []

    def __enter__(self) -> list[tuple[torch.fx.Node, LinearInfo]]:
        for node, info in list(annotated_linears(self.gm)):
            if unit_of(info.weight) != self.unit:
                set_info(node, SetAside(info))
                self.hidden.append((node, info))
        return list(annotated_linears(self.gm))

    def __exit__(self, *exc) -> None:
        for node, info in self.hidden:
            set_info(node, info)


def unit_passes(calibration: str, propagation: str = "fp") -> list[Pass]:
    """The passes each unit runs: calibration (block by block from real inputs for "activations", else synthetic
    rows), smoothing (activation-aware; weight-only; none: λ = 1), compression, lower, fuse; with quantized
    propagation the compiled block then runs on the calibration inputs for the next blocks."""
    if calibration == "activations":
        names = ["calibrate_blocks", "smooth", "compress", "lower", "fuse"]
        return [PASS_REGISTRY[name] for name in names + (["propagate_block"] if propagation == "quantized" else [])]
    rows = SYNTHETIC_ROWS if calibration == "weight-only" else 1  # only the smoothing search measures on them

    def synthetic(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        ctx.calibration = isotropic_calibration(gm, rows, ctx.config.calib_seed)
        ctx.calibration.source = f"synthetic: {rows} isotropic rows per site (data-free streaming)"
        return PassResult(gm, False, {"rows": rows, "sites": len(ctx.calibration.sites)})

    calibrate = make_pass("synthetic_calibration", synthetic, requires=("linears",), produces=("calibration",),
                          summary="ctx.calibration holds isotropic rows for the visible linears")
    names = (["smooth_weight_only"] if calibration == "weight-only" else []) + ["compress", "lower", "fuse"]
    return [calibrate] + [PASS_REGISTRY[name] for name in names]


def unit_dump_dir(dump_dir: Path, index: int, unit: str) -> Path:
    """Where unit number `index` dumps its IR: `units/NNN_<unit>` inside the IR dump folder."""
    name = re.sub(r"[^\w.-]", "", unit) or "model"  # "(model)" → "model"
    return dump_dir / "units" / f"{index:03d}_{name}"


def clear_unit_dumps(dump_dir: Path) -> None:
    """Remove the unit dumps an earlier compile left in `dump_dir`, so every unit folder is this compile's."""
    for folder in sorted((dump_dir / "units").glob("[0-9][0-9][0-9]_*")):
        remove_dumps(folder)
        if not any(folder.iterdir()):
            folder.rmdir()


def run_unit(gm: torch.fx.GraphModule, ctx: PassContext, passes: list[Pass], record: UnitRecord,
             stats: dict[str, list], index: int) -> list[dict[str, Any]]:
    """Run `passes` (run_passes: requirements, contracts and verification, IR dumps and printing) on the visible
    unit, in a context of its own that starts from what the whole-graph passes produced; returns the unit's layer
    report."""
    unit_ctx = dataclasses.replace(ctx, records=[], available=set(ctx.available), stage_ops=set(ctx.stage_ops),
                                   quantized={}, calibration=None,
                                   dump_dir=None if ctx.dump_dir is None else unit_dump_dir(ctx.dump_dir, index,
                                                                                            record.name))
    run_passes(gm, unit_ctx, passes, start="unit_weights_read")
    ctx.stage_ops.update(unit_ctx.stage_ops)  # the graph keeps this unit's svdq ops while the next units run
    for entry in unit_ctx.records:
        record.wall_s[entry["name"]] = round(entry["wall_s"], 3)
        stats.setdefault(entry["name"], []).append(entry["stats"])
        record.passes[entry["name"]] = entry["stats"]
    return list((gm.meta.get(LAYERS_META) or {}).get("layers", []))


def summed_stats(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """One pass's statistics over all units: integer counters summed, lists of findings (fallbacks) joined;
    the per-unit detail stays in the units' records."""
    total: dict[str, Any] = {"units": len(entries)}
    for entry in entries:
        for key, value in entry.items():
            if isinstance(value, int) and not isinstance(value, bool):
                total[key] = total.get(key, 0) + value
            elif isinstance(value, list) and all(isinstance(item, str) for item in value):
                total[key] = total.get(key, []) + value
            elif isinstance(value, dict) and all(isinstance(v, int) for v in value.values()):
                counts = total.setdefault(key, {})
                for name, count in value.items():
                    counts[name] = counts.get(name, 0) + count
    return total


# ---- the driver -----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _closing(runner: BlockRunner | None) -> Iterator[None]:
    """Remove the block runner's spilled block inputs however the compile ends."""
    try:
        yield
    finally:
        if runner is not None:
            runner.close()


def compile_streaming(folder: str | Path, out: str | Path, config: QuantConfig, *, calibration: str = "none",
                      betas: tuple[float, ...] = DEFAULT_BETAS, batch: int = 2, tokens: Any = None,
                      dtype: torch.dtype | None = None, calib_inputs: Iterable | None = None,
                      input_seed: int | None = None,
                      memory_budget: int = DEFAULT_MEMORY_BUDGET,
                      on_unit: Callable[[UnitRecord, int, int], None] | None = None,
                      dump_ir: str | Path | None = None, verify: bool = False,
                      print_ir_after_change: bool = False) -> dict[str, Any]:
    """Compile the diffusers model folder `folder` to `out` (graph.pt) one block at a time; returns the report
    (time per step, peak RSS, bytes read and written, per-unit records, pass statistics, per-layer report).

    `dump_ir`, `verify` and `print_ir_after_change` are `svdq_compiler.compile`'s: the whole-graph passes dump into
    the folder itself, each unit into `units/NNN_<unit>/` (its graph as the unit's weights were read, then after
    each of its passes); the graph is the whole model's throughout, with the units not yet read or already
    written as meta-device stand-ins.

    calibration="activations" calibrates block by block (`svdq_compiler.blockwise`) on `calib_inputs` (keyword
    dicts, as `PassContext.calib_inputs`, or a `CalibrationSet`, checked and conformed to the model), else on the adapter's `config.calib_prompts` × `config.calib_steps`
    inputs at `tokens` image tokens (seeded by `input_seed`, default `config.calib_seed`); block inputs beyond
    `memory_budget` bytes spill to disk."""
    from svdq_compiler import compile_report, parameter_bytes
    from svdq_compiler.report import layer_totals
    from svdq_compiler.serialize import REPORT_META, extra_files

    if calibration not in CALIBRATIONS:
        raise InputError(f"unknown streaming calibration {calibration!r}", fix=f"use one of {CALIBRATIONS}")
    start = time.perf_counter()
    steps: dict[str, float] = {}

    def step(name: str, began: float) -> None:
        steps[name] = round(time.perf_counter() - began, 2)
        log.info("stream %s: %.1fs, peak RSS %.2f GB", name, steps[name], peak_rss_bytes() / 1e9)

    began = time.perf_counter()
    model = MetaModel(Path(folder))
    checkpoint, dtype = model.open_checkpoint(dtype)
    config = config if config.svd == "randomized" else config.replace(svd="randomized")
    step("validate checkpoint", began)

    began = time.perf_counter()
    input_seed = config.calib_seed if input_seed is None else input_seed
    example = model.adapter.example_inputs(model.module, batch=batch, tokens=tokens, seed=input_seed)
    gm = capture_on_meta(model.module, example, adapter=model.adapter)
    step("capture on meta", began)

    ctx = PassContext(config=config, example_inputs=example, adapter=model.adapter, weight_only_betas=tuple(betas),
                      dump_dir=None if dump_ir is None else Path(dump_ir), verify_each=verify,
                      print_ir_after_change=print_ir_after_change)
    if ctx.dump_dir is not None:
        clear_unit_dumps(ctx.dump_dir)
    began = time.perf_counter()
    gm = run_passes(gm, ctx, svdquant_pipeline(["annotate_linears"]))
    step("annotate", began)
    passes = unit_passes(calibration, config.calib_propagation)

    units = unit_attributes(gm)
    resident = None
    if calibration == "activations":
        began = time.perf_counter()
        if calib_inputs is None:
            calib_inputs = model.adapter.calib_inputs(model.module, config.calib_prompts, config.calib_steps,
                                                      seed=input_seed, tokens=tokens)
            source = f"adapter {model.adapter.name} ({config.calib_prompts} prompts x {config.calib_steps} steps)"
        elif isinstance(calib_inputs, CalibrationSet):
            # checked against the meta model (class, config fingerprint) and shaped like the example inputs, as
            # the in-memory compile conforms it to the loaded model
            calib_inputs = calib_inputs.conformed(model.module, example)
            source = calib_inputs.source
        else:
            source = "calib_inputs"
        ctx.block_runner = BlockRunner(gm, config, calib_inputs, memory_budget=memory_budget,
                                       source=f"{source}, block by block ({config.calib_propagation} propagation)")
        # The rest of the model runs before the blocks (embeddings) and after them (output head): its weights
        # are read first and stay resident, and it is compiled last, once every block has run.
        resident = REST_UNIT
        rest_record = UnitRecord(REST_UNIT)
        load_unit(gm, units[REST_UNIT], checkpoint, rest_record)
        rest_record.wall_s["read"] = round(time.perf_counter() - began, 3)
        blocks = sorted((unit for unit in units if unit != REST_UNIT), key=ctx.block_runner.last_segment)
        units = {unit: units[unit] for unit in blocks + [REST_UNIT]}  # in the order the graph runs them
        step("calibration inputs", began)
    records: list[UnitRecord] = []
    pass_stats: dict[str, list] = {}
    layers: list[dict[str, Any]] = []
    began = time.perf_counter()
    with StreamingArchive(out) as archive, _closing(ctx.block_runner):
        for index, (unit, targets) in enumerate(units.items()):
            record = UnitRecord(unit)
            unit_start = time.perf_counter()
            if unit == resident:
                record = rest_record  # read before the blocks ran
            else:
                load_unit(gm, targets, checkpoint, record)
                record.wall_s["read"] = round(time.perf_counter() - unit_start, 3)
            with VisibleUnit(gm, unit):
                layers += run_unit(gm, ctx, passes, record, pass_stats, index)
            write_start = time.perf_counter()
            flush_unit(gm, archive, record, None if unit == resident else resident)
            release_freed_memory()
            record.wall_s["write"] = round(time.perf_counter() - write_start, 3)
            record.rss_bytes = current_rss_bytes()
            record.wall_s["total"] = round(time.perf_counter() - unit_start, 3)
            records.append(record)
            if on_unit is not None:
                on_unit(record, index, len(units))
        step("compile and write units", began)

        began = time.perf_counter()
        gm.recompile()
        program = program_from_graph(gm)
        step("program from graph", began)

        began = time.perf_counter()
        for name, entries in pass_stats.items():
            ctx.records.append({"name": name, "modified": True,
                                "wall_s": round(sum(r.wall_s.get(name, 0.0) for r in records), 3),
                                "stats": summed_stats(entries)})
        gm.meta[LAYERS_META] = {"layers": layers, "totals": layer_totals(
            layers, config, parameter_bytes(model.module), parameter_bytes(gm))}  # sizes only: meta tensors count
        report = compile_report(gm, config, ctx.records)
        report["streaming"] = {
            "calibration": calibration, "betas": list(betas) if calibration == "weight-only" else None,
            "block_calibration": None if ctx.block_runner is None else {
                "source": ctx.block_runner.source, "propagation": config.calib_propagation,
                **spill_summary(ctx.block_runner)},
            "checkpoint_bytes": checkpoint.total_bytes, "dtype": str(dtype).removeprefix("torch."),
            "units": [record.__dict__ for record in records], "steps_s": steps,
        }
        gm.meta[REPORT_META] = report
        path = archive.finish(program, extra_files(gm))
        step("finish archive", began)
    report["streaming"]["wall_s"] = round(time.perf_counter() - start, 2)
    report["streaming"]["peak_rss_bytes"] = peak_rss_bytes()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    report["streaming"]["cpu_s"] = round(usage.ru_utime + usage.ru_stime, 1)  # what the load average cannot skew
    output_bytes = report["streaming"]["output_bytes"] = path.stat().st_size
    report["streaming"]["size_ratio"] = round(checkpoint.total_bytes / output_bytes, 3)
    return report

