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

import torch
import torch.fx

from svdq_compiler.calibration import Calibration
from svdq_compiler.config import QuantConfig
from svdq_compiler.errors import InputError
from svdq_compiler.files import ensure_dir, write_json, write_text
from svdq_compiler.ir import format_ir, to_jsonable
from svdq_compiler.quant import QTensor

log = logging.getLogger("svdq_compiler")


@dataclass
class PassResult:
    gm: torch.fx.GraphModule
    modified: bool
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class PassContext:
    """What passes share besides the graph: the config, inputs, the data passes hand each other (typed fields,
    each written by one pass) and output options."""

    config: QuantConfig
    example_inputs: tuple | dict = ()
    calib_inputs: Iterable[tuple | dict] | None = None
    calib_stats: Calibration | None = None  # from an earlier compile: calibrate reuses it
    adapter: Any = None  # the model adapter, when the model has one (roles, calibration inputs)
    model: Any = None  # the eager module that was captured (the adapter builds calibration inputs from it)
    # ---- data between passes ------------------------------------------------------------------------------
    calibration: Calibration | None = None  # calibrate → smooth, lowrank, quantize_weights
    block_runner: Any = None  # the streaming compile's blockwise.BlockRunner: calibrate_blocks reads it
    quantized: dict[str, QTensor] = field(default_factory=dict)  # quantize_weights → lower: weight target → QTensor
    # import_weights → lower: a checkpoint's packed tensors by the attribute lower gives them (<layer>.qweight,
    # .wscales, .wtscale, .shifted_bias), so no unused buffer sits on the graph between the two passes
    imported: dict[str, torch.Tensor] = field(default_factory=dict)
    weight_only_betas: tuple[float, ...] = ()  # smooth_weight_only's β candidates (the streaming compile sets them)
    available: set[str] = field(default_factory=set)  # the DATA names the passes run so far produced
    stage_ops: set = field(default_factory=set)  # the ops the passes run so far may have introduced
    # ---- output options -----------------------------------------------------------------------------------
    dump_dir: Path | None = None
    print_ir_after_change: bool = False
    verify_each: bool = False
    show_progress: bool = False
    out: TextIO = field(default_factory=lambda: sys.stdout)  # the stream at construction, not at import
    records: list[dict[str, Any]] = field(default_factory=list)

    def progress(self, iterable: Iterable, desc: str, total: int | None = None) -> Iterable:
        """Wrap a long loop in a progress bar when progress display is on."""
        if not self.show_progress or total == 0:
            return iterable
        from tqdm import tqdm

        return tqdm(iterable, desc=desc, total=total, file=sys.stderr, leave=False)


PassFn = Callable[[torch.fx.GraphModule, PassContext], PassResult]
# A contract: the problems it finds in the graph (and context) after its pass; empty when the contract holds.
Check = Callable[[torch.fx.GraphModule, PassContext], list[str]]

# What `requires` and `produces` name: the data passes hand each other.
DATA = {
    "linears": "LinearInfo annotations with roles, groups and schemes (node.meta)",
    "calibration": "ctx.calibration: per-site channel ranges and row samples",
    "smoothed": "λ folded into the weights, x/λ in the graph",
    "branches": "low-rank branches, weights hold the residual",
    "quantized": "quantized weights: ctx.quantized QTensors, or ctx.imported packed tensors (imports)",
    "lowered": "reference svdq ops in place of the quantized linears",
    "fused": "generated-kernel ops in place of lowered chains",
}


def _no_problems(gm: torch.fx.GraphModule, ctx: PassContext) -> list[str]:
    return []


@dataclass(frozen=True)
class Pass:
    name: str
    fn: PassFn
    requires: tuple[str, ...]  # DATA names that must be available before it runs
    produces: tuple[str, ...]  # DATA names it makes available
    summary: str  # one line: what holds after it
    ensures: Check = _no_problems  # checked after the pass when verifying (verify_each)
    ops: frozenset = frozenset()  # the ops it may introduce: the stage allow-list grows by these

    def __call__(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        return self.fn(gm, ctx)


PASS_REGISTRY: dict[str, Pass] = {}


def register_pass(name: str, *, summary: str, requires: Sequence[str] = (), produces: Sequence[str] = (),
                  ensures: Check = _no_problems, ops: Iterable = ()) -> Callable[[PassFn], Pass]:
    unknown = sorted((set(requires) | set(produces)) - set(DATA))
    if unknown:
        raise ValueError(f"pass {name!r} names unknown data {unknown}; known: {sorted(DATA)}")

    def wrap(fn: PassFn) -> Pass:
        registered = make_pass(name, fn, summary=summary, requires=requires, produces=produces, ensures=ensures,
                               ops=ops)
        PASS_REGISTRY[name] = registered
        return registered

    return wrap


def make_pass(name: str, fn: PassFn, *, summary: str, requires: Sequence[str] = (), produces: Sequence[str] = (),
              ensures: Check = _no_problems, ops: Iterable = ()) -> Pass:
    """A Pass outside the registry: a step that only one driver runs (an import, a streamed unit's compression)."""
    return Pass(name=name, fn=fn, requires=tuple(requires), produces=tuple(produces), summary=summary,
                ensures=ensures, ops=frozenset(ops))


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
    return [PASS_REGISTRY[name] for name in selected]


def _load_passes() -> None:
    import svdq_compiler.passes  # noqa: F401  (registers every pass)


def run_passes(gm: torch.fx.GraphModule, ctx: PassContext, passes: Sequence[Pass], *,
               start: str = "capture") -> torch.fx.GraphModule:
    """Run `passes` in order with timing, statistics, requirement checks, optional verification (the IR's
    invariants, the ops allowed at this stage and each pass's own contract), dumps and IR printing. `start`
    names the graph as it comes in (dumped as 000_<start>): the capture, or a later stage a driver resumes from."""
    verifying = ctx.verify_each
    if verifying:
        _verify(gm, ctx, None, start)  # the incoming graph itself, so a failure after pass N is pass N's
    dumped_kernels: set[str] = set()  # fused nodes whose kernels a dump already holds (or the incoming graph had)
    if ctx.dump_dir is not None:
        from svdq_compiler.codegen.sources import fused_nodes

        _prepare_dump_dir(ctx.dump_dir)
        dumped_kernels.update(node.name for node in fused_nodes(gm))
        _dump(ctx, 0, start, gm, {"name": start, "modified": True, "stats": {}}, dumped_kernels)
    for index, p in enumerate(ctx.progress(passes, "passes", total=len(passes)), start=1):
        missing = [r for r in p.requires if r not in ctx.available]
        if missing:
            producers = sorted({q.name for q in PASS_REGISTRY.values() if set(q.produces) & set(missing)})
            raise InputError(f"pass {p.name!r} reads {missing}, which no earlier pass produced",
                             fix=f"run {', '.join(producers) or 'the passes that produce it'} first "
                                 f"(add them to --passes, or run the whole pipeline)")
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
        ctx.available.update(p.produces)
        ctx.stage_ops.update(p.ops)
        log.info("pass %s: modified=%s %.2fs %s", p.name, result.modified, wall, result.stats)
        if verifying and p.name != "verify":
            _verify(gm, ctx, p, start)
        if ctx.dump_dir is not None:
            _dump(ctx, index, p.name, gm, record, dumped_kernels)
        if ctx.print_ir_after_change and result.modified:
            print(f"// ----- IR after {p.name} -----", file=ctx.out)
            print(format_ir(gm), file=ctx.out)
    return gm


def _verify(gm: torch.fx.GraphModule, ctx: PassContext, after: Pass | None, start: str) -> None:
    """The IR's invariants with the ops allowed once the passes run so far, then `after`'s own contract."""
    from svdq_compiler.passes.verify import check

    check(gm, ctx.stage_ops, [] if after is None else after.ensures(gm, ctx),
          stage=f"after {after.name}" if after is not None else f"at {start}")


def _prepare_dump_dir(path: Path) -> None:
    ensure_dir(path, "IR dump folder (--dump-ir)")
    remove_dumps(path)


def remove_dumps(path: Path) -> None:
    """Remove the NNN_<pass> dumps an earlier run left in `path` (and nothing else of the folder)."""
    for stale in list(path.glob("[0-9][0-9][0-9]_*.py")) + list(path.glob("[0-9][0-9][0-9]_*.stats.json")):
        stale.unlink()


def _dump(ctx: PassContext, index: int, name: str, gm: torch.fx.GraphModule, record: dict[str, Any],
          dumped_kernels: set[str]) -> None:
    """NNN_<name>.py (the IR), .stats.json (the pass's record) and .kernels.py (the kernels of the fused nodes no
    earlier dump holds)."""
    assert ctx.dump_dir is not None
    stem = ctx.dump_dir / f"{index:03d}_{name}"
    write_text(f"{stem}.py", format_ir(gm), "IR dump")
    write_json(f"{stem}.stats.json", record, "IR dump")
    if record.get("modified"):
        from svdq_compiler.codegen.sources import fused_nodes, kernel_sources

        new = [node for node in fused_nodes(gm) if node.name not in dumped_kernels]
        if new:
            text = "\n".join(f"# ===== {k.node}: {k.spec.name} =====\n{k.source}" for k in kernel_sources(gm, nodes=new))
            write_text(f"{stem}.kernels.py", text, "IR dump")
            dumped_kernels.update(node.name for node in new)
