"""The torch.compile backend `svdquant`: `torch.compile(model, backend="svdquant", options={...})`.

Dynamo hands the backend a torch-level FX graph whose parameters are graph inputs (placeholders sourced from
`L['self']…_parameters[…]`) and, under dynamic shapes, SymInt inputs for the sizes. The backend wraps that graph
in a module that owns the parameters under their model names (`DynamoRegion`), runs the same pipeline as
`svdq_compiler.compile` on it (torch.export capture → ATen → annotate … fuse, with the region's symbolic
dimensions declared dynamic), and hands the result to Inductor (`compile_fx`), where the `torch.ops.svdq.*`
calls stay extern kernels and everything else is Inductor's. The same model, config and calibration give the
same graph as `svdq_compiler.compile`, so the outputs agree.

Options (`options={...}`; anything else is an error listing these):
- `config`: a preset name, a QuantConfig or a dict (default "int4");
- `calib_inputs`: calibration inputs in `svdq_compiler.compile`'s form (tuples of positional arguments or
  dicts of keyword arguments of the model's forward);
- `calib_stats`: statistics an earlier compile saved (`svdq-compile --save-calib FILE`: a path, or a
  `Calibration`); matched per site by the names of the linears reading it;
- neither: weight-only calibration (`calib_source="weights"`, passes/calibrate.py: the searches minimise the
  weight-space error). A warning says which source each compile used;
- `inductor`: False runs the quantized graph as it is instead of handing it to Inductor.
Dynamo recompiles on a new static size as usual, and each recompile quantizes again: compile with
`dynamic=True` or `torch._dynamo.mark_dynamic` so that token counts share one graph.
"""

from __future__ import annotations

import copy
import inspect
import re
import warnings
from typing import Any, Callable, Sequence

import torch
import torch.fx

from svdq_compiler.errors import InputError
from svdq_compiler.ir import get_attr_value, set_attr_value

BACKEND_NAME = "svdquant"
OPTIONS = ("config", "calib_inputs", "calib_stats", "inductor")
_MODULE_PATH = re.compile(r"\._modules\['([^']+)'\]")
_ATTRIBUTE = re.compile(r"\._(parameters|buffers)\['([^']+)'\]$")
_LOCAL = re.compile(r"L\['([A-Za-z_][A-Za-z0-9_]*)'\]$")
_SIZE = re.compile(r"L\['([A-Za-z_][A-Za-z0-9_]*)'\]\.size\(\)\[(\d+)\]$")
_MAX_TOKENS = 1 << 20  # upper bound of a dimension Dynamo made dynamic (it has none)


class DynamoRegion(torch.nn.Module):
    """Dynamo's graph as a module: the model's parameters and buffers are its own (under their model names),
    the frame's tensor arguments are keyword inputs, and sizes Dynamo passes as SymInts are read off them."""

    def __init__(self, graph: torch.fx.GraphModule, example_inputs: Sequence[Any]):
        super().__init__()
        self.graph_module = graph
        self.feeds: list[tuple[str, Any]] = []  # per placeholder: ("attr", name) | ("input", name) | ("size", (name, dim))
        self.input_names: list[str] = []
        self.example: dict[str, torch.Tensor] = {}
        self.symbols: dict[tuple[str, int], Any] = {}
        placeholders = [n for n in graph.graph.nodes if n.op == "placeholder"]
        for index, (node, value) in enumerate(zip(placeholders, example_inputs)):
            source = getattr(node.meta.get("grapharg"), "source", None)
            name = source.name() if callable(getattr(source, "name", None)) else str(getattr(source, "name", ""))
            local, size = _LOCAL.match(name), _SIZE.match(name)
            if local and isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter):
                self.feeds.append(("input", local.group(1)))
                self.input_names.append(local.group(1))
                self.example[local.group(1)] = value
                fake = node.meta.get("example_value")
                for dim, size_value in enumerate(getattr(fake, "shape", ())):
                    if isinstance(size_value, torch.SymInt) and size_value.node.expr.is_symbol:
                        self.symbols[(local.group(1), dim)] = size_value
            elif size:
                self.feeds.append(("size", (size.group(1), int(size.group(2)))))
            elif isinstance(value, torch.Tensor):
                target = _attribute_name(name, index)
                set_attr_value(self, target, value.detach(), as_buffer=not isinstance(value, torch.nn.Parameter))
                self.feeds.append(("attr", target))
            else:
                raise InputError(f"Dynamo passes {name or node.name!r} ({type(value).__name__}), which the svdquant "
                                 "backend cannot feed", where=f"graph input {node.name}",
                                 fix="compile a module whose forward takes tensors (fullgraph=True helps)")

        # torch.export binds inputs by the forward's signature: give it the frame's argument names
        parameters = [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD) for name in self.input_names]

        def forward(*args, **kwargs):
            return self.run_graph(**inspect.Signature(parameters).bind(*args, **kwargs).arguments)

        forward.__signature__ = inspect.Signature(parameters)
        self.forward = forward

    def run_graph(self, **inputs: torch.Tensor):
        args = []
        for kind, what in self.feeds:
            if kind == "attr":
                args.append(get_attr_value(self, what))
            elif kind == "input":
                args.append(inputs[what])
            else:
                args.append(inputs[what[0]].shape[what[1]])
        return self.graph_module(*args)

    def dynamic_shapes(self) -> dict[str, dict[int, Any]] | None:
        """A DynDim per dimension Dynamo made symbolic; dimensions with one symbol share a name."""
        from svdq_compiler.models import DynDim

        spec: dict[str, dict[int, Any]] = {}
        for (name, dim), symbol in self.symbols.items():
            symbol_name = str(symbol.node.expr)
            spec.setdefault(name, {})[dim] = DynDim(symbol_name, 2, _MAX_TOKENS, label=f"{name} dim {dim}")
        return spec or None

    def bind(self, sample: Any, signature_names: Sequence[str] | None) -> dict[str, torch.Tensor]:
        """A model-level input (tuple of positional args or dict of kwargs) as this region's keyword inputs."""
        if isinstance(sample, dict):
            values = dict(sample)
        else:
            sample = tuple(sample) if isinstance(sample, (list, tuple)) else (sample,)
            if signature_names is None:
                raise InputError("positional calibration inputs need the model's argument names",
                                 where="options['calib_inputs']", fix="give each input as a dict of keyword arguments")
            values = dict(zip(signature_names, sample))
        missing = [name for name in self.input_names if name not in values]
        if missing:
            raise InputError(f"a calibration input lacks {missing}, which the compiled region reads",
                             where="options['calib_inputs']", fix="give the inputs the model's forward takes")
        return {name: values[name] for name in self.input_names}


def _attribute_name(source_name: str, index: int) -> str:
    """`L['self']._modules['a']._parameters['weight']` → `a.weight` (the model's own name)."""
    attribute = _ATTRIBUTE.search(source_name)
    if attribute is None:
        return f"constant_{index}"
    return ".".join([*_MODULE_PATH.findall(source_name), attribute.group(2)])


def _frame_argument_names() -> list[str] | None:
    """The argument names of the frame Dynamo is compiling (binds positional calibration inputs)."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        code = InstructionTranslator.current_tx().f_code
    except Exception:  # no translator (called outside Dynamo) or a torch without this hook
        return None
    names = list(code.co_varnames[:code.co_argcount + code.co_kwonlyargcount])
    return names[1:] if names and names[0] == "self" else names


def check_options(options: dict[str, Any] | None) -> dict[str, Any]:
    options = dict(options or {})
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise InputError(f"unknown svdquant backend option(s) {unknown}", where="torch.compile(options=...)",
                         fix=f"valid options: {', '.join(OPTIONS)}")
    if options.get("calib_inputs") is not None and options.get("calib_stats") is not None:
        raise InputError("calib_inputs and calib_stats are two sources of calibration; give one",
                         where="torch.compile(options=...)")
    return options


def svdquant_backend(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], options: dict[str, Any] | None = None,
                     mode: str | None = None) -> Callable:
    """The Dynamo backend (module docstring)."""
    import svdq_compiler

    options = check_options(options)
    config = svdq_compiler.resolve_config(options.get("config", "int4"))
    region = DynamoRegion(gm, example_inputs)
    calib_inputs, calib_stats = None, options.get("calib_stats")
    if options.get("calib_inputs") is not None:
        names = _frame_argument_names()
        calib_inputs = [region.bind(sample, names) for sample in options["calib_inputs"]]
        source = f"{len(calib_inputs)} calibration inputs from options['calib_inputs']"
    elif calib_stats is not None:
        source = "saved statistics from options['calib_stats']"
    else:
        config = config.replace(calib_source="weights")
        source = ("weight-only calibration (no calib_inputs or calib_stats: the searches minimise the weight-space "
                  "error; give calib_inputs or calib_stats for activation-aware smoothing)")
    warnings.warn(f"svdquant backend: {source}", stacklevel=2)
    with torch.no_grad():
        compiled = svdq_compiler.compile(region, dict(region.example), config, calib_inputs=calib_inputs,
                                         calib_stats=calib_stats, dynamic_shapes=region.dynamic_shapes())
    order = [i for i, (kind, _) in enumerate(region.feeds) if kind == "input"]
    names = region.input_names
    runner = _inductor(compiled, gm, order) if options.get("inductor", True) else \
        (lambda *args: compiled(**dict(zip(names, args))))

    def run(*args):
        return runner(*[args[i] for i in order])
    run.svdq_graph = compiled  # for inspection and tests
    return run


def _inductor(compiled: torch.fx.GraphModule, dynamo_graph: torch.fx.GraphModule, order: list[int]) -> Callable:
    """compile_fx on the quantized graph with Dynamo's fake inputs, so its symbolic sizes carry over."""
    from torch._inductor.compile_fx import compile_fx

    placeholders = [n for n in dynamo_graph.graph.nodes if n.op == "placeholder"]
    fakes = [placeholders[i].meta["example_value"] for i in order]
    # A plain GraphModule over the same graph, without the unlifted module's input hooks and torch's export
    # guards: Dynamo guards this region itself, and evaluating them on symbolic sizes would specialize them.
    graph = copy.deepcopy(compiled.graph)
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            graph.erase_node(node)
    return compile_fx(torch.fx.GraphModule(compiled, graph), fakes)


def register() -> None:
    """Make `backend="svdquant"` known to torch.compile (done on `import svdq_compiler`)."""
    from torch._dynamo.backends.registry import _BACKENDS, register_backend

    if BACKEND_NAME not in _BACKENDS:
        register_backend(name=BACKEND_NAME)(svdquant_backend)
