"""Pass infrastructure: PassResult, the pass registry, the context passes share, and the pipeline itself.

A pass is a function `(gm, ctx) -> PassResult` registered with `@register_pass(name, requires=…, ensures=…)`;
its docstring says what it needs and what it guarantees. `run_passes` times each pass, records its statistics,
optionally verifies the IR between passes, dumps `NNN_<pass>.py` / `NNN_<pass>.stats.json`, and prints the IR
after the passes that changed it.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence, TextIO

import torch.fx

from svdq_compiler.config import QuantConfig
from svdq_compiler.errors import InputError
from svdq_compiler.files import ensure_dir, write_json, write_text
from svdq_compiler.ir import format_ir, to_jsonable

log = logging.getLogger("svdq_compiler")


@dataclass
class PassResult:
    gm: torch.fx.GraphModule
    modified: bool
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class PassContext:
    """What passes share besides the graph: the config, inputs, cross-pass state and output options."""

    config: QuantConfig
    example_inputs: tuple | dict = ()
    calib_inputs: Iterable[tuple | dict] | None = None
    calib_stats: Any = None  # a passes.calibrate.Calibration from an earlier compile: calibrate reuses it
    adapter: Any = None  # the model adapter, when the model has one (roles, calibration inputs)
    model: Any = None  # the eager module that was captured (the adapter builds calibration inputs from it)
    state: dict[str, Any] = field(default_factory=dict)  # cross-pass data, e.g. calibration statistics
    dump_dir: Path | None = None
    print_ir_after_change: bool = False
    verify_each: bool = False
    show_progress: bool = False
    out: TextIO = sys.stdout
    records: list[dict[str, Any]] = field(default_factory=list)

    def progress(self, iterable: Iterable, desc: str, total: int | None = None) -> Iterable:
        """Wrap a long loop in a progress bar when progress display is on."""
        if not self.show_progress or total == 0:
            return iterable
        from tqdm import tqdm

        return tqdm(iterable, desc=desc, total=total, file=sys.stderr, leave=False)


PassFn = Callable[[torch.fx.GraphModule, PassContext], PassResult]


@dataclass(frozen=True)
class Pass:
    name: str
    fn: PassFn
    requires: tuple[str, ...]  # passes that must have run before this one
    ensures: str  # one line: what holds after it

    def __call__(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        return self.fn(gm, ctx)


PASS_REGISTRY: dict[str, Pass] = {}


def register_pass(name: str, *, requires: Sequence[str] = (), ensures: str) -> Callable[[PassFn], Pass]:
    def wrap(fn: PassFn) -> Pass:
        registered = Pass(name=name, fn=fn, requires=tuple(requires), ensures=ensures)
        PASS_REGISTRY[name] = registered
        return registered

    return wrap


# The SVDQuant compilation, in order, each step with the reason it is there.
SVDQUANT_STEPS: tuple[tuple[str, str], ...] = (
    ("annotate_linears", "roles and smoothing groups come from the graph's structure, not module names"),
    ("calibrate", "the searches need per-channel activation ranges and sample rows"),
    ("smooth", "moving activation outliers into the weights makes 4-bit activations viable"),
    ("lowrank", "a 16-bit rank-r branch absorbs the weight outliers smoothing created"),
    ("quantize_weights", "only the small residual is quantized to 4 bits, then packed"),
    ("lower", "reference svdq ops make the graph runnable on any device"),
    ("fuse", "two generated kernels per linear hide the cost of the low-rank branch"),
)


def svdquant_pipeline(only: Sequence[str] | None = None) -> list[Pass]:
    """The passes of a compile: all SVDQUANT_STEPS, or the named subset (`--passes a,b,c`) in pipeline order."""
    _load_passes()
    known = [name for name, _ in SVDQUANT_STEPS] + ["verify"]
    if only is not None:
        unknown = [name for name in only if name not in known]
        if unknown:
            raise InputError(f"unknown pass(es) {unknown}", fix=f"choose from: {', '.join(known)}")
    selected = [name for name in known if (only is None and name != "verify") or (only and name in only)]
    # Until a step has an implementation it is left out, so a compile runs capture and the passes that exist; so
    # is a step of the default pipeline whose required passes do not exist yet (fuse before lower lands).
    chosen = [PASS_REGISTRY[name] for name in selected if name in PASS_REGISTRY]
    if only is None:
        chosen = [p for p in chosen if all(r in PASS_REGISTRY for r in p.requires)]
    return chosen


def _load_passes() -> None:
    import svdq_compiler.passes  # noqa: F401  (registers every pass)


def run_passes(gm: torch.fx.GraphModule, ctx: PassContext, passes: Sequence[Pass]) -> torch.fx.GraphModule:
    """Run `passes` in order with timing, statistics, optional verification, dumps and IR printing."""
    verify = PASS_REGISTRY.get("verify") if ctx.verify_each else None
    if verify is not None:
        verify(gm, ctx)  # the captured graph itself, so a failure after pass N is pass N's
    if ctx.dump_dir is not None:
        _prepare_dump_dir(ctx.dump_dir)
        _dump(ctx, 0, "capture", gm, {"name": "capture", "modified": True, "stats": {}})
    done = {record["name"] for record in ctx.records}
    for index, p in enumerate(ctx.progress(passes, "passes", total=len(passes)), start=1):
        missing = [r for r in p.requires if r not in done]
        if missing:
            raise InputError(f"pass {p.name!r} requires {missing} to run first",
                             fix="add them to --passes or run the whole pipeline")
        start, cpu_start = time.perf_counter(), time.process_time()
        result = p(gm, ctx)
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        gm = result.gm
        if result.modified:
            gm.recompile()
        record = {"name": p.name, "modified": result.modified, "wall_s": round(wall, 4),
                  "cpu_s": round(cpu, 4),  # on a shared machine, this process's own CPU time
                  "stats": to_jsonable(result.stats)}
        ctx.records.append(record)
        done.add(p.name)
        log.info("pass %s: modified=%s %.2fs %s", p.name, result.modified, wall, result.stats)
        if verify is not None and p.name != "verify":
            verify(gm, ctx)
        if ctx.dump_dir is not None:
            _dump(ctx, index, p.name, gm, record)
        if ctx.print_ir_after_change and result.modified:
            print(f"// ----- IR after {p.name} -----", file=ctx.out)
            print(format_ir(gm), file=ctx.out)
    return gm


def _prepare_dump_dir(path: Path) -> None:
    ensure_dir(path, "IR dump folder (--dump-ir)")
    for stale in list(path.glob("[0-9][0-9][0-9]_*.py")) + list(path.glob("[0-9][0-9][0-9]_*.stats.json")):
        stale.unlink()


def _dump(ctx: PassContext, index: int, name: str, gm: torch.fx.GraphModule, record: dict[str, Any]) -> None:
    assert ctx.dump_dir is not None
    stem = ctx.dump_dir / f"{index:03d}_{name}"
    write_text(f"{stem}.py", format_ir(gm), "IR dump")
    write_json(f"{stem}.stats.json", record, "IR dump")
    if record.get("modified"):
        from svdq_compiler.codegen.sources import kernel_sources

        kernels = kernel_sources(gm)
        if kernels:
            text = "\n".join(f"# ===== {k.node}: {k.spec.name} =====\n{k.source}" for k in kernels)
            write_text(f"{stem}.kernels.py", text, "IR dump")
