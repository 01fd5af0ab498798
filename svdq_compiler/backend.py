"""The torch.compile backend `svdquant`: `torch.compile(model, backend="svdquant", options={...})`.

Dynamo hands the backend a torch-level FX graph of one frame (the model's `forward`, or a decorator's wrapper
of it) and the values of its placeholders. Each placeholder has a source saying where Dynamo read it: a
frame argument (`L['kwargs']['hidden_states']`, `L['x']`, `L['args'][0]`), a size of one (under dynamic shapes,
`L['kwargs']['hidden_states'].size()[1]`), or the model's state and constants (`L['self']…_parameters[…]`,
a float attribute as a 0-d tensor). The backend wraps the graph in a module (`DynamoRegion`) whose inputs are
the tensors read from the frame's arguments (named after their keyword or argument), whose parameters and
buffers are the model's under the model's own names, whose sizes are read off the inputs, and whose float
constants are folded into the code that reads them. It runs the same pipeline as `svdq_compiler.compile` on it (torch.export capture →
ATen → annotate … fuse, with the region's symbolic dimensions declared dynamic and the role hints of the
model's family), and hands the result to Inductor (`compile_fx`), where the `torch.ops.svdq.*` calls stay
extern kernels and everything else is Inductor's. The same model, config and calibration give the same graph
as `svdq_compiler.compile`, so the outputs agree.

Calibration inputs are given as the model is called — a dict of keyword arguments (the diffusers pipelines'
form) or a tuple of positional ones — and reach the region through the same sources: each one is bound to the
frame's signature (the model goes in as a method's first argument, whatever it is called) and every input
placeholder's source is read from it.

Options (`options={...}`; anything else is an error listing these):
- `config`: a preset name, a QuantConfig or a dict (default "int4");
- `calib_inputs`: calibration inputs, as above;
- `calib_stats`: statistics an earlier compile saved (`svdq-compile --save-calib FILE`: a path, or a
  `Calibration`); matched per site by the names of the linears reading it;
- neither: weight-only calibration (`calib_source="weights"`, passes/calibrate.py: the searches minimise the
  weight-space error). A warning says which source each compile used;
- `inductor`: False runs the quantized graph as it is instead of handing it to Inductor;
- `verify`, `dump_ir` (a folder): as `svdq_compiler.compile`'s; each compile dumps into `<dump_ir>/<NNN>`, numbered
  in the order of this process's compiles.
A graph svdq_compiler already quantized (what `svdq_compiler.load` returns) is compiled as it is.
Dynamo recompiles on a new static size as usual, and each recompile quantizes again: compile with
`dynamic=True` or `torch._dynamo.mark_dynamic` so that token counts share one graph. Float attributes Dynamo
passes as inputs under dynamic shapes (a norm's eps, a dropout's p) are folded in at their compile-time value.
"""

from __future__ import annotations

import copy
import inspect
import itertools
import keyword
import types
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.fx

from svdq_compiler.errors import InputError
from svdq_compiler.ir import get_attr_value, set_attr_value
from svdq_compiler.models.base import leaf_name
from svdq_compiler.models.generic import GenericAdapter

BACKEND_NAME = "svdquant"
OPTIONS = ("config", "calib_inputs", "calib_stats", "inductor", "verify", "dump_ir")
_COMPILES = itertools.count()  # numbers each compile's IR dump folder: Dynamo may compile a model more than once
_MAX_TOKENS = 1 << 20  # upper bound of a dimension Dynamo made dynamic (it has none)
_RESUMED = "torch_dynamo_resume_in_"  # the name Dynamo gives the code after a graph break


class CallFrame:
    """The frame Dynamo compiled, and how a model-level call (positional args, keyword args) becomes its
    arguments: a method of the model (`forward`, or a decorator's wrapper of it) takes the model as its first
    argument, whatever that argument is called; a plain function takes the call as it is."""

    def __init__(self, code: types.CodeType, arguments: dict[str, Any]):
        self.code = code
        self.signature = _code_signature(code)
        first = next(iter(self.signature.parameters), None)
        value = arguments.get(first)
        method = isinstance(value, torch.nn.Module) and _is_method_of(code, type(value))
        self.owner: torch.nn.Module | None = value if method else None
        self.owner_argument = first if method else None
        self.var_keyword = next((p.name for p in self.signature.parameters.values()
                                 if p.kind is inspect.Parameter.VAR_KEYWORD), None)

    @classmethod
    def current(cls) -> "CallFrame":
        """The frame Dynamo is compiling now (the backend runs inside its translation)."""
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tx = InstructionTranslator.current_tx()
        return cls(tx.f_code, dict(tx.f_locals))

    def is_argument(self, local_name: str) -> bool:
        return local_name in self.signature.parameters and local_name != self.owner_argument

    def bind(self, sample: Any) -> dict[str, Any]:
        """The frame's arguments for one model-level call: a dict of keyword arguments, or a tuple of
        positional ones (a lone tensor is one positional argument)."""
        if self.code.co_name.startswith(_RESUMED):
            raise InputError("the compiled region starts after a graph break, which whole-model calibration "
                             "inputs do not reach", where="options['calib_inputs']",
                             fix="remove the graph break (torch.compile(..., fullgraph=True) names it), or give "
                                 "options['calib_stats']")
        if isinstance(sample, dict):
            args, kwargs = (), dict(sample)
        else:
            args, kwargs = (tuple(sample) if isinstance(sample, (list, tuple)) else (sample,)), {}
        if self.owner is not None:
            args = (self.owner, *args)
        try:
            bound = self.signature.bind_partial(*args, **kwargs)
        except TypeError as exc:
            raise InputError(f"a calibration input does not fit the compiled call ({exc})",
                             where="options['calib_inputs']",
                             fix="give each input as the model is called: a dict of keyword arguments or a "
                                 "tuple of positional ones") from exc
        bound.apply_defaults()  # an empty *args / **kwargs
        return dict(bound.arguments)


def _code_signature(code: types.CodeType) -> inspect.Signature:
    """The parameters of a code object (no defaults: a missing argument is reported where it is read)."""
    kind = inspect.Parameter
    names = code.co_varnames
    positional, keyword_only = code.co_argcount, code.co_kwonlyargcount
    parameters = [kind(name, kind.POSITIONAL_ONLY if index < code.co_posonlyargcount else kind.POSITIONAL_OR_KEYWORD)
                  for index, name in enumerate(names[:positional])]
    extra = positional + keyword_only
    if code.co_flags & inspect.CO_VARARGS:
        parameters.append(kind(names[extra], kind.VAR_POSITIONAL))
        extra += 1
    parameters += [kind(name, kind.KEYWORD_ONLY) for name in names[positional:positional + keyword_only]]
    if code.co_flags & inspect.CO_VARKEYWORDS:
        parameters.append(kind(names[extra], kind.VAR_KEYWORD))
    return inspect.Signature(parameters)


def _is_method_of(code: types.CodeType, cls: type) -> bool:
    """Whether `code` is a function defined on `cls` or a base (`forward`, or the wrapper a decorator put there)."""
    return any(getattr(value, "__code__", None) is code for klass in cls.__mro__ for value in vars(klass).values())


def _chain(source: Any) -> list[Any]:
    """[root, …, source]: a Dynamo source and the sources it reads from."""
    chain = [source]
    while getattr(chain[-1], "base", None) is not None:
        chain.append(chain[-1].base)
    return chain[::-1]


def _read(source: Any, frame_arguments: dict[str, Any]) -> Any:
    """The value a Dynamo source names, read from a frame's arguments (the source kinds a frame argument's
    tensors and sizes come from; anything else is an error)."""
    from torch._dynamo.source import (AttrSource, DictGetItemSource, GetItemSource, LocalSource,
                                      TensorPropertySource)

    value: Any = None
    for step in _chain(source):
        if isinstance(step, LocalSource):
            if step.local_name not in frame_arguments:
                raise KeyError(step.local_name)
            value = frame_arguments[step.local_name]
        elif isinstance(step, DictGetItemSource) and not hasattr(step.index, "name"):
            value = value[step.index]
        elif isinstance(step, GetItemSource):
            value = value[step.unpack_slice() if step.index_is_slice else step.index]
        elif isinstance(step, AttrSource):
            value = getattr(value, step.member)
        elif isinstance(step, TensorPropertySource) and step.prop.method_name() in ("size", "stride"):
            value = getattr(value, step.prop.method_name())()[step.idx]
        else:
            raise InputError(f"the svdquant backend cannot read the graph input {_source_name(source)}",
                             fix="call the compiled model with tensors as arguments (fullgraph=True helps)")
    return value


def _source_name(source: Any) -> str:
    name = getattr(source, "name", "")
    return name() if callable(name) else str(name)


def _input_name(source: Any, frame: CallFrame) -> str:
    """A Python identifier for an input placeholder, from the keys and indices that reach it:
    `L['kwargs']['hidden_states']` → hidden_states, `L['x']` → x, `L['args'][0]` → args_0."""
    from torch._dynamo.source import LocalSource

    parts = []
    for step in _chain(source):
        if isinstance(step, LocalSource):
            if step.local_name != frame.var_keyword:
                parts.append(step.local_name)
        else:
            parts.append(str(getattr(step, "index", getattr(step, "member", ""))))
    name = leaf_name(parts) or "input"
    return f"{name}_" if keyword.iskeyword(name) or name[0].isdigit() else name


class DynamoRegion(torch.nn.Module):
    """Dynamo's graph as a module (module docstring): keyword inputs for the tensors of the frame's arguments,
    the model's parameters and buffers as its own, sizes read off the inputs, float constants folded in."""

    def __init__(self, graph: torch.fx.GraphModule, example_inputs: Sequence[Any], frame: CallFrame):
        super().__init__()
        self.graph_module = graph
        self.frame = frame
        self.inputs: dict[str, Any] = {}  # input name → its source in the frame
        self.positions: list[int] = []  # per input (in order), the index of its placeholder in Dynamo's graph
        self.example: dict[str, torch.Tensor] = {}
        self.symbols: dict[tuple[str, int], Any] = {}
        self.feeds: list[tuple[str, Any]] = []  # per placeholder kept: ("attr", name) | ("input", name) | ("size", (name, dim))
        model_names: dict[int, str] = {}
        if frame.owner is not None:
            named = itertools.chain(frame.owner.named_parameters(remove_duplicate=False),
                                    frame.owner.named_buffers(remove_duplicate=False))
            for name, tensor in named:
                model_names.setdefault(id(tensor), name)
        placeholders = [n for n in graph.graph.nodes if n.op == "placeholder"]
        sources = [getattr(n.meta.get("grapharg"), "source", None) for n in placeholders]
        input_of: dict[Any, str] = {}  # source → input name
        for index, (node, value, source) in enumerate(zip(placeholders, example_inputs, sources)):
            if isinstance(value, torch.Tensor) and id(value) not in model_names and self._from_arguments(source):
                name = _input_name(source, frame)
                name = next(f"{name}_{n}" if n else name for n in itertools.count() if
                            (f"{name}_{n}" if n else name) not in self.inputs)
                self.inputs[name] = source
                input_of[source] = name
                self.positions.append(index)
                self.example[name] = value
                for dim, size in enumerate(getattr(node.meta.get("example_value"), "shape", ())):
                    if isinstance(size, torch.SymInt) and size.node.expr.is_symbol:
                        self.symbols[(name, dim)] = size
        for index, (node, value, source) in enumerate(zip(placeholders, example_inputs, sources)):
            base = getattr(source, "base", None)
            if source in input_of:
                self.feeds.append(("input", input_of[source]))
            elif base in input_of and getattr(getattr(source, "prop", None), "name", "") == "SIZE":
                self.feeds.append(("size", (input_of[base], source.idx)))
            elif isinstance(value, torch.Tensor) and id(value) in model_names:
                set_attr_value(self, model_names[id(value)], value.detach(),
                               as_buffer=not isinstance(value, torch.nn.Parameter))
                self.feeds.append(("attr", model_names[id(value)]))
            elif isinstance(value, torch.Tensor):
                _fold_scalar(graph.graph, node, value)
                set_attr_value(self, f"constant_{index}", value.detach(), as_buffer=True)
                self.feeds.append(("attr", f"constant_{index}"))
            else:
                raise InputError(f"Dynamo passes {_source_name(source) or node.name!r} ({type(value).__name__}), "
                                 "which the svdquant backend cannot feed", where=f"graph input {node.name}",
                                 fix="pass tensors (not Python numbers) to the compiled model")
        graph.recompile()
        # Dynamo's guards on the sizes (a branch the model took, a reshape that needs a divisor): calibration
        # inputs that break one would run code this graph does not have
        tracing = torch._guards.TracingContext.try_get()
        shape_env = getattr(getattr(tracing, "fake_mode", None), "shape_env", None)
        self.size_guards = [guard.expr for guard in getattr(shape_env, "guards", [])]

        # torch.export binds inputs by the forward's signature: give it the input names
        parameters = [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD) for name in self.inputs]

        def forward(*args, **kwargs):
            return self.run_graph(**inspect.Signature(parameters).bind(*args, **kwargs).arguments)

        forward.__signature__ = inspect.Signature(parameters)
        self.forward = forward

    def _from_arguments(self, source: Any) -> bool:
        """Whether Dynamo read this placeholder from an argument of the call (not the model or a global)."""
        from torch._dynamo.source import LocalSource

        root = _chain(source)[0] if source is not None else None
        return isinstance(root, LocalSource) and self.frame.is_argument(root.local_name)

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

    def bind(self, sample: Any) -> dict[str, torch.Tensor]:
        """A model-level call (a dict of keyword arguments or a tuple of positional ones) as this region's
        keyword inputs: each input read from the call through its source."""
        arguments = self.frame.bind(sample)
        values, missing = {}, []
        for name, source in self.inputs.items():
            try:
                values[name] = _read(source, arguments)
            except (KeyError, IndexError):
                missing.append(name)
        if missing:
            raise InputError(f"a calibration input lacks {missing}, which the compiled region reads",
                             where="options['calib_inputs']", fix="give the inputs the model's forward takes")
        wrong = [name for name, value in values.items() if not isinstance(value, torch.Tensor)]
        if wrong:
            raise InputError(f"a calibration input gives {wrong} as {type(values[wrong[0]]).__name__}, where the "
                             "compiled call took a tensor", where="options['calib_inputs']")
        for name, value in values.items():
            example = self.example[name]
            static = [d for d in range(example.dim()) if (name, d) not in self.symbols]
            if value.dim() != example.dim() or any(value.shape[d] != example.shape[d] for d in static):
                raise InputError(f"a calibration input's {name} has shape {tuple(value.shape)}; the graph Dynamo "
                                 f"compiled is static in the sizes of {tuple(example.shape)} at dims {static}",
                                 where="options['calib_inputs']",
                                 fix="compile with dynamic=True (or leave dynamic unset: Dynamo's recompile for a "
                                     "new size is dynamic), or give options['calib_stats']")
        failed = self._failed_guard(values)
        if failed is not None:
            raise InputError(f"a calibration input has sizes {_shapes(values)}, which the graph Dynamo compiled for "
                             f"{_shapes(self.example)} does not serve (its guard {failed} fails: the model's code "
                             "takes another branch there)", where="options['calib_inputs']",
                             fix="calibrate at sizes the model is called with, or give options['calib_stats']")
        return values

    def _failed_guard(self, values: dict[str, torch.Tensor]) -> str | None:
        """The first of Dynamo's size guards on this region that `values` break (None if they hold them all)."""
        import sympy

        sizes: dict[Any, int] = {}
        for (name, dim), symbol in self.symbols.items():
            size = values[name].shape[dim]
            if sizes.setdefault(symbol.node.expr, size) != size:
                return f"that {name} dim {dim} equals the other dimensions of size {symbol.node.expr}"
        known = set(sizes)
        for guard in self.size_guards:
            if guard.free_symbols <= known and guard.xreplace({s: sympy.Integer(v) for s, v in sizes.items()}) \
                    is sympy.false:
                return str(guard)
        return None


def _shapes(values: dict[str, torch.Tensor]) -> str:
    return ", ".join(f"{name} {tuple(value.shape)}" for name, value in values.items())


def _fold_scalar(graph: torch.fx.Graph, node: torch.fx.Node, value: torch.Tensor) -> None:
    """A 0-d constant read only through `.item()` (a float attribute Dynamo made an input): its readers get the
    number. The placeholder stays (unused), since Dynamo calls the compiled region with one value per placeholder."""
    users = list(node.users)
    if value.dim() != 0 or not users or any(u.op != "call_method" or u.target != "item" for u in users):
        return
    number = value.item()
    for item in users:
        for user in list(item.users):
            user.args = torch.fx.node.map_arg(user.args, lambda n: number if n is item else n)
            user.kwargs = torch.fx.node.map_arg(user.kwargs, lambda n: number if n is item else n)
        graph.erase_node(item)


class RegionAdapter(GenericAdapter):
    """The generic path for Dynamo's region, with what the compiled model's family knows: its role hints (the
    region keeps the model's parameter names, which they match), its dynamic dimensions (multiples, shared
    names, ranges) for the dimensions Dynamo made symbolic, and its guard relaxation."""

    def __init__(self, region: DynamoRegion):
        from svdq_compiler.models import adapter_for

        self.region, self.model = region, region.frame.owner
        self.family = adapter_for(self.model) if self.model is not None else None
        self.name = f"{self.family.name} (torch.compile region)" if self.family is not None else GenericAdapter.name

    def role_hints(self, model):
        return self.family.role_hints(self.model) if self.family is not None else {}

    def dynamic_shapes(self, model, inputs):
        """A DynDim per dimension Dynamo made symbolic: the family's where it declares one, else one named after
        Dynamo's symbol (dimensions with one symbol share a name)."""
        from svdq_compiler.models import DynDim

        declared = {}
        if self.family is not None:
            try:
                declared = _flat_dims(self.family.dynamic_shapes(self.model, inputs) or {})
            except Exception:  # inputs the family does not know (a positional call): Dynamo's symbols alone
                declared = {}
        spec: dict[str, dict[int, Any]] = {}
        for (name, dim), symbol in self.region.symbols.items():
            family_dims = declared.get(name)
            dyn = family_dims.get(dim) if isinstance(family_dims, dict) else None
            spec.setdefault(name, {})[dim] = dyn if isinstance(dyn, DynDim) else \
                DynDim(str(symbol.node.expr), 2, _MAX_TOKENS, label=f"{name} dim {dim}")
        return spec or None

    def guard_relaxation(self, model, inputs):
        return self.family.guard_relaxation(self.model, inputs) if self.family is not None else None


def _flat_dims(spec: dict[str, Any], path: tuple = ()) -> dict[str, Any]:
    """A family's dynamic shapes keyed as the region names its inputs (leaf_name of each nested input)."""
    flat: dict[str, Any] = {}
    for key, value in spec.items():
        nested = isinstance(value, dict) and value and all(isinstance(k, str) for k in value)
        flat.update(_flat_dims(value, path + (key,)) if nested else {leaf_name(path + (key,)): value})
    return flat


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
    if any(getattr(node.target, "namespace", "") == "svdq" for node in gm.graph.nodes if node.op == "call_function"):
        # a graph svdq_compiler made (svdq_compiler.load's, or compile's): quantized already, so Inductor alone
        warnings.warn("svdquant backend: the region is quantized already (svdq ops); compiled as it is",
                      stacklevel=2)
        if not options.get("inductor", True):
            return gm
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, example_inputs)
    frame = CallFrame.current()
    fakes = [n.meta["example_value"] for n in gm.graph.nodes if n.op == "placeholder"]
    region = DynamoRegion(gm, example_inputs, frame)
    calib_inputs, calib_stats = None, options.get("calib_stats")
    if options.get("calib_inputs") is not None:
        calib_inputs = [region.bind(sample) for sample in options["calib_inputs"]]
        source = f"{len(calib_inputs)} calibration inputs from options['calib_inputs']"
    elif calib_stats is not None:
        source = "saved statistics from options['calib_stats']"
    else:
        config = config.replace(calib_source="weights")
        source = ("weight-only calibration (no calib_inputs or calib_stats: the searches minimise the weight-space "
                  "error; give calib_inputs or calib_stats for activation-aware smoothing)")
    warnings.warn(f"svdquant backend: {source}", stacklevel=2)
    # Outside Dynamo's tracing context: torch.export would otherwise take Dynamo's fake mode and shape environment,
    # and with them guards on the frame's sources that the captured graph cannot evaluate.
    with torch.no_grad(), torch._guards.tracing(None):
        compiled = svdq_compiler.compile(region, dict(region.example), config, calib_inputs=calib_inputs,
                                         calib_stats=calib_stats, dynamic_shapes="auto" if region.symbols else None,
                                         adapter=RegionAdapter(region), verify=bool(options.get("verify")),
                                         dump_ir=None if options.get("dump_ir") is None
                                         else Path(options["dump_ir"]) / f"{next(_COMPILES):03d}")
    order, names = region.positions, list(region.inputs)
    if options.get("inductor", True):
        runner = _inductor(compiled, [fakes[i] for i in order])
    else:
        def runner(*args):
            return compiled(**dict(zip(names, args)))

    def run(*args):
        return runner(*[args[i] for i in order])
    run.svdq_graph = compiled  # for inspection and tests
    return run


def _inductor(compiled: torch.fx.GraphModule, fakes: list[Any]) -> Callable:
    """compile_fx on the quantized graph with Dynamo's fake inputs, so its symbolic sizes carry over."""
    from torch._inductor.compile_fx import compile_fx

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
