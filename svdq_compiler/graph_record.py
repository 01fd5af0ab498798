"""The graph of a graph file as svdq-compiler reads it back: `extra/svdq_graph.json`, a compact record of the
GraphModule that `ExportedProgram.module()` returns (the graph with its weights as attributes and the model's
call convention).

The record lists the nodes in order, each as `[name, op, target, args, kwargs]`; the kind of every attribute
the graph reads (parameter, buffer, non-persistent buffer, constant); the pytree specs and argument names of
the call convention; and the program's input guards (checked at each call by `InputGuards`). `load` rebuilds
the GraphModule from it directly, so torch's program deserializer is not involved: that is a private API
whose format changes between torch releases, and the largest cost of a load (it parses the program a second
time into schema objects, builds a fake tensor with symbolic sizes for every value and generates the module's
code twice).

Nothing in the record is code. Targets resolve from a fixed set (`archive_check.check_target`: aten, prims and
svdq operators, Python operators and math functions on sizes, torch's sym_* functions), arguments are data
(numbers, strings, dtypes, devices, layouts, memory formats, slices, lists and tuples of them, references to
earlier nodes), and the kernel specs of fused ops are checked as in the program (`check_kernel_spec`). torch
generates the module's code from the record, so every name that reaches that code is checked too: the call
convention's keyword names (written as string literals), argument and input names (which must not hide a
global of the code), and the arguments of each call (which must fit the operator's schema).
"""

from __future__ import annotations

import ast
import builtins
import inspect
import json
import keyword
import math
import operator
import re
from typing import Any, Callable

import torch
import torch.fx
import torch.utils._pytree as pytree

from svdq_compiler.archive_check import check_guard, check_kernel_spec, check_target, refuse
from svdq_compiler.errors import CheckpointError, InputError
from svdq_compiler.piecewise import PiecewiseGraphModule, argument_count, keywords

GRAPH_FILE = "svdq_graph.json"
RECORD_VERSION = 1
GUARDS_MODULE = "_guards_fn"  # the module that checks the input guards (torch's name for it)
ATTRIBUTE_KINDS = ("parameter", "buffer", "non_persistent_buffer", "constant")
_OPS = ("placeholder", "get_attr", "call_function", "output")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ATTRIBUTE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*")
_MEMORY_FORMATS = ("contiguous_format", "channels_last", "channels_last_3d", "preserve_format")


# ---- writing ----------------------------------------------------------------------------------------------

def graph_record(program: torch.export.ExportedProgram, guards: list[str]) -> dict[str, Any]:
    """The record of `program.module()` (its tensors may be on the meta device: only the graph is read), with
    the program's input guards as torch serializes them (`guards_code`)."""
    gm = program.module()
    kinds: dict[str, str] = {}
    for name, _ in gm.named_parameters(remove_duplicate=False):
        kinds[name] = "parameter"
    for name, _ in gm.named_buffers(remove_duplicate=False):
        owner, _, leaf = name.rpartition(".")
        transient = leaf in gm.get_submodule(owner)._non_persistent_buffers_set
        kinds[name] = "non_persistent_buffer" if transient else "buffer"
    nodes = []
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target == GUARDS_MODULE:
            continue
        if node.op not in _OPS:
            raise CheckpointError(f"the graph has a {node.op} node ({node.name}); a graph file holds operator calls "
                                  f"only", fix="report this: the compiled graph should be flat")
        if node.op == "get_attr":
            kinds.setdefault(node.target, "constant")
        target = torch.fx.node._get_qualified_name(node.target) if node.op == "call_function" else node.target
        nodes.append([node.name, node.op, target, _encode(node.args), _encode(dict(node.kwargs))])
    info = gm.graph._codegen.pytree_info
    return {"version": RECORD_VERSION, "arg_names": list(info.orig_args),
            "in_spec": pytree.treespec_dumps(info.in_spec), "out_spec": pytree.treespec_dumps(info.out_spec),
            "attributes": dict(sorted(kinds.items())), "nodes": nodes, "guards": list(guards)}


def _encode(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"float": repr(value)}
    if isinstance(value, torch.fx.Node):
        return {"node": value.name}
    if isinstance(value, (list, tuple)):
        return {"tuple" if isinstance(value, tuple) else "list": [_encode(item) for item in value]}
    if isinstance(value, dict) and all(isinstance(key, str) for key in value):
        return {"dict": {key: _encode(item) for key, item in value.items()}}
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"device": str(value)}
    if isinstance(value, torch.layout):
        return {"layout": str(value).removeprefix("torch.")}
    if isinstance(value, torch.memory_format):
        return {"memory_format": str(value).removeprefix("torch.")}
    if isinstance(value, slice):
        return {"slice": [_encode(value.start), _encode(value.stop), _encode(value.step)]}
    raise CheckpointError(f"a graph argument of type {type(value).__name__} ({str(value)[:60]}) cannot be saved",
                          fix="report this: compiled graphs hold tensors, numbers and names only")


# ---- reading ----------------------------------------------------------------------------------------------

def rebuild(text: bytes, tensors: dict[str, torch.Tensor], where: str, device: torch.device, *,
            check_guards: bool) -> torch.fx.GraphModule:
    """The GraphModule a record (`text`, its JSON) describes, its attributes taken from `tensors` (fqn → tensor,
    as loaded). The
    graph's device arguments name `device`, where its weights are (a graph file holds a one-device graph; what
    the graph creates, and its own dtype/device assertions, must match the weights wherever they are loaded).
    With `check_guards` the graph checks the program's input guards first, as `ExportedProgram.module()` does
    (`InputGuards`)."""
    try:
        record = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise refuse(f"{GRAPH_FILE} is not JSON ({str(exc)[:80]})", where) from None
    if not isinstance(record, dict) or record.get("version") != RECORD_VERSION:
        raise refuse(f"{GRAPH_FILE} is not a version-{RECORD_VERSION} graph record", where)
    try:
        names, kinds, nodes, guards = record["arg_names"], record["attributes"], record["nodes"], record["guards"]
        in_spec, out_spec = _spec(record["in_spec"]), _spec(record["out_spec"])
    except KeyError as exc:
        raise refuse(f"{GRAPH_FILE} lacks its call convention ({type(exc).__name__}: {exc})", where) from None
    if in_spec is None or out_spec is None or not _specs_are_data(in_spec) or not _specs_are_data(out_spec):
        raise refuse(f"{GRAPH_FILE} lacks its call convention (a spec that is not nested tuples, lists and "
                     f"dicts of named entries)", where)
    if not (isinstance(names, list) and all(isinstance(n, str) and _NAME.fullmatch(n) for n in names)
            and isinstance(kinds, dict) and isinstance(nodes, list) and isinstance(guards, list)):
        raise refuse(f"{GRAPH_FILE} is damaged", where)
    if len(names) != argument_count(in_spec) or names[len(names) - len(keywords(in_spec)):] != keywords(in_spec):
        raise refuse(f"{GRAPH_FILE} names the arguments {names[:8]} for a call convention of "
                     f"{argument_count(in_spec)} with the keywords {keywords(in_spec)[:8]}", where)
    root = torch.nn.Module()
    for fqn, kind in kinds.items():
        if not isinstance(fqn, str) or not _ATTRIBUTE.fullmatch(fqn) or kind not in ATTRIBUTE_KINDS:
            raise refuse(f"{GRAPH_FILE} names an attribute {str(fqn)[:80]!r} of kind {str(kind)[:20]!r}", where)
        if fqn not in tensors:
            raise refuse(f"the graph reads {fqn!r}, which the file holds no tensor for", where)
        try:
            _attach(root, fqn, tensors[fqn], kind)
        except (KeyError, TypeError, AttributeError) as exc:
            raise refuse(f"{GRAPH_FILE}: attribute {fqn!r} cannot be set ({str(exc)[:80]})", where) from None
    graph = torch.fx.Graph()
    graph._codegen = torch.fx.graph._PyTreeCodeGen(torch.fx.graph._PyTreeInfo(names, in_spec, out_spec))
    built: dict[str, torch.fx.Node] = {}
    produced: dict[str, Any] = {}  # node name → what it gives at a call (`_produces`)
    for item in nodes:
        if not (isinstance(item, list) and len(item) == 5 and isinstance(item[0], str) and _NAME.fullmatch(item[0])
                and item[1] in _OPS and isinstance(item[2], (str, type(None)))) or item[0] in built:
            raise refuse(f"{GRAPH_FILE} has a damaged node {str(item)[:80]}", where)
        name, op, target, args, kwargs = item
        decode = _decoder(built, device, where)
        args, kwargs = decode(args), decode(kwargs)
        if not isinstance(args, tuple) or not isinstance(kwargs, dict):
            raise refuse(f"{GRAPH_FILE}: node {name} has no argument list", where)
        if op == "call_function":
            target = _resolve(target, where)
            _check_spec(target, args, kwargs, where)
            _check_call(target, args, kwargs, name, where, produced)
        elif op == "get_attr" and target not in kinds:
            raise refuse(f"{GRAPH_FILE}: node {name} reads {str(target)[:80]!r}, which is not an attribute", where)
        elif op == "placeholder" and target != name:
            # The generated code binds each input to its target: a target that is not the node's own (legal,
            # unique) name could shadow a global of that code or another input.
            raise refuse(f"{GRAPH_FILE}: input node {name} is bound to {str(target)[:80]!r}", where)
        elif op == "output" and not (len(args) == 1 and isinstance(args[0], (list, tuple))
                                     and len(args[0]) == out_spec.num_leaves):
            raise refuse(f"{GRAPH_FILE}: the output does not have the {out_spec.num_leaves} values its call "
                         f"convention returns", where)
        built[name] = graph.create_node(op, target, args, kwargs, name=name)
        if built[name].name != name:
            raise refuse(f"{GRAPH_FILE}: node name {name!r} is taken", where)
        produced[name] = _produces(op, target, args, produced)
    # The parsed record (~1.3 KiB a node) goes before torch generates and compiles the forward's code, the
    # largest transient of a load (CPython's parser takes ~340 bytes per token of that code).
    del record, nodes
    if not built or next(reversed(built.values())).op != "output":
        raise refuse(f"{GRAPH_FILE} has no output", where)
    placeholders = [node for node in built.values() if node.op == "placeholder"]
    if len(placeholders) != in_spec.num_leaves:
        raise refuse(f"{GRAPH_FILE} has {len(placeholders)} inputs for a call convention of {in_spec.num_leaves}",
                     where)
    if check_guards and placeholders:
        if hasattr(root, GUARDS_MODULE):
            raise refuse(f"{GRAPH_FILE} names an attribute {GUARDS_MODULE}", where)
        root.add_module(GUARDS_MODULE, InputGuards(guards, names, in_spec, where))
        with graph.inserting_after(placeholders[-1]):
            graph.call_module(GUARDS_MODULE, tuple(placeholders))
    def unformed(exc: Exception) -> CheckpointError:  # consistent node by node, yet torch cannot generate its code
        return refuse(f"{GRAPH_FILE} does not form a graph ({type(exc).__name__}: {str(exc)[:120]})", where)

    # The argument names become the generated function's parameters: one named like a global of its code
    # (torch, a Python operator module) or a builtin would hide it. Checked before the code is compiled, while no
    # compiled piece holds memory yet (the check generates the code once more).
    try:
        code_globals = set(graph.python_code(root_module="self").globals)
    except Exception as exc:  # noqa: BLE001 -- whatever torch's code generation raises means the same
        raise unformed(exc) from None
    hidden = set(names) & (code_globals | set(dir(builtins)) | set(keyword.kwlist) | {"self"})
    if hidden:
        raise refuse(f"{GRAPH_FILE} names arguments the graph's code needs for itself: {sorted(hidden)[:4]}", where)
    try:
        gm = PiecewiseGraphModule(root, graph)
    except Exception as exc:  # noqa: BLE001
        raise unformed(exc) from None
    # GraphModule copies every tensor attribute as a persistent buffer: set the other kinds again.
    for fqn, kind in kinds.items():
        if kind in ("non_persistent_buffer", "constant"):
            _attach(gm, fqn, tensors[fqn], kind)
    return gm


def _spec(text: Any) -> pytree.TreeSpec | None:
    """The TreeSpec `text` describes, or None (torch's private parser raises whatever its schema walk meets)."""
    if not isinstance(text, str):
        return None
    try:
        return pytree.treespec_loads(text)
    except Exception:  # noqa: BLE001 -- any failure of the parser means the same: no call convention
        return None


_SPEC_TYPES = (tuple, list, dict)


def _specs_are_data(spec: pytree.TreeSpec) -> bool:
    """Whether a call-convention spec is nested tuples, lists and dicts whose keys are names: the generated code
    writes the keyword names of the inputs into its source as string literals."""
    if spec.is_leaf():
        return True
    if spec.type not in _SPEC_TYPES:
        return False
    if spec.type is dict and not all(isinstance(key, str) and _NAME.fullmatch(key) for key in spec.context):
        return False
    return all(_specs_are_data(child) for child in spec.children())


def _check_call(target: Callable, args: tuple, kwargs: dict, name: str, where: str,
                produced: dict[str, Any]) -> None:
    """The arguments of a call must bind to its target's signature (an operator's schema), and every tensor
    argument must be given a tensor, so that a crafted record is refused at load, naming the node, rather than
    failing inside torch at the first call."""
    if isinstance(target, torch._ops.OpOverload):
        schema = target._schema.arguments
        positional = [argument for argument in schema if not argument.kwarg_only]
        named = {argument.name for argument in schema}
        given = {argument.name for argument in positional[:len(args)]} | set(kwargs)
        required = {argument.name for argument in schema if not argument.has_default_value()}
        values = {**{argument.name: value for argument, value in zip(positional, args)}, **kwargs}
        if len(args) > len(positional) or not set(kwargs) <= named or \
                set(kwargs) & {argument.name for argument in positional[:len(args)]} or not required <= given:
            raise refuse(f"{GRAPH_FILE}: node {name} calls {target} with arguments that do not fit its schema "
                         f"{target._schema}", where)
        numbers = _takes_numbers_as_tensors(target)
        for argument in schema:
            if argument.name in values and not _binds(argument.type, values[argument.name], produced, numbers):
                raise refuse(f"{GRAPH_FILE}: node {name} passes {_describe(values[argument.name], produced)} as "
                             f"{argument.name!r} of {target}, which takes {argument.type}", where)
        return
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):  # a builtin without a signature: Python checks its arity at the call
        return
    try:
        signature.bind(*args, **kwargs)
    except TypeError as exc:
        raise refuse(f"{GRAPH_FILE}: node {name} calls {getattr(target, '__name__', target)} with arguments "
                     f"that do not fit it ({exc})", where) from None


# What a node gives at a call, as far as its target says: a tensor, a list of tensors, a number (a size), None,
# a tuple of these (an operator with several returns), or UNKNOWN (an input, or Python arithmetic on one).
TENSOR, TENSORS, NUMBER, NOTHING, UNKNOWN = "tensor", "tensors", "number", "none", "unknown"
_NUMBER_TYPES = (torch._C.IntType, torch._C.FloatType, torch._C.BoolType, torch._C.NumberType,
                 torch._C.SymIntType, torch._C.SymBoolType, torch._C.ComplexType)


def _type_gives(kind: torch._C.JitType) -> str:
    if isinstance(kind, torch._C.TensorType):
        return TENSOR
    if isinstance(kind, _NUMBER_TYPES):
        return NUMBER
    if isinstance(kind, torch._C.ListType) and isinstance(kind.getElementType(), torch._C.TensorType):
        return TENSORS
    return UNKNOWN


def _produces(op: str, target: Any, args: tuple, produced: dict[str, Any]) -> Any:
    if op == "get_attr":
        return TENSOR
    if op != "call_function":
        return UNKNOWN
    if isinstance(target, torch._ops.OpOverload):
        returns = [_type_gives(result.type) for result in target._schema.returns]
        return NOTHING if not returns else returns[0] if len(returns) == 1 else tuple(returns)
    if target is operator.getitem and len(args) == 2 and isinstance(args[0], torch.fx.Node) \
            and type(args[1]) is int:
        whole = produced.get(args[0].name, UNKNOWN)
        if whole == TENSORS:
            return TENSOR
        if isinstance(whole, tuple) and -len(whole) <= args[1] < len(whole):
            return whole[args[1]]
        return UNKNOWN
    # Python and torch.sym_* arithmetic: on sizes it gives a size; on anything else, whatever that gives.
    sizes = all(produced.get(arg.name) == NUMBER if isinstance(arg, torch.fx.Node)
                else isinstance(arg, (bool, int, float)) for arg in args)
    return NUMBER if sizes else UNKNOWN


def _takes_numbers_as_tensors(target: torch._ops.OpOverload) -> bool:
    """Whether torch binds a Python number to a tensor argument of `target` (a 0-d tensor, as in
    `mul.Tensor(x, 2)`): prims, and the aten arithmetic torch lists (as torch's own binding decides)."""
    return target.namespace == "prims" or (target.namespace == "aten"
                                           and torch._C._should_allow_numbers_as_tensors(target._opname))


def _binds(kind: torch._C.JitType, value: Any, produced: dict[str, Any], numbers: bool) -> bool:
    """Whether `value` can be passed where a schema takes `kind`; only tensor arguments (Tensor, Tensor?,
    Tensor[], Tensor?[]) are checked: torch converts the others (sizes, scalars, dtypes) at the call."""
    if isinstance(kind, torch._C.OptionalType):
        element = kind.getElementType()
        if value is None or (isinstance(value, torch.fx.Node) and produced.get(value.name) == NOTHING):
            return True
        return _binds(element, value, produced, numbers)
    if isinstance(kind, torch._C.TensorType):
        gives = produced.get(value.name, UNKNOWN) if isinstance(value, torch.fx.Node) \
            else NUMBER if isinstance(value, (bool, int, float)) else None
        return gives in (TENSOR, UNKNOWN) or (gives == NUMBER and numbers)
    if isinstance(kind, torch._C.ListType) and isinstance(kind.getElementType(),
                                                          (torch._C.TensorType, torch._C.OptionalType)):
        if isinstance(value, torch.fx.Node):
            return produced.get(value.name, UNKNOWN) in (TENSORS, UNKNOWN)
        return isinstance(value, (list, tuple)) and all(_binds(kind.getElementType(), item, produced, numbers)
                                                        for item in value)
    return True


def _describe(value: Any, produced: dict[str, Any]) -> str:
    if isinstance(value, torch.fx.Node):
        gives = produced.get(value.name, UNKNOWN)
        what = {NUMBER: "a number (a size)", NOTHING: "nothing", TENSORS: "a list of tensors"}.get(gives, "a tuple")
        return f"{what} (node {value.name})"
    return f"{type(value).__name__} {str(value)[:40]!r}"


def _attach(root: torch.nn.Module, fqn: str, tensor: torch.Tensor, kind: str) -> None:
    *path, leaf = fqn.split(".")
    owner = root
    for part in path:
        if not hasattr(owner, part):
            owner.add_module(part, torch.nn.Module())
        owner = getattr(owner, part)
        if not isinstance(owner, torch.nn.Module):
            raise TypeError(f"{part!r} is not a module")
    if kind == "parameter":
        owner.register_parameter(leaf, tensor if isinstance(tensor, torch.nn.Parameter)
                                 else torch.nn.Parameter(tensor, requires_grad=False))
    elif kind == "constant":
        if leaf in owner._buffers:
            delattr(owner, leaf)
        setattr(owner, leaf, tensor.detach() if isinstance(tensor, torch.nn.Parameter) else tensor)
    else:
        owner.register_buffer(leaf, tensor.detach(), persistent=kind == "buffer")


_MAX_NESTING = 32  # compiled graphs nest arguments a few levels (an output tuple of tuples); deeper is crafted


def _decoder(built: dict[str, torch.fx.Node], device: torch.device | None, where: str) -> Callable[[Any], Any]:
    def decode(value: Any, depth: int = 0) -> Any:
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if depth > _MAX_NESTING:
            raise refuse(f"{GRAPH_FILE} nests arguments more than {_MAX_NESTING} deep", where)
        if not isinstance(value, dict) or len(value) != 1:
            raise refuse(f"{GRAPH_FILE} holds an argument that is not data: {str(value)[:80]}", where)
        (kind, data), = value.items()
        if kind == "node" and isinstance(data, str) and data in built:
            return built[data]
        if kind in ("list", "tuple") and isinstance(data, list):
            items = [decode(item, depth + 1) for item in data]
            return items if kind == "list" else tuple(items)
        if kind == "dict" and isinstance(data, dict):
            return {key: decode(item, depth + 1) for key, item in data.items()}
        if kind == "float" and data in ("inf", "-inf", "nan"):
            return float(data)
        if kind == "dtype" and isinstance(getattr(torch, str(data), None), torch.dtype):
            return getattr(torch, data)
        if kind == "layout" and isinstance(getattr(torch, str(data), None), torch.layout):
            return getattr(torch, data)
        if kind == "memory_format" and data in _MEMORY_FORMATS:
            return getattr(torch, data)
        if kind == "slice" and isinstance(data, list) and len(data) == 3:
            return slice(*(decode(item, depth + 1) for item in data))
        if kind == "device" and isinstance(data, str) and re.fullmatch(r"(cpu|cuda|meta)(:\d{1,2})?", data):
            return torch.device(data) if data == "meta" else device
        raise refuse(f"{GRAPH_FILE} holds an argument that is not data: {str(value)[:80]}", where)

    return decode


class InputGuards(torch.nn.Module):
    """The input guards of the exported program (relations between input sizes torch.export assumed, e.g.
    `L['img_ids'].size()[0] == L['hidden_states'].size()[1]`), checked at every call by walking each guard's
    syntax tree: `check_guard` allowed only size arithmetic and comparisons of inputs, and nothing is compiled
    or executed from the file. (`ExportedProgram.module()` generates Python code from the same strings.)"""

    def __init__(self, guards: list[Any], names: list[str], in_spec: pytree.TreeSpec, where: str):
        super().__init__()
        for guard in guards:
            check_guard(guard, where)
        self.guards = list(guards)
        self.trees = [ast.parse(guard, mode="eval").body for guard in guards]
        self.names, self.in_spec = names, in_spec

    def forward(self, *leaves: Any) -> None:
        args, kwargs = pytree.tree_unflatten(list(leaves), self.in_spec)
        inputs = {**dict(zip(self.names, args)), **kwargs}
        for text, tree in zip(self.guards, self.trees):
            try:
                holds = _evaluate(tree, inputs)
            except (KeyError, IndexError, TypeError, AttributeError, ZeroDivisionError) as exc:
                raise InputError(f"the inputs cannot be checked against the guard {text} ({exc!r})",
                                 where="graph call", fix="pass the inputs the graph was captured with") from None
            if not holds:
                raise InputError(f"the inputs break a size relation the graph was captured with: {text}",
                                 where="graph call", fix="give the inputs sizes that satisfy it")


_GUARD_FUNCTIONS: dict[str, Callable] = {
    "max": max, "min": min, "sympy_max": max, "sympy_min": min, "Eq": operator.eq, "Ne": operator.ne,
    "Mod": operator.mod, "PythonMod": operator.mod, "FloorDiv": operator.floordiv,
    "CeilDiv": lambda a, b: -(-a // b)}
_GUARD_CONSTANTS = {"True": True, "False": False, "inf": math.inf}
_GUARD_TENSOR_METHODS = {"size", "stride", "storage_offset", "dim", "numel"}
_GUARD_MATH = {"floor": math.floor, "ceil": math.ceil, "trunc": math.trunc}
_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
           ast.LShift: operator.lshift, ast.RShift: operator.rshift, ast.BitAnd: operator.and_,
           ast.BitOr: operator.or_, ast.BitXor: operator.xor}
_UNARY = {ast.Not: operator.not_, ast.USub: operator.neg, ast.UAdd: operator.pos, ast.Invert: operator.invert}
_COMPARE = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
            ast.Gt: operator.gt, ast.GtE: operator.ge, ast.Is: operator.is_, ast.IsNot: operator.is_not}


def _evaluate(node: ast.AST, inputs: dict[str, Any]) -> Any:
    """The value of a guard's (checked) syntax tree for these inputs."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        return inputs if node.id == "L" else _GUARD_CONSTANTS[node.id]
    if isinstance(node, ast.Subscript):
        return _evaluate(node.value, inputs)[node.slice.value]
    if isinstance(node, ast.Tuple):
        return tuple(_evaluate(item, inputs) for item in node.elts)
    if isinstance(node, ast.BinOp):
        return _BINARY[type(node.op)](_evaluate(node.left, inputs), _evaluate(node.right, inputs))
    if isinstance(node, ast.UnaryOp):
        return _UNARY[type(node.op)](_evaluate(node.operand, inputs))
    if isinstance(node, ast.BoolOp):
        values = (_evaluate(value, inputs) for value in node.values)
        return all(values) if isinstance(node.op, ast.And) else any(values)
    if isinstance(node, ast.Compare):
        left = _evaluate(node.left, inputs)
        for op, comparator in zip(node.ops, node.comparators):
            right = _evaluate(comparator, inputs)
            if not _COMPARE[type(op)](left, right):
                return False
            left = right
        return True
    if isinstance(node, ast.Call):
        args = [_evaluate(arg, inputs) for arg in node.args]
        func = node.func
        if isinstance(func, ast.Name):
            return _GUARD_FUNCTIONS[func.id](*args)
        if isinstance(func.value, ast.Name) and func.value.id == "math":
            return _GUARD_MATH[func.attr](*args)
        owner = _evaluate(func.value, inputs)
        if func.attr not in _GUARD_TENSOR_METHODS or not isinstance(owner, torch.Tensor):
            raise TypeError(f"{func.attr} of {type(owner).__name__}")
        return getattr(owner, func.attr)(*args)
    raise TypeError(f"unexpected {type(node).__name__}")


_PYTHON_FUNCTIONS = {"_operator": operator, "math": math}


def _resolve(target: Any, where: str) -> Callable:
    """The callable a target names, after `check_target` allowed the name (never a general attribute walk)."""
    if not isinstance(target, str):
        raise refuse(f"{GRAPH_FILE}: a call has no target", where)
    check_target(target, where)
    parts = target.split(".")
    if parts[:2] == ["torch", "ops"]:
        try:
            resolved = getattr(getattr(getattr(torch.ops, parts[2]), parts[3]), parts[4])
        except (AttributeError, RuntimeError):
            resolved = None
        if not isinstance(resolved, torch._ops.OpOverload):
            raise refuse(f"the graph calls {target!r}, which this torch does not have", where)
        return resolved
    if parts[0] in _PYTHON_FUNCTIONS:
        return getattr(_PYTHON_FUNCTIONS[parts[0]], parts[1])
    resolved = getattr(torch, parts[1], None)  # torch.sym_* and torch._check, as check_target allowed
    if not callable(resolved):
        raise refuse(f"the graph calls {target!r}, which this torch does not have", where)
    return resolved


def _check_spec(target: Callable, args: tuple, kwargs: dict, where: str) -> None:
    """The kernel spec of a fused op, from which code is generated, must be plain words and numbers."""
    if not isinstance(target, torch._ops.OpOverload) or target.namespace != "svdq" or \
            not target._opname.startswith("fused_"):
        return
    names = [argument.name for argument in target._schema.arguments]
    if "spec" in kwargs:
        check_kernel_spec(kwargs["spec"], where)
    elif "spec" in names and names.index("spec") < len(args):
        check_kernel_spec(args[names.index("spec")], where)
    else:
        raise refuse(f"a call of {target} has no kernel spec", where)
