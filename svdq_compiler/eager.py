"""The eager path: SVDQuant by module swap, for models torch.export cannot capture.

Some models compute Python values from tensor data (HiDream's MoE routing calls `.numpy()`, Lumina2 builds
slices from `mask.sum().tolist()`), so no single graph holds them. Here each eligible `nn.Linear` becomes an
`SVDQLinear`: the model's own Python code still runs, at any size, and every quantized linear runs the same
lowered or fused svdq ops as the graph path (the reference ops on the CPU, the generated kernels on a GPU).

How it reuses the graph path — one driver, `pipeline.run_passes`, for both graphs below:

1. **Roles and smoothing groups** come from `annotate_linears` itself, run on a *recording* of one eager forward:
   a dispatch-level record of the ATen ops the example inputs executed (`F.linear` kept as one `aten.linear`),
   with real values, so data-dependent code is simply executed. The record is specialized to those inputs and
   is never run; it only gives annotate_linears the structure it reads (attention operands, activations, graph
   inputs and outputs). Linears that read the same tensor share one group, as in a captured graph.
2. **The quantization** runs on a *stub graph*: a torch.export capture of a module whose inputs are one
   activation matrix [rows, K] per smoothing group (rows dynamic) and whose outputs are that group's linears,
   the model's own `nn.Linear` modules under their qualified names. The annotations are copied onto it from
   the recording (`copy_annotations`), then the ordinary passes run: calibrate (its inputs are the group
   activations that forward pre-hooks collect from eager calibration runs), smooth, lowrank,
   quantize_weights, lower, fuse. A linear called several times in one forward (a shared weight, MoE experts
   on token subsets) contributes all its distinct input rows to its group's calibration input.
3. **The swap**: the compiled stub graph is cut into one GraphModule per group (each output depends on its own
   group input only); every member linear becomes an `SVDQLinear` reading its group's output. A group computes
   all its members at once (q/k/v share one activation quantization) and hands each member its result while
   the input is unchanged (same tensor object, same version counter).

Costs: calibration holds, per forward, every group's distinct inputs at once (the stub graph's calibration input
for that forward): about one forward's linear activations. Once compiled, each tensor is held once: by the group
modules or the model; the stub graph keeps its graph and reports with meta tensors, and `save` lends it the live
ones. What does not carry over: graph-level fusion across layers (kernel B's GELU / residual epilogues and
quantize-next need the model's graph); k×k convolutions and linears the example forward never called stay
16-bit (the report lists them).

Saved form (`save_eager`): a graph file of the compiled stub graph (`svdq_compiler.serialize`, with its digests
and code-free checks) whose extra file `svdq_eager.json` holds the diffusers class name, its config and each
swapped linear's group and output index; the model's other tensors ride in the same program as the stub's
carried outputs (`_CARRIED_PREFIX`), so one file with one integrity scheme holds everything. `load_eager`
builds the class from its config with parameters on the meta device, assigns the saved tensors and swaps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import operator
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch
import torch.fx
import torch.utils._pytree as pytree
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from svdq_compiler.capture import capture, model_config
from svdq_compiler.config import QuantConfig
from svdq_compiler.errors import CheckpointError, InputError, SvdqError
from svdq_compiler.ir import EAGER_META, REPORT_META, LinearInfo, annotated_linears, set_info, split_inputs
from svdq_compiler.models.base import DynDim
from svdq_compiler.pipeline import PassContext, PassResult, make_pass, run_passes, svdquant_pipeline

COMPILE_PATHS = ("auto", "graph", "eager")
EAGER_FILE = "svdq_eager.json"
EAGER_FORMAT = "svdq-eager"
_CARRIED_PREFIX = "carried"  # stub attribute holding the model's tensors that are not swapped linears
_MAX_ROWS = 1 << 24  # a group input's row count: tokens × batch at any resolution a model serves


# ---- 1. the recording -----------------------------------------------------------------------------------------


class _Recording(TorchDispatchMode):
    """Record the ATen ops of one eager forward as an FX graph with fake values (module doc, step 1).

    A higher-order operator (flex_attention, …) reaches `__torch_dispatch__` whole, with this mode popped: it runs
    as usual and is recorded as one node reading its tensor operands, its outputs new values like any op's. The
    ops inside its body (a score_mod, say) are not recorded; a linear called in such a body stays 16-bit."""

    supports_higher_order_operators = True

    def __init__(self, names: dict[int, str]):
        super().__init__()
        from torch._subclasses.fake_tensor import FakeTensorMode

        self.graph = torch.fx.Graph()
        self.names = names  # id(parameter or buffer) → qualified name
        self.nodes: dict[int, torch.fx.Node] = {}  # id(tensor) → the node that produced it
        self.alive: list[Any] = []  # every recorded tensor stays alive, so no id is reused
        self.fake = FakeTensorMode(allow_non_fake_inputs=True)
        self.paused = False
        self.inputs = 0

    def node_of(self, tensor: torch.Tensor) -> torch.fx.Node:
        node = self.nodes.get(id(tensor))
        if node is None:
            name = self.names.get(id(tensor))
            if name is not None:
                node = self.graph.get_attr(name)
            else:
                node = self.graph.placeholder(f"input_{self.inputs}")
                self.inputs += 1
            self.record(node, tensor)
        return node

    def record(self, node: torch.fx.Node, tensor: torch.Tensor) -> None:
        node.meta["val"] = self.fake.from_tensor(tensor, static_shapes=True)
        self.nodes[id(tensor)] = node
        self.alive.append(tensor)

    def argument(self, value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return self.node_of(value)
        if callable(value):  # a higher-order operator's body: the graph's code can only name it (it never runs)
            return f"<{getattr(value, '__qualname__', type(value).__qualname__)}>"
        return value

    def call(self, func, args: tuple, kwargs: dict, result: Any) -> None:
        node = self.graph.call_function(func, pytree.tree_map(self.argument, tuple(args)),
                                        pytree.tree_map(self.argument, dict(kwargs)))
        if isinstance(result, torch.Tensor):
            self.record(node, result)
        elif isinstance(result, (tuple, list)):
            for index, value in enumerate(result):
                if isinstance(value, torch.Tensor):
                    self.record(self.graph.call_function(operator.getitem, (node, index)), value)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if not self.paused:
            self.call(func, args, kwargs, result)
        return result


class _WholeLinears(TorchFunctionMode):
    """Keep `F.linear` one `aten.linear` node in the recording (dispatch sees it decomposed into views and mm)."""

    def __init__(self, recording: _Recording):
        super().__init__()
        self.recording = recording

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not torch.nn.functional.linear or self.recording.paused:
            return func(*args, **kwargs)
        self.recording.paused = True
        try:
            result = func(*args, **kwargs)
        finally:
            self.recording.paused = False
        x, weight = args[0], args[1] if len(args) > 1 else kwargs["weight"]
        bias = args[2] if len(args) > 2 else kwargs.get("bias")
        self.recording.call(torch.ops.aten.linear.default, (x, weight, bias), {}, result)
        return result


def record(model: torch.nn.Module, example_inputs: tuple | dict) -> torch.fx.GraphModule:
    """One eager forward of `model` on `example_inputs` as an ATen GraphModule for analysis (never run)."""
    named = [*model.named_parameters(), *model.named_buffers()]
    names = {id(t): name for name, t in named}
    recording = _Recording(names)
    args, kwargs = split_inputs(example_inputs)
    # Dynamo cannot trace under a recording mode (it skips every frame, and a fullgraph compile then fails): code
    # the model compiles itself (eager flex_attention compiles its call) runs as plain Python here.
    with torch.no_grad(), torch.compiler.set_stance("force_eager"), _WholeLinears(recording), recording:
        output = model(*args, **kwargs)
    leaves = [recording.nodes[id(v)] for v in pytree.tree_leaves(output)
              if isinstance(v, torch.Tensor) and id(v) in recording.nodes]
    recording.graph.output(tuple(leaves))
    return torch.fx.GraphModule(model, recording.graph)


def _analysis_config(config: QuantConfig) -> QuantConfig:
    # Only nn.Linear modules are swapped: a linear stays one layer (no concat split) and 1×1 convs stay convs.
    return dataclasses.replace(config, split_concat_linears=False, conv1x1_as_linear=False)


def analyse(model: torch.nn.Module, example_inputs: tuple | dict, config: QuantConfig, adapter: Any
            ) -> tuple[dict[str, LinearInfo], list[str]]:
    """{linear module name: its annotation} for every nn.Linear the example forward called, and what was left
    out (with why)."""
    recorded = record(model, example_inputs)
    ctx = PassContext(config=_analysis_config(config), adapter=adapter, model=model)
    run_passes(recorded, ctx, svdquant_pipeline(["annotate_linears"]))
    linears = {name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    infos: dict[str, LinearInfo] = {}
    left_out: list[str] = []
    for _, info in annotated_linears(recorded):
        module = info.weight.removesuffix(".weight")
        if module not in linears or not info.weight.endswith(".weight"):
            if info.scheme is not None and info.scheme.kind != "fp":
                left_out.append(f"{info.name}: not an nn.Linear weight (stays 16-bit in eager mode)")
            continue
        infos.setdefault(module, info)  # a shared weight: annotate_linears gave every site the same scheme
    called = set(infos)
    left_out += [f"{name}: not called by the example forward (stays 16-bit)" for name in sorted(linears - called)]
    return infos, left_out


# ---- 2. the stub graph --------------------------------------------------------------------------------------


@dataclasses.dataclass
class Group:
    """One smoothing group: the stub input it reads and its member linears, in output order."""

    input: str  # the stub graph's input name
    members: list[str]
    in_features: int


class _Stub(torch.nn.Module):
    """group inputs → every member linear's output (module doc, step 2), plus the carried tensors."""

    def __init__(self, model: torch.nn.Module, groups: list[Group], carried: dict[str, torch.Tensor]):
        super().__init__()
        self.groups = groups
        for group in groups:
            for name in group.members:
                _set_submodule(self, name, model.get_submodule(name))
        setattr(self, _CARRIED_PREFIX, torch.nn.Module())
        for index, tensor in enumerate(carried.values()):
            getattr(self, _CARRIED_PREFIX).register_buffer(f"t{index}", tensor)

    def forward(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        outputs = [self.get_submodule(name)(inputs[group.input]) for group in self.groups for name in group.members]
        return (*outputs, *getattr(self, _CARRIED_PREFIX).buffers())


def _set_submodule(root: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    parent = root
    *path, leaf = name.split(".")
    for part in path:
        if not hasattr(parent, part):
            parent.add_module(part, torch.nn.Module())
        parent = getattr(parent, part)
    parent.add_module(leaf, module)


def _groups(infos: dict[str, LinearInfo]) -> list[Group]:
    groups: dict[str, Group] = {}
    for name, info in infos.items():
        if info.scheme is None or info.scheme.kind == "fp":
            continue
        key = info.group or info.name
        if key not in groups:  # the index keeps names unique where two module paths flatten alike
            groups[key] = Group(f"x{len(groups)}_" + key.replace(".", "_").replace("@", "_"), [], info.in_features)
        group = groups[key]
        group.members.append(name)
    return list(groups.values())


def _copy_annotations(infos: dict[str, LinearInfo]):
    """A step only this driver runs: the recording's annotations onto the stub graph's linears."""

    def copy_annotations(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        copied = 0
        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target == torch.ops.aten.linear.default:
                name = node.args[1].target.removesuffix(".weight")
                set_info(node, dataclasses.replace(infos[name]))
                copied += 1
        return PassResult(gm, copied > 0, {"linears_annotated": copied})

    return make_pass("copy_annotations", copy_annotations, produces=("linears",),
                     summary="every stub linear carries the annotation annotate_linears gave it in the recording")


class _GroupInputs:
    """Forward pre-hooks that collect, per group, the distinct inputs its linears read during one forward."""

    def __init__(self, model: torch.nn.Module, groups: list[Group]):
        self.groups = groups
        self.weights = {g.input: model.get_submodule(g.members[0]).weight for g in groups}  # dtype and device
        self.seen: dict[str, list[torch.Tensor]] = {}
        self.handles = []
        for group in groups:
            for name in group.members:
                self.handles.append(model.get_submodule(name).register_forward_pre_hook(self._hook(group),
                                                                                        with_kwargs=True))

    def _hook(self, group: Group):
        def collect(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else kwargs["input"]  # nn.Linear.forward(input): AnimateDiff passes it by name
            seen = self.seen.setdefault(group.input, [])
            if not any(x is other and x._version == version for other, version in seen):
                seen.append((x, x._version))
        return collect

    def take(self) -> dict[str, torch.Tensor]:
        """Each group's rows from the last forward; a group no call reached gets one zero row (it widens no
        absmax: every range holds 0 once a row was seen, and calibration needs a row per input)."""
        rows = {}
        for group in self.groups:
            seen = self.seen.get(group.input, [])
            weight = self.weights[group.input]
            parts = [x.detach().reshape(-1, group.in_features).to(weight.dtype) for x, _ in seen]
            rows[group.input] = torch.cat(parts) if parts else weight.new_zeros(1, group.in_features)
        self.seen = {}
        return rows

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _stub_inputs(model: torch.nn.Module, groups: list[Group], samples: Iterable[tuple | dict]
                 ) -> Iterator[tuple[dict[str, torch.Tensor]]]:
    """For each model input, one eager forward with hooks: the stub graph's calibration input."""
    hooks = _GroupInputs(model, groups)
    try:
        for sample in samples:
            args, kwargs = split_inputs(sample)
            with torch.no_grad():
                model(*args, **kwargs)
            yield (hooks.take(),)
    finally:
        hooks.remove()


def _calibration_samples(model, example_inputs, calib_inputs, config: QuantConfig, adapter) -> tuple[Iterable, str]:
    from svdq_compiler.models import GenericAdapter

    if calib_inputs is not None:
        return calib_inputs, "calib_inputs"
    if adapter is not None and not isinstance(adapter, GenericAdapter):
        try:
            return (adapter.calib_inputs(model, config.calib_prompts, config.calib_steps, seed=config.calib_seed),
                    f"adapter {adapter.name} ({config.calib_prompts} prompts x {config.calib_steps} steps)")
        except InputError as exc:  # the auto adapter found no input layout of the model's that runs
            return [example_inputs], f"example_inputs (adapter {adapter.name} builds none: {exc}; one sample only)"
    return [example_inputs], "example_inputs (no calibration inputs and no adapter: one sample only)"


# ---- 3. the swap -----------------------------------------------------------------------------------------------


class QuantizedGroup(torch.nn.Module):
    """One group's compiled linears: rows [M, K] → each member's output; the last result is kept until every
    member took it, for as long as the input is the same tensor, unchanged."""

    def __init__(self, graph_module: torch.fx.GraphModule, members: int):
        super().__init__()
        self.graph_module = graph_module
        self.members = members
        self._last: tuple[torch.Tensor, int, list[torch.Tensor], set[int]] | None = None

    def output(self, x: torch.Tensor, index: int) -> torch.Tensor:
        last = self._last
        if last is None or last[0] is not x or last[1] != x._version or index not in last[3]:
            outputs = self.graph_module(x.reshape(-1, x.shape[-1]))
            last = self._last = (x, x._version, list(outputs), set(range(self.members)))
        last[3].discard(index)
        result = last[2][index]
        if not last[3]:
            self._last = None
        return result

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.graph_module(x.reshape(-1, x.shape[-1])))


class SVDQLinear(torch.nn.Module):
    """An nn.Linear replaced by its group's compiled svdq ops (output `index` of `group`)."""

    def __init__(self, name: str, group: QuantizedGroup, index: int, in_features: int, out_features: int):
        super().__init__()
        self.name, self.index = name, index
        self.in_features, self.out_features = in_features, out_features
        self.group = group

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 (nn.Linear's name: callers pass it by it)
        y = self.group.output(input, self.index)
        return y.reshape(*input.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"{self.name}: in_features={self.in_features}, out_features={self.out_features}, svdq"


def _group_module(gm: torch.fx.GraphModule, placeholder: torch.fx.Node, outputs: list[torch.fx.Node]
                  ) -> torch.fx.GraphModule:
    """The part of the compiled stub graph computing `outputs` from `placeholder` alone."""
    needed: set[torch.fx.Node] = set()
    stack = list(outputs)
    while stack:
        node = stack.pop()
        if node not in needed:
            needed.add(node)
            stack.extend(node.all_input_nodes)
    stray = [n.name for n in needed if n.op == "placeholder" and n is not placeholder]
    if stray:
        raise RuntimeError(f"group {placeholder.name} also reads {stray}: the stub graph's groups are not "
                           f"independent")
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    for node in gm.graph.nodes:
        if node in needed:
            env[node] = graph.node_copy(node, lambda n: env[n])
    graph.output(tuple(env[o] for o in outputs))
    return torch.fx.GraphModule(gm, graph)


def _stub_layout(gm: torch.fx.GraphModule) -> tuple[list[torch.fx.Node], list[torch.fx.Node]]:
    """The stub graph's group inputs (in group order: the input dict's order) and its outputs."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    output = next(n for n in gm.graph.nodes if n.op == "output")
    return placeholders, list(pytree.tree_leaves(output.args[0]))


def _swap(model: torch.nn.Module, stub: torch.fx.GraphModule, groups: list[Group]) -> None:
    placeholders, outputs = _stub_layout(stub)
    start = 0
    for group, placeholder in zip(groups, placeholders):
        members = outputs[start:start + len(group.members)]
        start += len(members)
        runner = QuantizedGroup(_group_module(stub, placeholder, members), len(members))
        for index, name in enumerate(group.members):
            linear = model.get_submodule(name)
            _replace_module(model, linear, SVDQLinear(name, runner, index, linear.in_features, linear.out_features))


def _replace_module(model: torch.nn.Module, old: torch.nn.Module, new: torch.nn.Module) -> None:
    """Every place `old` is registered (tied modules included) now holds `new`."""
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if child is old:
                setattr(parent, child_name, new)


# ---- which path -----------------------------------------------------------------------------------------------

# What torch.export says when the model's Python code needs a tensor's value (`.item()`, `.tolist()`,
# `.numpy()`, a branch or a size computed from data): the failures the eager path exists for.
_DATA_DEPENDENT = ("data-dependent", "data dependent", "unbacked", "non-nested symint",
                   ".numpy() is not supported for tensor subclasses", "_local_scalar_dense",
                   # an op export cannot trace through left its fake result as a graph constant (ZImage): the
                   # model's code, not the inputs, is what a graph cannot hold
                   "fake tensor in the exported program",
                   # a symbolic size handed to a library outside torch (Cosmos: np.sqrt of a numel ratio), which
                   # computes only with the size's value
                   "of type symfloat", "of type symint")


def data_dependent_failure(exc: BaseException) -> str | None:
    """The first line of the torch.export error behind `exc` when it is of the data-dependent kind, else None."""
    from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException
    from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        text = str(cause).strip()
        if not isinstance(cause, SvdqError) and (  # our own wrapper quotes the cause: read the cause
                isinstance(cause, (GuardOnDataDependentSymNode, DataDependentOutputException,
                                   DynamicOutputShapeException))
                or any(marker in text.lower() for marker in _DATA_DEPENDENT)):
            return text.splitlines()[0] if text else type(cause).__name__
        cause = cause.__cause__ or cause.__context__
    return None


# ---- the driver --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class EagerState:
    """What an eager-compiled model carries (`model.svdq_eager`): the compiled stub graph, its groups, the
    compile report, and why this path was taken."""

    stub: torch.fx.GraphModule
    groups: list[Group]
    report: dict[str, Any]


EAGER_ATTRIBUTE = "svdq_eager"


def is_eager(model: Any) -> bool:
    return isinstance(getattr(model, EAGER_ATTRIBUTE, None), EagerState)


def compile_report_of(compiled: Any) -> dict[str, Any]:
    """The compile report of what svdq_compiler.compile or load returned, whichever path made it."""
    from svdq_compiler.dropin import graph_module_of

    return getattr(compiled, EAGER_ATTRIBUTE).report if is_eager(compiled) else \
        graph_module_of(compiled).meta[REPORT_META]


def compile_eager(module: torch.nn.Module, example_inputs: tuple | dict, config: QuantConfig,
                  calib_inputs: Iterable[tuple | dict] | None = None, *, adapter: Any = None,
                  passes: Sequence[str] | None = None, reason: str = "the eager path was asked for",
                  verify: bool = False, dump_ir: str | Path | None = None, print_ir_after_change: bool = False,
                  progress: bool = False, save_calib: str | Path | None = None,
                  calib_stats: Any = None) -> torch.nn.Module:
    """Quantize `module` by module swap (module doc); returns `module` itself, changed in place: its eligible
    nn.Linear layers are SVDQLinear modules, and `module.svdq_eager` holds the report (`report["path"]` says
    "eager" and `report["path_reason"]` why). The options are svdq_compiler.compile's."""
    from svdq_compiler.api import compile_report
    from svdq_compiler.models import adapter_for

    if calib_stats is not None:
        raise InputError("saved calibration statistics name the sites of a captured graph; the eager path "
                         "calibrates its own group inputs", where="eager compile",
                         fix="pass calib_inputs (or none: the adapter's or the example inputs are used)")
    start = time.perf_counter()
    module = module.eval()
    adapter = adapter or adapter_for(module)
    infos, left_out = analyse(module, example_inputs, config, adapter)
    groups = _groups(infos)
    if not groups:
        raise InputError(f"no linear of {type(module).__name__} is quantized by preset {config.preset_name}",
                         where="eager compile", fix="check the role_schemes and skip patterns of the config")
    swapped = {f"{name}.{kind}" for group in groups for name in group.members for kind in ("weight", "bias")}
    carried = {name: t for name, t in module.state_dict().items() if name not in swapped}
    stub_module = _Stub(module, groups, carried)
    examples = ({g.input: module.get_submodule(g.members[0]).weight.new_zeros(4, g.in_features) for g in groups},)
    dims = [{g.input: {0: DynDim(f"rows{i}", 1, _MAX_ROWS, label=f"rows of {g.members[0]}")}
             for i, g in enumerate(groups)}]
    stub = capture(stub_module, examples, dynamic_shapes=dims)
    samples, source = _calibration_samples(module, example_inputs, calib_inputs, config, adapter)
    ctx = PassContext(config=config, example_inputs=examples, model=stub_module, verify_each=verify,
                      calib_inputs=_stub_inputs(module, groups, samples),
                      dump_dir=Path(dump_ir) if dump_ir is not None else None,
                      print_ir_after_change=print_ir_after_change, show_progress=progress)
    steps = [p for p in svdquant_pipeline(passes) if p.name != "annotate_linears"]
    stub = run_passes(stub, ctx, [_copy_annotations(infos), *steps])
    if save_calib is not None:
        from svdq_compiler.calibration import save_calibration

        if ctx.calibration is None:
            raise InputError("no calibration ran, so there are no statistics to save", where=str(save_calib),
                             fix="run the calibrate pass (leave it in --passes)")
        save_calibration(ctx.calibration, save_calib)
    report = compile_report(stub, config, ctx.records)
    report["path"] = "eager"
    report["path_reason"] = reason
    stub.meta[EAGER_META] = {"format": EAGER_FORMAT, "class": type(module).__name__, "config": model_config(module),
                             "groups": [dataclasses.asdict(g) for g in groups],
                             "carried": {name: f"{_CARRIED_PREFIX}.t{i}" for i, name in enumerate(carried)}}
    report["eager"] = {"class": type(module).__name__, "groups": len(groups),
                       "swapped_linears": sum(len(g.members) for g in groups), "calibration_source": source,
                       "kept_16bit": left_out + [f"{name}: {info.skip_reason}" for name, info in infos.items()
                                                 if info.scheme is not None and info.scheme.kind == "fp"],
                       "wall_s": round(time.perf_counter() - start, 3)}
    stub.meta[REPORT_META] = report
    _swap(module, stub, groups)
    setattr(module, EAGER_ATTRIBUTE, EagerState(stub, groups, report))
    _detach_stub(getattr(module, EAGER_ATTRIBUTE))
    return module


# ---- saving and loading ----------------------------------------------------------------------------------------


def _stub_tensors(stub: torch.fx.GraphModule, tensor_for: Any) -> None:
    """Every parameter and buffer of the stub replaced by `tensor_for(target, current)`, keeping its kind."""
    for kind in ("_parameters", "_buffers"):
        for module_name, module in stub.named_modules():
            for leaf, current in list(getattr(module, kind).items()):
                if current is not None:
                    value = tensor_for(f"{module_name}.{leaf}" if module_name else leaf, current)
                    getattr(module, kind)[leaf] = torch.nn.Parameter(value, requires_grad=False) \
                        if kind == "_parameters" else value


def _detach_stub(state: EagerState) -> None:
    """The stub keeps its graph and reports, not its tensors: the live ones are the group modules' and the
    model's (a later `model.to(device)` moves those; a stub copy would stay behind, twice the memory)."""
    metas: dict[int, torch.Tensor] = {}  # by identity: a tensor shared by two names stays one (parameter_bytes)
    _stub_tensors(state.stub, lambda target, current: metas.setdefault(
        id(current), torch.empty_like(current, device="meta")))


def stub_of(model: torch.nn.Module) -> torch.fx.GraphModule:
    """An eager-compiled model's stub graph and reports, its tensors on the meta device (for inspection)."""
    return getattr(model, EAGER_ATTRIBUTE).stub


@contextlib.contextmanager
def stub_with_tensors(model: torch.nn.Module) -> Iterator[torch.fx.GraphModule]:
    """What `svdq_compiler.save` writes for an eager-compiled model: its compiled stub graph with the model's
    live tensors (quantized linears from the group modules, the rest from its state dict), for the duration of
    the block; the extra file `svdq_eager.json` (from gm.meta[EAGER_META]) says how to rebuild the model
    around it (module doc)."""
    state: EagerState = getattr(model, EAGER_ATTRIBUTE)
    live: dict[str, torch.Tensor] = {}
    for module in model.modules():
        if isinstance(module, QuantizedGroup):
            live.update(module.graph_module.named_parameters(remove_duplicate=False))
            live.update(module.graph_module.named_buffers(remove_duplicate=False))
    model_state = model.state_dict()
    live.update({attr: model_state[name] for name, attr in state.stub.meta[EAGER_META]["carried"].items()})

    def tensor_for(target: str, current: torch.Tensor) -> torch.Tensor:
        if target not in live:
            raise CheckpointError(f"the eager model lost its tensor {target!r}", fix="compile it again")
        return live[target].detach()

    _stub_tensors(state.stub, tensor_for)
    try:
        yield state.stub
    finally:
        _detach_stub(state)


def _saved_layout(text: str, where: str) -> dict[str, Any]:
    """svdq_eager.json, checked to have the structure `rebuild` reads (a crafted file can hold any JSON)."""
    from svdq_compiler.archive import corrupt

    try:
        saved = json.loads(text)
        valid = isinstance(saved, dict) and saved.get("format") == EAGER_FORMAT \
            and isinstance(saved.get("class"), str) and isinstance(saved.get("config"), dict) \
            and isinstance(saved.get("carried"), dict) \
            and all(isinstance(k, str) and isinstance(v, str) for k, v in saved["carried"].items()) \
            and isinstance(saved.get("groups"), list) \
            and all(isinstance(g, dict) and isinstance(g.get("input"), str) and type(g.get("in_features")) is int
                    and isinstance(g.get("members"), list) and all(isinstance(m, str) for m in g["members"])
                    for g in saved["groups"])
    except (json.JSONDecodeError, TypeError, AttributeError, RecursionError) as exc:
        raise corrupt(f"{EAGER_FILE} is unreadable ({exc})", where) from exc
    if not valid:
        raise corrupt(f"{EAGER_FILE} lacks the expected fields", where)
    return saved


def rebuild(stub: torch.fx.GraphModule, text: str, where: str) -> torch.nn.Module:
    """The eager-compiled model a graph file with `svdq_eager.json` holds: the diffusers class built from its
    config with parameters on the meta device, the saved tensors assigned, the linears swapped."""
    import diffusers

    from svdq_compiler.ir import get_attr_value
    from svdq_compiler.models.loading import parameters_on_meta

    saved = _saved_layout(text, where)
    model_class = getattr(diffusers, saved["class"], None)
    if not (isinstance(model_class, type) and issubclass(model_class, diffusers.ModelMixin)):
        raise CheckpointError(f"the eager model's class {saved['class']!r} is not a diffusers model class of "
                              f"diffusers {diffusers.__version__}", where=where,
                              fix="load it with the diffusers version it was compiled with")
    try:
        with parameters_on_meta():
            model = model_class.from_config(saved["config"]).eval()
        state = {name: get_attr_value(stub, attr) for name, attr in saved["carried"].items()}
        groups = [Group(**g) for g in saved["groups"]]
        swapped = {f"{name}.{kind}" for g in groups for name in g.members for kind in ("weight", "bias")}
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    except (AttributeError, TypeError, ValueError, RuntimeError, KeyError) as exc:
        raise CheckpointError(f"the eager model could not be rebuilt: {str(exc).splitlines()[0]}", where=where,
                              fix="load it with the diffusers version it was compiled with") from exc
    left = sorted(set(missing) - swapped)
    if left or unexpected:
        raise CheckpointError(f"the saved tensors do not fit {saved['class']}: missing {left[:4]}, unexpected "
                              f"{sorted(unexpected)[:4]}", where=where,
                              fix="load it with the diffusers version it was compiled with")
    _swap(model, stub, groups)
    setattr(model, EAGER_ATTRIBUTE, EagerState(stub, groups, stub.meta.get(REPORT_META, {})))
    _detach_stub(getattr(model, EAGER_ATTRIBUTE))
    return model
