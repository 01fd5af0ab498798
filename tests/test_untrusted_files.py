"""A graph file must not run code when loaded. Each hostile archive below carries a payload that creates a
file; plain `torch.export.load` (and running what it returns) does create it — so the vector is real on this
torch — while `svdq_compiler.load` refuses the archive with a CheckpointError and nothing is created."""

import io
import json
import pickle
import re

import pytest
import torch

import svdq_compiler
from svdq_compiler import archive_check
from svdq_compiler.errors import CheckpointError
from svdq_compiler.graph_record import GRAPH_FILE
from svdq_compiler.models import DynDim
from graph_files import rewrite_archive


class Scaled(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, x):
        return self.proj(x) * 2


@pytest.fixture(scope="module")
def graph_file(tmp_path_factory):
    gm = svdq_compiler.capture(Scaled(), {"x": torch.randn(2, 6, 8)},
                               dynamic_shapes={"x": {1: DynDim("tokens", 2, 64, label="tokens")}})
    return svdq_compiler.save(gm, tmp_path_factory.mktemp("graph") / "graph.pt")


class CreatesFile:
    """Unpickling this creates `path` (the stand-in for arbitrary code)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def touch_code(path) -> str:
    return f"__import__('pathlib').Path({str(path)!r}).touch()"


def edit_json(entry_suffix, change):
    def edit(name, data):
        if name.endswith(entry_suffix):
            value = json.loads(data)
            change(value)
            return json.dumps(value).encode()
        return data
    return edit


def pickled_weight(marker):
    def change(config):
        meta = config["config"]["proj.weight"]
        meta["use_pickle"] = True
    payload = pickle.dumps(CreatesFile(marker))

    def edit(name, data):
        if name.endswith("model_weights_config.json"):
            return edit_json("model_weights_config.json", change)(name, data)
        if name == "data/weights/weight_0":
            return payload
        return data
    return edit


def hostile_sample_inputs(marker):
    buffer = io.BytesIO()
    torch.save(((CreatesFile(marker),), {}), buffer)
    return lambda name, data: buffer.getvalue() if name == "data/sample_inputs/model.pt" else data


def hostile_size_expression(marker):
    def change(program):
        values = program["graph_module"]["graph"]["tensor_values"]
        size = next(s for v in values.values() for s in v["sizes"] if "as_expr" in s)
        size["as_expr"]["expr_str"] = f"Add(Symbol('s0', positive=True), 0*len(str({touch_code(marker)})))"
    return edit_json("models/model.json", change)


def hostile_guard(marker):
    def change(program):
        program["guards_code"] = [f"({touch_code(marker)}) is None"]
    return edit_json("models/model.json", change)


def run_plain_torch(path):
    program = torch.export.load(io.BytesIO(path.read_bytes()))
    program.module()(x=torch.randn(2, 6, 8))


@pytest.mark.parametrize("make_edit", [pickled_weight, hostile_sample_inputs, hostile_size_expression,
                                       hostile_guard], ids=["pickled-weight", "sample-inputs", "size-expr", "guard"])
def test_hostile_archive_runs_code_in_torch_but_is_refused_here(graph_file, tmp_path, make_edit):
    marker = tmp_path / "code-ran"
    hostile = rewrite_archive(graph_file, tmp_path / "hostile.pt", make_edit(marker))
    with pytest.raises(CheckpointError, match="refusing to load"):
        svdq_compiler.load(hostile)
    assert not marker.exists()
    try:
        run_plain_torch(hostile)
    except Exception:
        pass  # the payload ran (or not) before torch noticed anything wrong
    assert marker.exists(), "the payload should run under plain torch.export.load; the test would prove nothing"


@pytest.mark.parametrize("entry", ["data/weights/model.pt", "data/constants/custom_obj_0",
                                   "data/constants/opaque_obj_0", "data/aotinductor/model/model.so",
                                   "serialized_exported_program.json"])
def test_entries_that_hold_pickles_or_code_are_refused(graph_file, tmp_path, entry):
    hostile = rewrite_archive(graph_file, tmp_path / "extra.pt", lambda name, data: data,
                              add={entry: pickle.dumps(CreatesFile(tmp_path / "x"))})
    with pytest.raises(CheckpointError, match=f"unexpected archive entry '{entry}'"):
        svdq_compiler.load(hostile)


def test_a_node_calling_outside_the_operator_namespaces_is_refused(graph_file, tmp_path):
    def change(program):
        program["graph_module"]["graph"]["nodes"][0]["target"] = "torch.os.system"
    hostile = rewrite_archive(graph_file, tmp_path / "target.pt", edit_json("models/model.json", change))
    with pytest.raises(CheckpointError, match="calls 'torch.os.system', which is not an aten, prims or svdq"):
        svdq_compiler.load(hostile)


@pytest.mark.parametrize("text", [
    "L['x'].size()[1] <= 64",
    "((L['hidden_states'].size()[3] // 2) % (L['hidden_states'].size()[2] // 2)) != 0",
    "(1 % (max(1, L['x'].size()[3] // 2)*max(1, L['x'].size()[2] // 2))) != 0",
    # nested inputs: an SDXL U-Net's added_cond_kwargs dict, a list of tensors
    "L['added_cond_kwargs']['text_embeds'].size()[0] == L['sample'].size()[0]",
    "L['added_cond_kwargs']['time_ids'].size()[0] == L['added_cond_kwargs']['text_embeds'].size()[0]",
    "L['images'][1].size()[2] == (2 + 2*(((-1) + L['images'][0].size()[2]) // 2))",
    "L['kw']['blocks'][0]['x1'].stride()[0] >= 1",
])
def test_guards_torch_writes_pass(text):
    archive_check.check_guard(text, "test")


@pytest.mark.parametrize("text", [
    "L['x'].size()[1].__class__ is int",
    "L['x\"); import os; (\"'].size()[0] == 1",
    "getattr(L['x'], 'size')()[0] == 1",
    "[c for c in ()] == []",
    "(lambda: 1)() == 1",
    "L['x'].size()[1] == 'a'",
    # nested inputs may be subscripted by words and indices, nothing else
    "L['kw']['__class__'].size()[0] == 1",
    "L['kw']['x\"); import os; (\"'].size()[0] == 1",
    "L['kw']['a b'].size()[0] == 1",
    "L['kw'][-1].size()[0] == 1",
    "L['kw'][True].size()[0] == 1",
    "L['kw'][0.5].size()[0] == 1",
    "L['kw'][L['i']].size()[0] == 1",
    "L['kw'][__import__('os').system('true')].size()[0] == 1",
    "L['kw']['x'].__dict__ == 1",
    "L['kw']['x'].size.__self__ == 1",
    "L['kw']['x'].numpy()[0] == 1",
    "L['kw'][0:2] == 1",
    "L['kw'](1) == 1",
    "L['kw']['x'].size()['a'] == 1",
    "L['kw']['x'].size()[0] == (lambda: 1)()",
    "L['kw'][[c for c in ()]] == 1",
])
def test_guards_beyond_size_arithmetic_are_refused(text):
    with pytest.raises(CheckpointError, match="refusing to load"):
        archive_check.check_guard(text, "test")


@pytest.mark.parametrize("text", [
    "Mul(Integer(64), Symbol('s27', positive=True, integer=True))",
    "Add(Mul(Integer(2), Symbol('s1', integer=True)), Integer(-1))",
    "IntTrueDiv(Symbol('s89', positive=True, integer=True), Integer(2))",
    "Float('0.5', precision=53)",
])
def test_size_expressions_in_srepr_pass(text):
    archive_check.check_size_expression(text, "test")


@pytest.mark.parametrize("text", [
    "Symbol('s0') + __import__('os').getpid()",
    "Symbol(str(1))",
    "Symbol('a b')",
    "Integer(1).__class__",
    "Function('f')(Symbol('s0'))",
])
def test_size_expressions_beyond_srepr_are_refused(text):
    with pytest.raises(CheckpointError, match="refusing to load"):
        archive_check.check_size_expression(text, "test")


def test_the_graph_is_rebuilt_from_its_record_without_torch_deserializing_anything(graph_file, monkeypatch):
    """Neither torch's program deserializer nor its loader sees the file: the graph comes from svdq_graph.json
    (each entry read once, after its digest was checked), so no swap between check and load is possible."""
    from torch._export.serde import serialize as serde

    def refuse(*args, **kwargs):
        raise AssertionError("torch's deserializer was called")

    monkeypatch.setattr(serde, "deserialize", refuse)
    monkeypatch.setattr(torch.export, "load", refuse)
    loaded = svdq_compiler.load(graph_file)
    x = torch.randn(2, 6, 8)
    torch.testing.assert_close(loaded(x=x), Scaled()(x))


def edit_graph_record(change):
    return edit_json(GRAPH_FILE, change)


def first_call(record):
    return next(node for node in record["nodes"] if node[1] == "call_function")


def call_os_system(record):
    first_call(record)[2] = "torch.os.system"


def call_an_unknown_operator(record):
    first_call(record)[2] = "torch.ops.aten.no_such_op.default"


def pass_code_as_an_argument(record):
    first_call(record)[3] = {"tuple": [{"eval": "__import__('os').getpid()"}]}


def read_an_attribute_the_file_lacks(record):
    node = next(node for node in record["nodes"] if node[1] == "get_attr")
    node[2] = "proj.missing"


def refer_to_a_later_node(record):
    first_call(record)[3] = {"tuple": [{"node": "output"}]}


def unpickle_a_spec(record):
    record["in_spec"] = '[1, {"type": "os.system", "context": "null", "children_spec": []}]'


def refer_to_a_node_by_a_list(record):
    first_call(record)[3] = {"tuple": [{"node": ["x"]}]}


def nest_arguments_deeply(record):
    nested = {"tuple": []}
    for _ in range(40):
        nested = {"tuple": [nested]}
    first_call(record)[3] = nested


def shadow_torch_with_an_input(record):
    """The generated code binds inputs to their targets: an input bound to `torch` would hide the module."""
    next(node for node in record["nodes"] if node[1] == "placeholder")[2] = "torch"


def name_keywords(record, *names):
    """The call convention's keyword names (the spec is `((), {names...})`) replaced by `names`."""
    spec = json.loads(record["in_spec"])
    spec[1]["children_spec"][1]["context"] = json.dumps(list(names))
    record["in_spec"] = json.dumps(spec)


def name_an_argument_torch(record):
    record["arg_names"] = ["torch"]
    name_keywords(record, "torch")


def rename_an_argument(record):
    record["arg_names"] = ["y"]


def drop_an_output(record):
    record["nodes"][-1][3] = {"tuple": [{"tuple": []}]}


def call_with_an_extra_argument(record):
    first_call(record)[3]["tuple"].append(1)


def call_with_an_unknown_keyword(record):
    first_call(record)[4] = {"dict": {"alpha": 1}}


def pass_a_number_as_a_weight(record):
    first_call(record)[3]["tuple"][1] = 8


def pass_a_string_as_a_weight(record):
    first_call(record)[3]["tuple"][1] = "proj.weight"


def measure_a_size(record, used_by):
    """A node `size` (the input's second dimension, a number) inserted before the first call, and passed to
    the call `used_by` picks as its second argument."""
    nodes, user = record["nodes"], used_by(record)
    nodes.insert(nodes.index(first_call(record)), ["size", "call_function", "torch.ops.aten.sym_size.int",
                                                   {"tuple": [{"node": "x"}, 1]}, {"dict": {}}])
    user[3]["tuple"][1] = {"node": "size"}


def pass_a_size_as_a_weight(record):
    measure_a_size(record, first_call)


def pass_a_list_of_tensors_as_a_tensor(record):
    nodes, user = record["nodes"], first_call(record)
    nodes.insert(nodes.index(user), ["parts", "call_function", "torch.ops.aten.split.Tensor",
                                     {"tuple": [{"node": "proj_weight"}, 4]}, {"dict": {}}])
    user[3]["tuple"][1] = {"node": "parts"}


@pytest.mark.parametrize("change, message", [
    (call_os_system, "calls 'torch.os.system', which is not an aten, prims or svdq"),
    (call_an_unknown_operator, "calls 'torch.ops.aten.no_such_op.default', which this torch does not have"),
    (pass_code_as_an_argument, "holds an argument that is not data"),
    (read_an_attribute_the_file_lacks, "reads 'proj.missing', which is not an attribute"),
    (refer_to_a_later_node, "holds an argument that is not data"),
    (unpickle_a_spec, "lacks its call convention"),
    (refer_to_a_node_by_a_list, "holds an argument that is not data"),
    (nest_arguments_deeply, "nests arguments more than 32 deep"),
    (shadow_torch_with_an_input, "input node x is bound to 'torch'"),
    (name_an_argument_torch, "names arguments the graph's code needs for itself: ['torch']"),
    (rename_an_argument, "names the arguments ['y'] for a call convention of 1 with the keywords ['x']"),
    (drop_an_output, "the output does not have the 1 values its call convention returns"),
    (call_with_an_extra_argument, "with arguments that do not fit its schema"),
    (call_with_an_unknown_keyword, "with arguments that do not fit its schema"),
    (pass_a_number_as_a_weight, "node linear passes int '8' as 'weight' of aten.linear.default, which takes Tensor"),
    (pass_a_string_as_a_weight, "node linear passes str 'proj.weight' as 'weight' of aten.linear.default"),
    (pass_a_size_as_a_weight, "node linear passes a number (a size) (node size) as 'weight' of "
                              "aten.linear.default, which takes Tensor"),
    (pass_a_list_of_tensors_as_a_tensor, "node linear passes a list of tensors (node parts) as 'weight'"),
], ids=["os-system", "unknown-op", "code-argument", "missing-attribute", "later-node", "spec", "list-reference",
        "deep-arguments", "shadowing-input", "shadowing-argument", "renamed-argument", "output-count", "extra-argument",
        "unknown-keyword", "number-for-tensor", "string-for-tensor", "size-for-tensor", "tensors-for-tensor"])
def test_a_graph_record_beyond_operators_and_data_is_refused(graph_file, tmp_path, change, message):
    hostile = rewrite_archive(graph_file, tmp_path / "record.pt", edit_graph_record(change))
    with pytest.raises(CheckpointError, match=f"refusing to load: .*{re.escape(message)}"):
        svdq_compiler.load(hostile)


def test_a_size_where_a_tensor_goes_is_refused_at_load_in_one_line(graph_file, tmp_path):
    """Without the check the file loads and torch refuses the argument only when the graph first runs."""
    hostile = rewrite_archive(graph_file, tmp_path / "size.pt", edit_graph_record(pass_a_size_as_a_weight))
    with pytest.raises(CheckpointError) as refused:
        svdq_compiler.load(hostile)
    assert "\n" not in str(refused.value) and "'weight' of aten.linear.default" in str(refused.value)
    with pytest.raises(RuntimeError, match="Expected a value of type 'Tensor' for argument 'weight'"):
        torch.ops.aten.linear.default(torch.randn(2, 6, 8), 6)


def test_numbers_where_torch_takes_them_as_tensors_still_load(graph_file, tmp_path):
    """`mul.Tensor(x, 2)` (as export writes it) and a size in its place: torch binds a number to the tensor
    argument of its arithmetic operators, so the graph loads and runs."""
    def scale_by_the_size(record):
        measure_a_size(record, lambda record: next(n for n in record["nodes"] if n[0] == "mul"))

    scaled = rewrite_archive(graph_file, tmp_path / "scaled.pt", edit_graph_record(scale_by_the_size))
    x = torch.randn(2, 6, 8)
    torch.testing.assert_close(svdq_compiler.load(scaled)(x=x), Scaled()(x) / 2 * 6)


def test_keyword_names_that_would_be_code_in_the_generated_forward_are_refused(graph_file, tmp_path):
    """torch writes the keyword names of the call convention into the generated forward as string literals:
    a name that closes the literal would run whatever follows at the first call."""
    marker = tmp_path / "code-ran"
    key = f"x': {touch_code(marker)}, 'x"

    hostile = rewrite_archive(graph_file, tmp_path / "keyword.pt",
                              edit_graph_record(lambda record: name_keywords(record, key)))
    with pytest.raises(CheckpointError, match="refusing to load: .*lacks its call convention"):
        svdq_compiler.load(hostile)(x=torch.randn(2, 6, 8))
    assert not marker.exists()


@pytest.mark.parametrize("entry", [GRAPH_FILE, "svdq_manifest.json", "svdq_capture.json", "svdq_digests.json"])
def test_json_nested_beyond_the_stack_is_refused(graph_file, tmp_path, entry):
    deep = b"[" * 100_000 + b"]" * 100_000
    hostile = rewrite_archive(graph_file, tmp_path / "deep.pt",
                              lambda name, data: deep if name == f"extra/{entry}" else data)
    with pytest.raises(CheckpointError):
        svdq_compiler.load(hostile)


def test_an_attribute_over_a_module_field_is_refused(graph_file, tmp_path):
    """A weight named `training.weight` would have to be set below the module's `training` flag."""
    def rename(name, data):
        if name.endswith("model_weights_config.json") or name.endswith(GRAPH_FILE):
            return data.replace(b'"proj.weight"', b'"training.weight"')
        return data

    hostile = rewrite_archive(graph_file, tmp_path / "field.pt", rename)
    with pytest.raises(CheckpointError, match="refusing to load: .*attribute 'training.weight' cannot be set"):
        svdq_compiler.load(hostile)


def test_a_kernel_spec_carrying_code_in_the_graph_record_is_refused(graph_file, tmp_path):
    """A fused op's spec becomes Triton source: the record's spec is checked as the program's is."""
    names = [argument.name for argument in torch.ops.svdq.fused_gemm.default._schema.arguments]
    spec = '{"kind":"gemm","dtype":"float32)\\nimport os #"}'

    def change(record):
        first_call(record)[2] = "torch.ops.svdq.fused_gemm.default"
        first_call(record)[3] = {"tuple": [None] * names.index("spec") + [spec]}

    hostile = rewrite_archive(graph_file, tmp_path / "spec.pt", edit_graph_record(change))
    with pytest.raises(CheckpointError, match="refusing to load: kernel spec value"):
        svdq_compiler.load(hostile)


@pytest.mark.parametrize("text", [
    '{"kind":"gemm","dtype":"float32)\\nimport os #"}',
    '{"kind":"gemm","epilogue":[{"kind":"mul","value":"f(x)"}]}',
    'not json',
    '{"kind":"gemm","k":NaN}',
])
def test_kernel_specs_carrying_code_are_refused(text):
    with pytest.raises(CheckpointError, match="refusing to load"):
        archive_check.check_kernel_spec(text, "test")


def test_a_real_kernel_spec_passes():
    archive_check.check_kernel_spec(
        '{"act":"uint4","bias":true,"dtype":"float32","epilogue":[{"kind":"mul","value":null}],"group_size":64,'
        '"k":128,"kind":"gemm","n":64,"quantize_next":null,"rank":32}', "test")


def test_a_kernel_spec_carrying_code_in_the_program_is_refused(graph_file, tmp_path):
    """models/model.json is checked object by object (`_check_program`): a fused node's spec argument must
    still reach the kernel-spec check."""
    def change(program):
        node = next(n for n in program["graph_module"]["graph"]["nodes"] if n["target"].startswith("torch.ops"))
        node["target"] = "torch.ops.svdq.fused_gemm.default"
        node["inputs"].append({"name": "spec", "arg": {"as_string": '{"kind":"gemm","dtype":"x)\\nimport os #"}'},
                               "kind": 1})

    hostile = rewrite_archive(graph_file, tmp_path / "spec.pt", edit_json("models/model.json", change))
    with pytest.raises(CheckpointError, match="refusing to load: kernel spec value"):
        svdq_compiler.load(hostile)


@pytest.mark.parametrize("text", ['[{"graph_module": {}}]', '{"graph_module": []}', '{"guards_code": []}', '"x"'])
def test_a_program_that_is_not_an_exported_program_is_refused(text):
    with pytest.raises(CheckpointError, match="refusing to load: models/model.json is not a serialized"):
        archive_check._check_program(text.encode(), "test")


def test_a_fused_node_without_an_argument_list_is_checked_without_a_traceback():
    archive_check._check_program(b'{"graph_module": {"nodes": [{"target": "torch.ops.svdq.fused_gemm.default", '
                                 b'"inputs": {"name": "spec"}}]}}', "test")


def test_checking_the_program_never_holds_its_tree(graph_file):
    """The program of a large graph is MBs of JSON, ~7x that as Python objects: the check keeps one node's
    arguments at a time, so its peak stays near the text it reads."""
    import tracemalloc
    import zipfile

    with zipfile.ZipFile(graph_file) as archive:
        program = json.loads(archive.read(next(n for n in archive.namelist() if n.endswith("models/model.json"))))
    program["graph_module"]["graph"]["nodes"] *= 2000
    raw = json.dumps(program).encode()

    def peak(check):
        tracemalloc.start()
        try:
            check()
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    assert peak(lambda: json.loads(raw)) > 4 * len(raw)  # what holding the tree costs
    assert peak(lambda: archive_check._check_program(raw, "test")) < 2 * len(raw)
