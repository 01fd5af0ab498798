"""Capture: torch.export (non-strict) → ATen-level GraphModule with parameters as attributes.

Dimensions that change between calls (batch, token counts, latent height and width) are declared with
`DynDim`s, by the model's adapter or by the user (torch `Dim`s are accepted too); a diffusers model's inputs that
no adapter can rebuild get torch.export's automatic dimensions (`export_automatic`). When the model's code
specializes a declared dimension, torch.export refuses the capture and suggests a fix; capture applies it
(static size, narrower range, or steps of a multiple), tries again, and records what fell back and why. The
result carries a capture report in `gm.meta["svdq_capture"]` and a pre-hook that rejects inputs the graph cannot
serve with an error naming the input, the dimension and the reason (or the guard torch.export recorded).
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import json
import re
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Any, Container, Iterator

import torch
import torch.fx

from svdq_compiler.errors import CaptureError, InputError, ShapeError, SvdqError, first_line
from svdq_compiler.ir import CAPTURE_META, INPUTS_META, split_inputs
from svdq_compiler.models import ModelAdapter, adapter_for
from svdq_compiler.models.base import DynDim

MAX_EXPORT_ATTEMPTS = 6
UNBOUNDED = 2**31 - 1  # a torch Dim without an upper bound


def export_program(module: torch.nn.Module, args: tuple, kwargs: dict, dynamic_shapes: Any
                   ) -> torch.export.ExportedProgram:
    """torch.export (non-strict, no autograd) with the fake-tensor dispatch cache off, for this export and for
    the passes that infer fake values in its mode later. With symbolic sizes a cache hit rebuilds each output
    through SymInt arithmetic (Python callbacks from C++), which costs more than running the op's meta function
    again: a repeated dynamic capture of outlier-flux took 5.0 → 3.0 CPU-s, tiny-flux 5.1 → 3.6, MiniLM 0.6 →
    0.7; a process's first one about 15% less (warm-up dominates)."""
    import torch._dynamo.config

    with torch.no_grad(), torch._dynamo.config.patch(fake_tensor_cache_enabled=False):
        return torch.export.export(module, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False)


# ---- input trees ------------------------------------------------------------------------------------------

def walk(tree: Any, path: tuple = ()) -> Iterator[tuple[tuple, Any]]:
    """(path, leaf) for every leaf of nested dicts, lists and tuples."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from walk(value, path + (key,))
    elif isinstance(tree, (list, tuple)):
        for index, value in enumerate(tree):
            yield from walk(value, path + (index,))
    else:
        yield path, tree


def path_name(path: tuple) -> str:
    """`hidden_states`, `added_cond_kwargs.text_embeds`, `args[0]`."""
    if not path:
        return "input"
    head, rest = path[0], path[1:]
    text = f"args[{head}]" if isinstance(head, int) else str(head)
    for key in rest:
        text += f"[{key}]" if isinstance(key, int) else f".{key}"
    return text


# What torch.export takes as an input besides tensors: a value the graph holds as a constant.
PLAIN_VALUES = (type(None), bool, int, float, str, torch.dtype, torch.device)


def opaque_inputs(example_inputs: tuple | dict) -> list[str]:
    """"name (type)" of each input holding an object that is neither a tensor, a plain value nor a container
    torch's pytree knows (a key-value cache object): torch.export refuses such an input, whatever the model does
    with it."""
    args, kwargs = split_inputs(example_inputs)
    named = {**{f"args[{i}]": value for i, value in enumerate(args)}, **kwargs}
    found = []
    for name, value in named.items():
        kinds = [type(leaf).__name__ for leaf in torch.utils._pytree.tree_leaves(value)
                 if not isinstance(leaf, (torch.Tensor, *PLAIN_VALUES))]
        if kinds:
            found.append(f"{name} ({kinds[0]})")
    return found


# ---- declared dimensions ----------------------------------------------------------------------------------

@dataclass
class CapturedDim:
    """One declared dimension of one input, as captured."""

    input: str
    index: int
    size: int  # in the example inputs
    status: str  # "dynamic", "static" (fell back) or "auto" (torch.export decides)
    name: str | None = None
    label: str = ""
    min: int | None = None
    max: int | None = None
    multiple: int = 1
    reason: str | None = None
    why_dynamic: str | None = None  # how an inferred dimension was found to vary (models/auto.py)

    def where(self) -> str:
        return f"{self.input} dim {self.index}" + (f" ({self.label})" if self.label else "")

    def dyn(self) -> DynDim:
        return DynDim(self.name, self.min, self.max, self.multiple, self.label)


def to_dyn(dim: Any, where: str) -> Any:
    """A DynDim from a DynDim or a torch Dim; torch's Dim.AUTO/STATIC/DYNAMIC hints pass through."""
    from torch.export.dynamic_shapes import _DimHint

    if isinstance(dim, DynDim) or isinstance(dim, _DimHint):
        return dim
    root = getattr(dim, "root", None)
    if isinstance(dim, torch.export.Dim) and root is None:
        return DynDim(dim.__name__, max(1, int(dim.min)), _upper_bound(dim.max))
    if root is not None:
        offset, multiple = int(dim.fn(0)), int(dim.fn(1)) - int(dim.fn(0))
        if offset == 0 and multiple >= 1 and int(dim.fn(2)) == 2 * multiple:
            return DynDim(root.__name__, max(1, int(root.min)), _upper_bound(root.max), multiple)
    raise InputError(f"unsupported dynamic dimension {dim!r} for {where}",
                     fix="use DynDim(name, min, max, multiple) or a torch Dim, or k*Dim for a multiple")


def _upper_bound(value: Any) -> int:
    """A torch Dim's max as an int: UNBOUNDED for a Dim declared without one (torch's int_oo)."""
    return UNBOUNDED if value is None or float(value) >= UNBOUNDED else int(value)


def declared_dims(spec: Any, inputs: Any, path: tuple = ()) -> list[tuple[tuple, int, Any]]:
    """[(input path, dim index, DynDim or torch hint)] from a dynamic_shapes tree that mirrors the inputs."""
    if spec is None:
        return []
    where = path_name(path)
    if isinstance(inputs, torch.Tensor):
        if isinstance(spec, dict):
            items = spec.items()
        elif isinstance(spec, (list, tuple)):
            items = enumerate(spec)
        else:
            raise InputError(f"dynamic_shapes for {where} must be {{dim index: Dim}} or a per-dimension list")
        found = []
        for index, dim in items:
            if dim is None or isinstance(dim, int):
                continue
            if not 0 <= int(index) < inputs.dim():
                raise InputError(f"dynamic_shapes names dim {index} of {where}, which has {inputs.dim()} dims")
            found.append((path, int(index), to_dyn(dim, f"{where} dim {index}")))
        return found
    if isinstance(inputs, dict):
        if not isinstance(spec, dict):
            raise InputError(f"dynamic_shapes for {where} must be a dict mirroring the inputs")
        unknown = sorted(set(spec) - set(inputs))
        if unknown:
            raise InputError(f"dynamic_shapes names inputs that are not given: {unknown}",
                             fix=f"the inputs are: {', '.join(map(str, inputs))}")
        return [found for key in inputs for found in declared_dims(spec.get(key), inputs[key], path + (key,))]
    if isinstance(inputs, (list, tuple)):
        if not isinstance(spec, (list, tuple)) or len(spec) != len(inputs):
            raise InputError(f"dynamic_shapes for {where} must be a list or tuple of {len(inputs)} entries")
        return [found for i, (s, x) in enumerate(zip(spec, inputs)) for found in declared_dims(s, x, path + (i,))]
    return []


def torch_dynamic_shapes(inputs: Any, dims: dict[tuple[tuple, int], Any], unproven: Container[str] = ()
                         ) -> Any:
    """The torch.export dynamic_shapes tree for `inputs` with the given {(path, index): DynDim or hint}; the
    dimensions named in `unproven` become Dim.DYNAMIC hints over their range, under which torch.export keeps a
    guard it cannot prove over the range instead of refusing the capture."""
    roots: dict[str, torch.export.Dim] = {}

    def to_torch(dim: Any) -> Any:
        if not isinstance(dim, DynDim):
            return dim
        if dim.name in unproven:
            return torch.export.Dim.DYNAMIC(min=dim.min, max=dim.max if dim.max < UNBOUNDED else None)
        root = roots.get(dim.name)
        if root is None:
            bounds = {"min": dim.min} | ({"max": dim.max} if dim.max < UNBOUNDED else {})
            root = roots[dim.name] = torch.export.Dim(dim.name, **bounds)
        elif (root.min, root.max) != (dim.min, dim.max if dim.max < UNBOUNDED else root.max):
            raise InputError(f"dynamic dimension {dim.name!r} is declared with two different ranges",
                             fix="give every use of one dimension name the same min and max")
        return root if dim.multiple == 1 else dim.multiple * root

    def mirror(tree: Any, path: tuple) -> Any:
        if isinstance(tree, torch.Tensor):
            entry = {index: to_torch(dims[(path, index)]) for index in range(tree.dim()) if (path, index) in dims}
            return entry or None
        if isinstance(tree, dict):
            return {key: mirror(value, path + (key,)) for key, value in tree.items()}
        if isinstance(tree, (list, tuple)):
            return type(tree)(mirror(value, path + (i,)) for i, value in enumerate(tree))
        return None

    return mirror(inputs, ())


# ---- torch.export's constraint violations -----------------------------------------------------------------

_VIOLATED = re.compile(r"Constraints violated \(([^)]*)\)")
# A dimension declared as a multiple (DynDim.multiple) reaches torch as `8*t`: violating it violates `t`.
_MULTIPLE_OF = re.compile(r"^\d+\*(\w+)$")
_FIX = re.compile(r"^\s*(\w+) = (.+?)\s*$")
_RANGE = re.compile(r"^Dim\('(\w+)'(?:, min=(\d+))?(?:, max=(\d+))?\)$")
# torch.export's fix for a size the code needs divisible by k (`x.unflatten(1, (-1, 2))`): `tokens = 2*_tokens`.
_MULTIPLE_FIX = re.compile(r"^(\d+)\*(\w+)$")


def constraint_violation(exc: BaseException) -> str | None:
    """The message of a torch.export dynamic-shape constraint violation, or None for other errors."""
    from torch._dynamo.exc import UserError, UserErrorType

    if isinstance(exc, UserError) and exc.error_type == UserErrorType.CONSTRAINT_VIOLATION:
        return str(exc)
    return None


def parse_violation(message: str) -> tuple[list[str], dict[str, str], dict[str, str]]:
    """(violated dimension names, {name: torch's explanation}, {name: torch's suggested fix})."""
    match = _VIOLATED.search(message)
    violated = [n.strip() for n in match.group(1).split(",")] if match else []
    bullets = [line.strip()[2:] for line in message.splitlines() if line.strip().startswith("- ")]
    names, reasons = [], {}
    for expression in violated:
        multiple = _MULTIPLE_OF.match(expression)
        name = multiple.group(1) if multiple else expression
        if name in names:
            continue
        names.append(name)
        bullet = next((b for b in bullets if re.search(rf"(?<![\w*]){re.escape(expression)}\b", b)), None)
        if bullet:
            reasons[name] = bullet.split(". ")[0].rstrip(".")
    fixes = {}
    if "Suggested fixes:" in message:
        for line in message.split("Suggested fixes:", 1)[1].splitlines():
            fix = _FIX.match(line)
            if fix:
                fixes[fix.group(1)] = fix.group(2)
            elif line.strip() == "" and fixes:
                break
    return names, reasons, fixes


# ---- capture ----------------------------------------------------------------------------------------------

def decompose(program: torch.export.ExportedProgram, table: dict) -> torch.export.ExportedProgram:
    """`program.run_decompositions(table)`, without the FutureWarning torch's own deep copy of the module call
    graph raises there ("`isinstance(treespec, LeafSpec)` is deprecated"): nothing the user can act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                                category=FutureWarning)
        return program.run_decompositions(table)


def mutates(program: torch.export.ExportedProgram) -> bool:
    """Whether the exported graph changes a tensor in place (an operator whose schema mutates an argument)."""
    return any(node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload)
               and node.target._schema.is_mutable for node in program.graph.nodes)


def capture(module: torch.nn.Module, example_inputs: tuple | dict, *, dynamic_shapes: Any = "auto",
            adapter: ModelAdapter | None = None) -> torch.fx.GraphModule:
    """Export `module` on `example_inputs` and return the ATen-level GraphModule (parameters as attributes).

    dynamic_shapes: "auto" takes the dimensions the model's adapter declares (none for an unknown module);
    None captures every dimension static; otherwise a tree mirroring the inputs with {dim index: DynDim or
    torch Dim} per tensor.
    """
    start = time.perf_counter()
    args, kwargs = split_inputs(example_inputs)
    inputs: Any = list(args) if args else kwargs
    adapter = adapter or adapter_for(module)
    module = module.eval()
    relax_reason = None
    automatic = None  # why torch.export's automatic dimensions were tried, and how that went
    program = None
    if isinstance(dynamic_shapes, str):
        if dynamic_shapes != "auto":
            raise InputError(f"dynamic_shapes={dynamic_shapes!r} is not understood",
                             fix='use "auto", None, or a tree of {dim: DynDim} mirroring the inputs')
        dynamic_shapes = adapter.dynamic_shapes(module, kwargs) if kwargs and not args else None
        relax_reason = adapter.guard_relaxation(module, kwargs) if dynamic_shapes is not None else None
        if dynamic_shapes is None and kwargs and not args and adapter.automatic_dims_for_own_inputs:
            program, automatic = export_automatic(module, kwargs)
    examples = {path: leaf for path, leaf in walk(inputs) if isinstance(leaf, torch.Tensor)}
    fallbacks: dict[str, str] = {}  # dimension name → why it is static
    narrowed: dict[str, str] = {}  # dimension name → why its range is narrower than declared
    if program is not None:
        attempts, dims = 1, automatic_dims(program, kwargs)
    else:
        attempts, program, dims = export_declared(module, args, kwargs, dynamic_shapes, examples, fallbacks,
                                                  narrowed)
    # torch.export's own IR (ATen, linear/layer_norm/SDPA kept whole) is what the passes read, once it has no
    # in-place op (it keeps `x += y` as aten.add_); the re-trace to the functional inference IR took 60% of
    # tiny-flux's capture (17.3 → 6.5 s without it, the compiled graph's output the same to the bit) and
    # otherwise only respells ops the passes treat alike (reshape → view, dropout → clone, to → _to_copy).
    if mutates(program):
        program = decompose(program, {})
    gm = unlift(program, check_guards=relax_reason is None)
    for name, guard in pinned_by_guards(gm, args, kwargs, dims, examples, fallbacks).items():
        fallbacks[name] = f"torch.export's guard `{guard}` pins it (the model's code takes a branch that only " \
                          f"holds at this size)"
    for parameter in gm.parameters():
        parameter.requires_grad_(False)
    report_dims = [captured_dim(path, index, dim, examples[path], fallbacks, narrowed)
                   for (path, index), dim in dims.items()]
    gm.meta[CAPTURE_META] = {
        "module_class": type(module).__name__,
        "adapter": adapter.name,
        # the model's own config (diffusers models): what a checkpoint exported from the graph must describe
        "model_config": model_config(module),
        "positional": bool(args),
        "inputs": [{"path": path_name(path), "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
                   for path, t in examples.items()],
        "dims": [dataclasses.asdict(d) for d in report_dims],
        "relaxed_guards": None if relax_reason is None else {
            "reason": relax_reason, "dropped": list(getattr(program, "_guards_code", []))},
        "export_attempts": attempts,
        "automatic_dims": automatic,
        "wall_s": round(time.perf_counter() - start, 3),
    }
    gm.meta[INPUTS_META] = example_inputs
    install_shape_check(gm)
    return gm


def export_declared(module: torch.nn.Module, args: tuple, kwargs: dict, dynamic_shapes: Any,
                    examples: dict[tuple, torch.Tensor], fallbacks: dict[str, str], narrowed: dict[str, str]
                    ) -> tuple[int, torch.export.ExportedProgram, dict[tuple[tuple, int], Any]]:
    """(attempts, program, dims) of exporting with the declared dimensions, applying torch.export's suggested
    fixes (into `fallbacks` and `narrowed`) until it accepts them."""
    inputs: Any = list(args) if args else kwargs
    dims = {(path, index): dim for path, index, dim in declared_dims(dynamic_shapes, inputs)}
    check_examples(dims, examples, fallbacks)
    unproven: dict[str, str] = {}  # dimension name → the guard torch.export could not prove over its range
    attempts = 0
    while True:
        attempts += 1
        live = {key: dim for key, dim in dims.items() if not (isinstance(dim, DynDim) and dim.name in fallbacks)}
        spec = torch_dynamic_shapes(inputs, live, unproven) if live else None
        if isinstance(inputs, list) and spec is not None:
            spec = tuple(spec)
        try:
            program = export_program(module, args, kwargs, spec)
            break
        except Exception as exc:  # torch.export raises many types; violations are retried, the rest reported
            message = constraint_violation(exc)
            if message is None or attempts >= MAX_EXPORT_ATTEMPTS or not apply_fixes(message, dims, fallbacks,
                                                                                     narrowed, unproven):
                raise CaptureError(f"torch.export could not capture {type(module).__name__}: {first_line(exc)}",
                                   fix="check that the example inputs match forward(); capture with "
                                       "dynamic_shapes=None for a static graph; rerun with TORCH_LOGS=+dynamic "
                                       "for torch's full explanation") from exc
    for name, size in specialized_while_tracing(program, args, kwargs, dims).items():
        fallbacks.setdefault(name, f"torch.export specialized it to {size} while tracing: the model's code "
                                   f"depends on its exact value")
    for name, reason in unproven.items():
        narrowed.setdefault(name, f"{reason}: torch.export could not prove it over the range, so each call checks "
                                  "it (the capture's probes found it holding)")
    return attempts, program, dims


# ---- torch.export's automatic dimensions, for inputs no adapter can rebuild ---------------------------------

AUTOMATIC_WHY = "torch.export's automatic dimensions: the model's code does not fix this size"


def export_automatic(module: torch.nn.Module, kwargs: dict) -> tuple[torch.export.ExportedProgram | None, dict]:
    """(program, what happened) of exporting with Dim.AUTO on every tensor dimension of size 2 or more: the
    dimensions the model's code does not pin stay symbolic. The inputs are the user's own, so no adapter could
    rebuild them at another size to find their dimensions; without this the graph would be static and refuse
    every second resolution. A failed export returns None, and the capture goes on static."""
    every = {(path, index): torch.export.Dim.AUTO for path, leaf in walk(kwargs) if isinstance(leaf, torch.Tensor)
             for index, size in enumerate(leaf.shape) if size >= 2}
    reason = f"{type(module).__name__}'s adapter cannot rebuild these inputs at another size"
    try:
        program = export_program(module, (), kwargs, torch_dynamic_shapes(kwargs, every))
    except Exception as exc:  # whatever torch.export raises, the static capture is still worth trying
        return None, {"reason": reason, "failed": first_line(exc)[:300]}
    return program, {"reason": reason, "failed": None}


def automatic_dims(program: torch.export.ExportedProgram, kwargs: dict) -> dict[tuple[tuple, int], DynDim]:
    """{(input path, index): DynDim} of the input dimensions that came out symbolic. Dimensions sharing a symbol
    share a name (the first input dimension that has it); one that is k·symbol is a multiple of it; any other
    expression (frames + 1) is a dimension of its own. Ranges are torch.export's."""
    ranges = {str(expr): bounds for expr, bounds in program.range_constraints.items()}
    names: dict[str, str] = {}
    dims = {}
    for path, shape in traced_shapes(program, (), kwargs):
        for index, size in enumerate(shape):
            if not isinstance(size, torch.SymInt):
                continue
            expr = size.node.expr
            coefficient, root = expr.as_coeff_Mul()
            multiple = int(coefficient) if root.is_Symbol and coefficient.is_Integer and coefficient > 0 else 1
            root = root if multiple > 1 else expr
            name = names.setdefault(str(root), re.sub(r"\W", "_", f"{path_name(path)}_{index}"))
            bounds = ranges.get(str(root))
            low, high = (2, UNBOUNDED) if bounds is None else (_finite(bounds.lower, 2),
                                                               _finite(bounds.upper, UNBOUNDED))
            dims[(path, index)] = DynDim(name, max(1, low), min(UNBOUNDED, high), multiple, why=AUTOMATIC_WHY)
    return dims


def _finite(bound: Any, otherwise: int) -> int:
    """A sympy range bound as an int; torch's int_oo (and −int_oo) as `otherwise`."""
    return int(bound) if bound.is_Integer else otherwise


def model_config(module: torch.nn.Module) -> dict[str, Any] | None:
    """A diffusers model's config as JSON-able values (None for other modules)."""
    config = getattr(module, "config", None)
    if config is None or not hasattr(config, "items"):
        return None
    return json.loads(json.dumps({k: v for k, v in config.items() if not k.startswith("_")}, default=list))


def check_examples(dims: dict[tuple[tuple, int], Any], examples: dict[tuple, torch.Tensor],
                   fallbacks: dict[str, str]) -> None:
    """Validate the example sizes of declared dimensions; sizes 0 and 1 fall back to static up front."""
    sizes: dict[str, tuple[int, str]] = {}
    for (path, index), dim in dims.items():
        if not isinstance(dim, DynDim):
            continue
        size = examples[path].shape[index]
        where = f"{path_name(path)} dim {index} ({dim.describe()})"
        if size <= 1:
            fallbacks.setdefault(dim.name, f"the example size is {size}, and torch.export specializes sizes 0 "
                                           f"and 1; capture with a larger example to make it dynamic")
            continue
        if not dim.allows(size):
            raise InputError(f"example input {where} is {size}, outside its declared range {dim.size_range()}",
                             fix="give example inputs inside the declared range")
        _bind_dimension(sizes, dim.name, size // dim.multiple, where, size, InputError, what="example input ")


def apply_fixes(message: str, dims: dict[tuple[tuple, int], Any], fallbacks: dict[str, str],
                narrowed: dict[str, str], unproven: dict[str, str]) -> bool:
    """Apply torch.export's suggested fixes to the declared dimensions; False when nothing could be done. A
    guard torch.export cannot prove over the range, with no fix offered (LongCat's `n <= max(2048, n)`, true for
    every n), moves the dimension to `unproven`, tried once more as Dim.DYNAMIC; the guard probes after export
    then say whether it pins the size."""
    names, reasons, fixes = parse_violation(message)
    known = {dim.name for dim in dims.values() if isinstance(dim, DynDim) and dim.name not in fallbacks}
    progress = False
    for name in names:
        if name not in known:
            continue
        reason = reasons.get(name, "the model's code specializes it")
        fix = fixes.get(name, "")
        bounds, multiple = _RANGE.match(fix), _MULTIPLE_FIX.match(fix)
        if bounds and bounds.group(1) == name:
            low, high = bounds.group(2), bounds.group(3)
            for key, dim in dims.items():
                if isinstance(dim, DynDim) and dim.name == name:
                    dims[key] = dataclasses.replace(dim, min=int(low) if low else dim.min,
                                                    max=int(high) if high else dim.max)
            narrowed[name] = reason
        elif multiple and int(multiple.group(1)) > 1:
            # the dimension's unit becomes k of its units (torch's new root `_name`, whose range it also gives)
            factor, unit = int(multiple.group(1)), _RANGE.match(fixes.get(multiple.group(2), ""))
            for key, dim in dims.items():
                if isinstance(dim, DynDim) and dim.name == name:
                    low = int(unit.group(2)) if unit and unit.group(2) else -(-dim.min // factor)
                    high = int(unit.group(3)) if unit and unit.group(3) else dim.max // factor
                    dims[key] = dataclasses.replace(dim, min=max(1, low), max=high, multiple=dim.multiple * factor)
            narrowed[name] = f"{reason} (so it runs in steps of {factor} of the declared ones)"
        elif reason.startswith("Not all values of") and not fix and name not in unproven and all(
                dim.multiple == 1 for dim in dims.values() if isinstance(dim, DynDim) and dim.name == name):
            unproven[name] = reason
        else:
            suggestion = f" (torch.export suggests {name} = {fix})" if fix and not fix.isdigit() else ""
            fallbacks[name] = reason + suggestion
        progress = True
    return progress


def traced_shapes(program: torch.export.ExportedProgram, args: tuple, kwargs: dict
                  ) -> Iterator[tuple[tuple, torch.Size]]:
    """(input path, traced shape) of each tensor input of `program`; a size torch.export kept symbolic is a
    SymInt."""
    flat, _ = torch.utils._pytree.tree_flatten_with_path((args, kwargs))
    placeholders = {node.name: node for node in program.graph.nodes if node.op == "placeholder"}
    for (keypath, _), name in zip(flat, program.graph_signature.user_inputs):
        value = placeholders[name].meta.get("val") if name in placeholders else None
        if isinstance(value, torch.Tensor):
            yield tuple(getattr(key, "key", getattr(key, "idx", None)) for key in keypath[1:]), value.shape


def specialized_while_tracing(program: torch.export.ExportedProgram, args: tuple, kwargs: dict,
                              dims: dict[tuple[tuple, int], Any]) -> dict[str, int]:
    """{dimension name: size} for declared dimensions that came out static although export succeeded.

    torch.export does not always report a specialization as a violation (e.g. a derived height compared with
    a Python int), so the placeholders' shapes are the ground truth.
    """
    specialized = {}
    for path, shape in traced_shapes(program, args, kwargs):
        for index, size in enumerate(shape):
            dim = dims.get((path, index))
            if isinstance(dim, DynDim) and not isinstance(size, torch.SymInt):
                specialized[dim.name] = int(size)
    return specialized


def failed_guard(gm: torch.fx.GraphModule, call: tuple[tuple, dict]) -> str | None:
    """The guard torch.export recorded that the inputs `call` = (args, kwargs) fail (tensors may be meta: only
    sizes are read), or None when they pass or the graph has no guards."""
    guards, in_spec = getattr(gm, "_guards_fn", None), getattr(gm, "_in_spec", None)
    if guards is None or in_spec is None:
        return None
    from torch.fx._pytree import tree_flatten_spec

    try:
        guards(*tree_flatten_spec(call, in_spec))
    except AssertionError as exc:
        return str(exc).removeprefix("Guard failed: ")
    return None


def pinned_by_guards(gm: torch.fx.GraphModule, args: tuple, kwargs: dict, dims: dict[tuple[tuple, int], Any],
                     examples: dict[tuple, torch.Tensor], fallbacks: dict[str, str], probes: int = 3) -> dict[str, str]:
    """{dimension name: failing guard} for declared dimensions that torch.export's guards pin to the example size.

    The guards are checked on meta tensors with the dimension moved to a few other sizes in its range; one every
    probe rejects is static in effect even though its symbol survived export (e.g. PixArt captured at its native
    grid, where the code compares the grid with a Python int).
    """
    examples_in_units = {dim.name: (examples[path].shape[index] // dim.multiple, dim)
                         for (path, index), dim in dims.items() if isinstance(dim, DynDim) and dim.name not in fallbacks}
    pinned = {}
    for name, (example, dim) in sorted(examples_in_units.items()):
        # The nearest sizes on both sides: one unlucky size can trip a guard on its own (SD3 guards width ≠ its
        # maximum), a pinned dimension fails them all.
        nearest = sorted(range(max(dim.min, example - probes), min(dim.max, example + probes) + 1),
                         key=lambda u: (abs(u - example), u))
        failures = [failed_guard(gm, resized_on_meta((args, kwargs), dims, name, units))
                    for units in nearest if units != example]
        if failures and all(failures):
            pinned[name] = failures[0]
    return pinned


def resized_on_meta(tree: Any, dims: dict[tuple[tuple, int], Any], name: str, units: int, path: tuple = ()) -> Any:
    """`tree` with its tensors as meta tensors, every dimension called `name` resized to `units` multiples."""
    if isinstance(tree, torch.Tensor):
        input_path = path[1:]  # drop the (args, kwargs) level
        shape = [units * dim.multiple if isinstance(dim := dims.get((input_path, i)), DynDim) and dim.name == name
                 else size for i, size in enumerate(tree.shape)]
        return torch.empty(shape, dtype=tree.dtype, device="meta")
    if isinstance(tree, dict):
        return {key: resized_on_meta(value, dims, name, units, path + (key,)) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(resized_on_meta(value, dims, name, units, path + (i,)) for i, value in enumerate(tree))
    return tree


def captured_dim(path: tuple, index: int, dim: Any, example: torch.Tensor, fallbacks: dict[str, str],
                 narrowed: dict[str, str]) -> CapturedDim:
    size = int(example.shape[index])
    if not isinstance(dim, DynDim):
        return CapturedDim(path_name(path), index, size, "auto", reason=f"torch.export decides ({dim})")
    if dim.name in fallbacks:
        return CapturedDim(path_name(path), index, size, "static", dim.name, dim.label, reason=fallbacks[dim.name])
    if not dim.allows(size):
        # A narrowed range that no longer holds the example cannot happen: torch's fix always includes it.
        raise CaptureError(f"{path_name(path)} dim {index} ({dim.describe()}) left its range after capture")
    return CapturedDim(path_name(path), index, size, "dynamic", dim.name, dim.label, dim.min, dim.max, dim.multiple,
                       reason=narrowed.get(dim.name), why_dynamic=dim.why or None)


def unlift(program: torch.export.ExportedProgram, *, check_guards: bool) -> torch.fx.GraphModule:
    """program.module(); without torch's size guards when an adapter showed they do not change the graph."""
    if not check_guards and "check_guards" in inspect.signature(program.module).parameters:
        return program.module(check_guards=False)
    return program.module()


def capture_report(gm: torch.fx.GraphModule) -> dict[str, Any]:
    report = gm.meta.get(CAPTURE_META)
    if report is None:
        raise InputError("this GraphModule was not made by svdq_compiler.capture (no capture report)",
                         fix="capture the model with svdq_compiler.capture or compile")
    return report


def dynamic_shapes_of(gm: torch.fx.GraphModule, inputs: Any) -> Any:
    """The torch.export dynamic_shapes that reproduce the capture's dynamic dimensions (for re-export)."""
    report = capture_report(gm)
    by_name = {path_name(path): path for path, leaf in walk(inputs) if isinstance(leaf, torch.Tensor)}
    dims = {(by_name[d["input"]], d["index"]): CapturedDim(**d).dyn()
            for d in report["dims"] if d["status"] == "dynamic"}
    spec = torch_dynamic_shapes(inputs, dims) if dims else None
    return tuple(spec) if isinstance(spec, list) else spec


# ---- run-time shape check ---------------------------------------------------------------------------------

def install_shape_check(gm: torch.fx.GraphModule) -> None:
    """A forward pre-hook that rejects inputs the graph cannot serve (shape, dtype, device, missing or unknown
    names), naming the input, and a guard that refuses `.to(dtype)` and friends.

    It runs before torch's own guards so that the common mistakes (a static dimension at another size, a
    size outside the captured range, a bf16 input to an fp32 graph) read as svdq errors; inputs that pass
    those checks but not a guard torch.export recorded (a size the model's code cannot take, such as one that
    makes an unlucky ratio) get a ShapeError naming the guard rather than torch's bare AssertionError. A graph
    captured with keyword inputs also accepts them positionally, in order.
    """
    previous = getattr(gm, "_svdq_shape_check", None)
    if previous is not None:
        previous.remove()
    gm._svdq_shape_check = gm.register_forward_pre_hook(_shape_check_hook, with_kwargs=True, prepend=True)
    _refuse_dtype_conversion(gm)


def _shape_check_hook(module: torch.fx.GraphModule, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    report = module.meta.get(CAPTURE_META)
    if report is None:
        return None
    if report["positional"]:
        check_input_shapes(report, list(args), _weights_device(module))
        _check_guards(module, (args, kwargs))
        return None
    signature = inspect.signature(module.forward)
    try:
        inputs = signature.bind(*args, **kwargs).arguments
    except TypeError as exc:
        raise InputError(f"the graph cannot be called this way: {exc}", where="graph call",
                         fix=f"pass its inputs by name: {', '.join(signature.parameters)}") from None
    check_input_shapes(report, inputs, _weights_device(module))
    _check_guards(module, ((), dict(inputs)))
    return ((), dict(inputs)) if args else None


def _check_guards(module: torch.fx.GraphModule, call: tuple[tuple, dict]) -> None:
    guard = failed_guard(module, call)
    if guard is not None:
        raise ShapeError(f"the input sizes fail torch.export's guard `{guard}`: the model's code does not run that "
                         f"way at these sizes", where="graph call",
                         fix="use sizes the guard allows, or capture again at such a size")


def _weights_device(module: torch.nn.Module) -> torch.device | None:
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        return None if tensor.device.type == "meta" else tensor.device
    return None


def graph_dtype(report: dict[str, Any]) -> torch.dtype | None:
    """The floating dtype of the captured inputs (the model dtype the graph was compiled for), if any."""
    dtypes = Counter(entry["dtype"] for entry in report["inputs"]
                     if getattr(torch, entry["dtype"], None) in (torch.float32, torch.float16, torch.bfloat16,
                                                                 torch.float64))
    return getattr(torch, dtypes.most_common(1)[0][0]) if dtypes else None


def _refuse_dtype_conversion(gm: torch.fx.GraphModule) -> None:
    """`.to(torch.bfloat16)`, `.half()`, `.float()` … on a graph would convert its weights but not the dtypes
    baked into its ops and kernel specs: refuse them (device moves still work). Every GraphModule has a class
    of its own, so this changes only `gm`."""
    cls = type(gm)
    if cls is torch.fx.GraphModule or cls.__dict__.get("_svdq_dtype_guard"):
        return
    convert = cls._apply

    def _apply(self, fn, *args, **kwargs):
        report = self.meta.get(CAPTURE_META)
        dtype = graph_dtype(report) if report else None
        if dtype is not None:
            became = fn(torch.empty(0, dtype=dtype)).dtype  # what the conversion does to a tensor of the graph's dtype
            if became != dtype:
                raise InputError(f"this graph was compiled for {str(dtype).removeprefix('torch.')}; converting it "
                                 f"to {str(became).removeprefix('torch.')} would change its weights but not its "
                                 f"kernels", where="graph.to(dtype)",
                                 fix=f"compile the model in {str(became).removeprefix('torch.')} "
                                     f"(svdq-compile --dtype), or convert the inputs instead")
        return convert(self, fn, *args, **kwargs)

    cls._apply = _apply
    cls._svdq_dtype_guard = True


def check_input_shapes(report: dict[str, Any], inputs: Any, device: torch.device | None = None) -> None:
    given = {path_name(path): leaf for path, leaf in walk(inputs)}
    declared = {(d["input"], d["index"]): CapturedDim(**d) for d in report["dims"]}
    symbols: dict[str, tuple[int, str]] = {}
    for entry in report["inputs"]:
        name, shape = entry["path"], entry["shape"]
        tensor = given.get(name)
        if not isinstance(tensor, torch.Tensor):
            continue
        dtype = str(tensor.dtype).removeprefix("torch.")
        if entry.get("dtype") and dtype != entry["dtype"]:
            raise InputError(f"{name} is {dtype}, but the graph was captured with {entry['dtype']}",
                             where="graph call", fix=f"convert it: {name}.to(torch.{entry['dtype']})")
        if device is not None and tensor.device != device:
            raise InputError(f"{name} is on {tensor.device}, but the graph's weights are on {device}",
                             where="graph call", fix=f"move it: {name}.to({str(device)!r}), or move the graph")
        if tensor.dim() != len(shape):
            raise ShapeError(f"{name} has {tensor.dim()} dimensions, but the graph was captured with "
                             f"{len(shape)} ({tuple(shape)})", fix="pass the input with the captured layout")
        for index, size in enumerate(tensor.shape):
            dim = declared.get((name, index))
            if dim is None or dim.status == "static":
                if size != shape[index]:
                    where = dim.where() if dim else f"{name} dim {index}"
                    why = dim.reason if dim else "it was not declared dynamic"
                    raise ShapeError(f"{where} is {size}, but the graph was captured with a static "
                                     f"{shape[index]}: {why}",
                                     fix=f"run at {shape[index]}, or capture again at this size")
            elif dim.status == "dynamic":
                check_dynamic_size(dim, int(size), symbols)


def check_dynamic_size(dim: CapturedDim, size: int, symbols: dict[str, tuple[int, str]]) -> None:
    dyn = dim.dyn()
    if not dyn.allows(size):
        raise ShapeError(f"{dim.where()} is {size}, outside the captured range {dyn.size_range()}"
                         + (f" ({dim.reason})" if dim.reason else ""),
                         fix="use a size in that range, or capture again with a wider range")
    _bind_dimension(symbols, dim.name, size // dyn.multiple, dim.where(), size, ShapeError)


def _bind_dimension(seen: dict[str, tuple[int, str]], name: str, units: int, where: str, size: int,
                   error: type[SvdqError], what: str = "") -> None:
    """Record that the input at `where` gives dimension `name` the value `units` (sizes / multiple); one that
    gives it another value than an earlier input did is an `error` naming both."""
    if name in seen and seen[name][0] != units:
        raise error(f"{what}{where} is {size}, which does not match {seen[name][1]}; both are dimension {name!r}",
                    fix="give them matching sizes")
    seen.setdefault(name, (units, f"{where} = {size}"))
