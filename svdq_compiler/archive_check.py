"""Refusing graph files that could run code when loaded (called by `serialize.load`).

`torch.export.load` is not safe on an untrusted file (its own docstring says so). On torch 2.9–2.13 a PT2
archive reaches code execution through:
- a weight or constant whose payload config says `use_pickle`: `torch.load(weights_only=False)`;
- a legacy `data/weights/<model>.pt` or `data/constants/<model>.pt`, custom-object (`custom_obj_*`, torchbind
  pickles) and opaque-object (`opaque_obj_*`, `pickle.loads`) constants;
- the sample inputs `data/sample_inputs/<model>.pt`: tried with `weights_only=True`, then *retried with
  weights_only=False* when that fails;
- `expr_str` of symbolic sizes in `models/<model>.json`: `sympy.sympify`, which `eval`s the string;
- `guards_code` in the same file: pasted into Python source that `ep.module()` `exec`s (and runs on every call);
- node targets: resolved by walking attributes of `torch`, `operator` and `math` (`torch.os.system` is one);
- our own fused ops' kernel specs: Triton source is generated from them and imported;
- the pre-2.7 zip layout, which torch falls back to when the PT2 reader fails, with the same pickles.

`check_archive(archive)` inspects the file before torch sees any of it, with the standard library only (zipfile, json,
ast), and refuses anything outside what our saves write: a fixed set of entry names, payloads that are raw
tensor bytes, sample inputs that load with `weights_only=True`, size expressions in sympy's `srepr` grammar
(Symbol/Integer/Add/Mul/… with literal arguments), guards that are comparisons of input sizes (nested dict and
list inputs included), node targets that are aten/prims/svdq operators or symbolic-size arithmetic, and kernel
specs of short words and numbers. The loader checks every entry's digest first and hands torch the entries it
read (never the path), so what was checked is what is loaded.
"""

from __future__ import annotations

import ast
import io
import json
import math
import re
from typing import TYPE_CHECKING, Any, Callable

from svdq_compiler.errors import CheckpointError

if TYPE_CHECKING:
    from svdq_compiler.archive import GraphArchive

# Entries a PT2 archive of one program holds, below its single top-level folder.
_FIXED_ENTRIES = {"archive_format", "archive_version", "byteorder", ".data/version", ".data/serialization_id",
                  "models/model.json", "data/weights/model_weights_config.json",
                  "data/constants/model_constants_config.json", "data/sample_inputs/model.pt"}
_WEIGHT_RECORD = re.compile(r"weight_\d+")
_CONSTANT_RECORD = re.compile(r"tensor_\d+")
_EXTRA_ENTRY = re.compile(r"extra/[A-Za-z0-9_.-]+")  # read as text only, never executed

_OPERATOR_NAMESPACES = ("aten", "prims", "svdq")
_DENIED_OPERATORS = {"from_file"}  # reads a file named by the graph
_PYTHON_OPERATORS = {"getitem", "add", "sub", "mul", "floordiv", "truediv", "mod", "pow", "neg", "pos", "abs",
                     "eq", "ne", "lt", "le", "gt", "ge", "and_", "or_", "xor", "not_", "invert", "lshift",
                     "rshift"}
_MATH_FUNCTIONS = {"ceil", "floor", "trunc", "sqrt", "exp", "log", "log2", "pow", "fabs", "isnan", "isinf"}
_SYM_FUNCTION = re.compile(r"torch\.(_?sym_[a-z_]+|_check|_check_is_size)")

# sympy srepr: constructors with literal arguments; torch's own sympy functions as in its deserializer.
_SYMPY_CONSTRUCTORS = {
    "Symbol", "Integer", "Rational", "Float", "Add", "Mul", "Pow", "Max", "Min", "Mod", "Abs", "Eq", "Ne", "Lt",
    "Le", "Gt", "Ge", "StrictLessThan", "StrictGreaterThan", "LessThan", "GreaterThan", "Equality",
    "Unequality", "And", "Or", "Not", "Piecewise", "ExprCondPair", "floor", "ceiling", "sqrt",
    "FloorDiv", "ModularIndexing", "Where", "PythonMod", "CleanDiv", "CeilToInt", "FloorToInt", "CeilDiv",
    "LShift", "RShift", "PowByNatural", "FloatPow", "FloatTrueDiv", "IntTrueDiv",
    "IsNonOverlappingAndDenseIndicator", "TruncToFloat", "TruncToInt", "RoundToInt", "RoundDecimal", "ToFloat",
    "Identity"}
_SYMPY_CONSTANTS = {"oo", "zoo", "nan", "true", "false", "S", "Half", "One", "Zero", "NegativeOne",
                    "Infinity", "NegativeInfinity", "BooleanTrue", "BooleanFalse"}
_SYMPY_ASSUMPTIONS = {"positive", "negative", "integer", "real", "nonnegative", "nonpositive", "finite",
                      "zero", "nonzero", "odd", "even", "precision", "evaluate"}
_SPEC_WORD = re.compile(r"[A-Za-z0-9_]{1,40}")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_DICT_KEY = re.compile(r"[A-Za-z0-9_]{1,100}")  # a key of a nested input dict, as a guard spells it
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")

# Guards: boolean expressions over input sizes, e.g. "(L['x'].size()[2] // 2) != 1".
_GUARD_NAMES = {"L", "max", "min", "math", "Eq", "Ne", "Mod", "FloorDiv", "CeilDiv", "PythonMod", "sympy_max",
                "sympy_min", "True", "False", "inf"}
_GUARD_METHODS = {"size", "stride", "storage_offset", "dim", "numel", "floor", "ceil", "trunc"}
_SAFE_NODES = (ast.Expression, ast.Constant, ast.Load, ast.UnaryOp, ast.BinOp, ast.BoolOp, ast.Compare,
               ast.operator, ast.unaryop, ast.boolop, ast.cmpop, ast.Tuple)


def refuse(what: str, where: str) -> CheckpointError:
    return CheckpointError(f"refusing to load: {what}", where=where,
                           fix="load only graph files written by svdq-compile / svdq_compiler.save; a graph file "
                               "never needs pickled objects or code")


def check_archive(archive: "GraphArchive") -> tuple[tuple, dict]:
    """Raise CheckpointError unless `archive` (an opened graph file) is a PT2 archive that loads without running
    anything it contains (module docstring); return its example inputs, (args, kwargs). Reads the small entries
    only, never the tensor records."""
    where = archive.where
    _, entries = _entries(archive.zip.namelist(), where)
    read = archive.read
    weights = _payload_config(read, "data/weights/model_weights_config.json", _WEIGHT_RECORD, where)
    constants = _payload_config(read, "data/constants/model_constants_config.json", _CONSTANT_RECORD, where)
    records = {e for e in entries if e.startswith("data/weights/weight_")} | \
              {e for e in entries if e.startswith("data/constants/tensor_")}
    named = {f"data/weights/{r}" for r in weights} | {f"data/constants/{r}" for r in constants}
    if records - named:
        raise refuse(f"payload records no config describes: {sorted(records - named)[:4]}", where)
    if named - records:
        raise refuse(f"the payload config names missing records: {sorted(named - records)[:4]}", where)
    _check_program(read("models/model.json"), where)
    return _sample_inputs(read("data/sample_inputs/model.pt"), where)


def _entries(names: list[str], where: str) -> tuple[str, set[str]]:
    roots = {name.split("/", 1)[0] for name in names}
    if len(roots) != 1 or any("/" not in name for name in names):
        raise refuse(f"not a single-program PT2 archive (top-level entries {sorted(roots)[:4]})", where)
    root = roots.pop()
    entries = {name.split("/", 1)[1] for name in names}
    for entry in entries:
        folder, _, leaf = entry.rpartition("/")
        allowed = entry in _FIXED_ENTRIES or _EXTRA_ENTRY.fullmatch(entry) or \
            (folder == "data/weights" and _WEIGHT_RECORD.fullmatch(leaf)) or \
            (folder == "data/constants" and _CONSTANT_RECORD.fullmatch(leaf))
        if not allowed:
            raise refuse(f"unexpected archive entry {entry!r} (pickled weights, custom objects and compiled "
                         f"code are never loaded)", where)
    missing = sorted(_FIXED_ENTRIES - {".data/serialization_id"} - entries)
    if missing:
        raise refuse(f"the archive lacks {missing}", where)
    return root, entries


def _json(raw: bytes, entry: str, where: str) -> Any:
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise refuse(f"{entry} is not valid JSON ({exc})", where) from None


def _payload_config(read: Callable[[str], bytes], entry: str, record: re.Pattern, where: str) -> set[str]:
    """The raw-tensor records a weights/constants config names; any pickled payload is refused."""
    config = _json(read(entry), entry, where)
    payloads = config.get("config") if isinstance(config, dict) else None
    if not isinstance(payloads, dict):
        raise refuse(f"{entry} has no payload table", where)
    names = set()
    for fqn, meta in payloads.items():
        if not isinstance(meta, dict) or meta.get("use_pickle") is not False or \
                not isinstance(meta.get("tensor_meta"), dict):
            raise refuse(f"{fqn!r} in {entry} is a pickled object, not raw tensor bytes", where)
        path_name = meta.get("path_name")
        if not isinstance(path_name, str) or not record.fullmatch(path_name):
            raise refuse(f"{fqn!r} in {entry} points at {path_name!r}", where)
        names.add(path_name)
    return names


def _sample_inputs(raw: bytes, where: str) -> tuple[tuple, dict]:
    """The sample inputs, (args, kwargs), read with weights_only=True (the restricted unpickler accepts tensors,
    containers and numbers only; torch's own reader would retry with weights_only=False)."""
    import torch

    try:
        inputs = torch.load(io.BytesIO(raw), weights_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise refuse(f"the sample inputs are not plain tensors ({first[:200]})", where) from None
    if not (isinstance(inputs, tuple) and len(inputs) == 2 and isinstance(inputs[0], tuple)
            and isinstance(inputs[1], dict)):
        raise refuse("the sample inputs are not (args, kwargs)", where)
    return inputs


class _Checked:
    """What `_check_program` leaves of a JSON object it has checked (the program's tree is never built)."""


_CHECKED, _PROGRAM = _Checked(), _Checked()


def _check_program(raw: bytes, where: str) -> None:
    """Check models/model.json without building its tree (a 1 MB program parses into ~7 MiB of objects, the
    largest cost of a small graph's load): json calls the hook for each object once its members are decoded,
    innermost first; the hook checks what torch would resolve or evaluate and returns a stand-in. Only a node's
    arguments live until their node is checked (for the kernel spec of a fused op)."""

    def check(pairs: list[tuple[str, Any]]) -> Any:
        members = dict(pairs)
        target = members.get("target")
        if isinstance(target, str):
            check_target(target, where)
            if target.startswith("torch.ops.svdq.fused_"):
                inputs = members.get("inputs")
                for item in inputs if isinstance(inputs, list) else []:
                    if isinstance(item, dict) and item.get("name") == "spec":
                        argument = item.get("arg")
                        check_kernel_spec(argument.get("as_string") if isinstance(argument, dict) else None, where)
        if "expr_str" in members:
            check_size_expression(members["expr_str"], where)
        if "graph_module" in members:
            if members["graph_module"] is not _CHECKED:
                raise refuse("models/model.json is not a serialized ExportedProgram", where)
            guards = members.get("guards_code") or []
            if not isinstance(guards, list):
                raise refuse("guards_code is not a list", where)
            for guard in guards:
                check_guard(guard, where)
            return _PROGRAM
        if "as_string" in members or ("name" in members and "arg" in members):  # a node's argument
            return members
        return _CHECKED

    try:
        program = json.loads(raw, object_pairs_hook=check)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise refuse(f"models/model.json is not valid JSON ({exc})", where) from None
    if program is not _PROGRAM:
        raise refuse("models/model.json is not a serialized ExportedProgram", where)


def check_kernel_spec(text: Any, where: str) -> None:
    """A fused op's kernel spec, from which code is generated: JSON whose strings are short words and whose
    other values are numbers, booleans and null (codegen then checks what they mean)."""
    try:
        spec = json.loads(text) if isinstance(text, str) else None
    except json.JSONDecodeError:
        spec = None
    if not isinstance(spec, dict):
        raise refuse(f"a kernel spec is not a JSON object: {str(text)[:80]!r}", where)

    def visit(value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                if not _SPEC_WORD.fullmatch(key):
                    raise refuse(f"kernel spec key {key[:40]!r}", where)
                visit(item)
        elif isinstance(value, list):
            for item in value:
                visit(item)
        elif isinstance(value, str):
            if not _SPEC_WORD.fullmatch(value):
                raise refuse(f"kernel spec value {value[:40]!r} is not a format, dtype or epilogue name", where)
        elif isinstance(value, float) and not math.isfinite(value):
            raise refuse("a kernel spec number is not finite", where)

    visit(spec)


def check_target(target: str, where: str) -> None:
    """A node target the deserializer resolves by attribute lookup: only operators and size arithmetic."""
    parts = target.split(".")
    if len(parts) == 5 and parts[:2] == ["torch", "ops"] and parts[2] in _OPERATOR_NAMESPACES and \
            all(_IDENTIFIER.fullmatch(p) for p in parts[3:]) and parts[3] not in _DENIED_OPERATORS:
        return
    if len(parts) == 2 and ((parts[0] == "_operator" and parts[1] in _PYTHON_OPERATORS)
                            or (parts[0] == "math" and parts[1] in _MATH_FUNCTIONS)):
        return
    if _SYM_FUNCTION.fullmatch(target):
        return
    raise refuse(f"the graph calls {target[:120]!r}, which is not an aten, prims or svdq operator", where)


def _parse(text: Any, what: str, where: str) -> ast.Expression:
    if not isinstance(text, str) or len(text) > 100_000:
        raise refuse(f"a {what} is not a string", where)
    try:
        return ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError):
        raise refuse(f"the {what} {text[:120]!r} is not an expression", where) from None


def _visit_leaf(node: ast.AST, names, constant_ok: Callable[[Any], bool], visit, bad) -> None:
    """The part the expression checks share: a name from `names`, a constant `constant_ok` accepts, or one of
    the arithmetic and comparison nodes (`_SAFE_NODES`), whose children are visited; anything else is refused."""
    if isinstance(node, ast.Name):
        if node.id not in names:
            raise bad(node)
    elif isinstance(node, ast.Constant):
        if not constant_ok(node.value):
            raise bad(node)
    elif isinstance(node, _SAFE_NODES):
        for child in ast.iter_child_nodes(node):
            visit(child)
    else:
        raise bad(node)


def check_size_expression(text: Any, where: str) -> None:
    """A symbolic size as sympy's srepr writes it, e.g. "Mul(Integer(64), Symbol('s27', positive=True))":
    sympify evaluates it, so only constructors of this grammar with literal arguments pass."""
    tree = _parse(text, "size expression", where)

    def bad(node: ast.AST) -> CheckpointError:
        return refuse(f"size expression {text[:120]!r} contains {ast.dump(node)[:80]}", where)

    def visit(node: ast.AST, string_ok: re.Pattern | None = None) -> None:
        if isinstance(node, ast.Call):
            if not isinstance(node.func, ast.Name) or node.func.id not in _SYMPY_CONSTRUCTORS:
                raise bad(node)
            literal = {"Symbol": _IDENTIFIER, "Float": _NUMBER, "Integer": _NUMBER, "Rational": _NUMBER}
            for arg in node.args:
                visit(arg, literal.get(node.func.id))
            for keyword in node.keywords:
                if keyword.arg not in _SYMPY_ASSUMPTIONS:
                    raise bad(node)
                visit(keyword.value)
        else:
            _visit_leaf(node, _SYMPY_CONSTANTS, lambda value: value is None or isinstance(value, (bool, int, float))
                        or (isinstance(value, str) and string_ok is not None and bool(string_ok.fullmatch(value))),
                        visit, bad)

    visit(tree)


def _is_input_path(node: ast.AST) -> bool:
    """`L['name']` and the nested inputs below it: `L['kwargs']['text_embeds']`, `L['args'][0]`, ...

    The input name is an identifier; a dict key below it is a word that is not a dunder name, a list or tuple
    index a non-negative int. Nothing in a path can close the quoted message torch writes around the guard, and
    a subscript of a plain dict, list or tuple runs no code (attribute access and calls are not paths)."""
    if not isinstance(node, ast.Subscript) or not isinstance(node.slice, ast.Constant):
        return False
    key = node.slice.value
    if isinstance(node.value, ast.Name) and node.value.id == "L":
        return isinstance(key, str) and bool(_IDENTIFIER.fullmatch(key))
    if isinstance(key, str):
        ok = bool(_DICT_KEY.fullmatch(key)) and not key.startswith("__")
    else:
        ok = type(key) is int and key >= 0
    return ok and _is_input_path(node.value)


def check_guard(text: Any, where: str) -> None:
    """A guard torch pastes into generated code: arithmetic and comparisons of the sizes of inputs, nested ones
    included (`L['added_cond_kwargs']['text_embeds'].size()[0]`, see `_is_input_path`)."""
    tree = _parse(text, "guard", where)

    def bad(node: ast.AST) -> CheckpointError:
        return refuse(f"guard {str(text)[:120]!r} contains {ast.dump(node)[:80]}", where)

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Attribute):
                if func.attr not in _GUARD_METHODS:
                    raise bad(node)
                visit(func.value)
            elif not (isinstance(func, ast.Name) and func.id in _GUARD_NAMES):
                raise bad(node)
            if node.keywords:
                raise bad(node)
            for arg in node.args:
                visit(arg)
        elif isinstance(node, ast.Subscript):
            if _is_input_path(node):
                return
            # anything else indexed is a size or stride tuple (`.size()[2]`), by a dimension
            key = node.slice
            if not (isinstance(key, ast.Constant) and type(key.value) is int and key.value >= 0) or \
                    not isinstance(node.value, ast.Call):
                raise bad(node)
            visit(node.value)
        else:
            _visit_leaf(node, _GUARD_NAMES, lambda value: isinstance(value, (bool, int, float)), visit, bad)

    visit(tree)
