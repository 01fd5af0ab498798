"""The graph record (svdq_compiler.graph_record): `load` rebuilds the GraphModule from it, with the arguments,
attribute kinds, call convention and input guards of the saved graph, and its device arguments follow the
device the weights are loaded on."""

import ast

import pytest
import torch
from torch.fx.operator_schemas import normalize_function

import svdq_compiler
from svdq_compiler.dropin import graph_module_of
from svdq_compiler.errors import InputError
from svdq_compiler.graph_record import InputGuards
from svdq_compiler.models import DynDim


class Mixed(torch.nn.Module):
    """Arguments of every kind the record encodes: dtypes, a device, slices, an infinite float, keyword
    arguments, a non-persistent buffer, symbolic sizes, and a dict output."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(8, 8)
        self.register_buffer("offset", torch.randn(8))
        self.register_buffer("scratch", torch.full((8,), 0.5), persistent=False)

    def forward(self, x, scale):
        positions = torch.arange(x.shape[1], device=x.device, dtype=x.dtype)[None, :, None]
        y = self.proj(x[:, :, :8]) + self.offset + self.scratch + positions
        return {"out": y.to(torch.float16).float().clamp(max=float("inf")) * scale, "rows": y[:, 1:3]}


def inputs(tokens=6):
    return {"x": torch.randn(2, tokens, 12), "scale": torch.tensor(3.0)}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    gm = svdq_compiler.capture(Mixed(), inputs(), dynamic_shapes={"x": {1: DynDim("tokens", 4, 64, label="tokens")},
                                                                   "scale": None})
    return gm, svdq_compiler.save(gm, tmp_path_factory.mktemp("record") / "graph.pt")


def test_the_rebuilt_graph_computes_what_the_model_does_at_other_sizes(saved):
    _, path = saved
    loaded = svdq_compiler.load(path)
    for tokens in (6, 17):
        example = inputs(tokens)
        expected, got = Mixed()(**example), loaded(**example)
        assert set(got) == {"out", "rows"}
        torch.testing.assert_close(got["out"], expected["out"])
        torch.testing.assert_close(got["rows"], expected["rows"])


def test_the_rebuilt_graph_has_the_captured_nodes_and_attribute_kinds(saved):
    captured, path = saved
    loaded = graph_module_of(svdq_compiler.load(path))

    def shape(gm):  # nodes by position (saving exports the graph again, which renumbers node names and may spell
        # an operator's arguments by keyword where the capture gave them by position: compared by schema name)
        position = {node: f"#{i}" for i, node in enumerate(gm.graph.nodes)}

        def arguments(node):
            if isinstance(node.target, torch._ops.OpOverload):
                named = normalize_function(node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True)
                return (), named.kwargs
            return node.args, node.kwargs

        return [(node.op, str(node.target), str(torch.fx.map_arg(arguments(node), position.get)))
                for node in gm.graph.nodes]

    assert shape(loaded) == shape(captured)
    assert {name for name, _ in loaded.named_parameters()} == {"proj.weight", "proj.bias"}
    assert set(loaded.state_dict()) == {"proj.weight", "proj.bias", "offset"}  # scratch is not persistent
    torch.testing.assert_close(loaded.scratch, torch.full((8,), 0.5))
    assert "def forward(self, x, scale)" in loaded.code


def test_a_load_on_another_device_moves_the_graph_s_device_arguments_with_the_weights(saved):
    """The path a CUDA load takes, on the meta device: every weight goes there, and so do the tensors the
    graph creates itself (torch.arange(..., device=cpu) as saved); otherwise the graph could not run."""
    _, path = saved
    loaded = graph_module_of(svdq_compiler.load(path, device="meta"))
    assert {t.device.type for t in [*loaded.parameters(), *loaded.buffers()]} == {"meta"}
    devices = [arg for node in loaded.graph.nodes for arg in node.kwargs.values() if isinstance(arg, torch.device)]
    assert devices and set(devices) == {torch.device("meta")}
    out = loaded(**{name: value.to("meta") for name, value in inputs(9).items()})
    assert out["out"].device.type == "meta" and out["out"].shape == (2, 9, 8)


def guards(*texts, spec_of=None):
    example = spec_of or ((), {"a": torch.zeros(2, 6), "kw": {"b": torch.zeros(6, 3)}})
    leaves, spec = torch.utils._pytree.tree_flatten(example)
    return InputGuards(list(texts), [], spec, "test"), leaves


def test_input_guards_evaluate_size_relations_of_nested_inputs():
    check, leaves = guards("L['kw']['b'].size()[0] == L['a'].size()[1]",
                           "max(1, L['a'].size()[0] // 2) * 2 <= L['kw']['b'].size()[0]",
                           "math.floor(L['a'].size()[1] / 4) == 1 and not L['a'].size()[0] > 2")
    check(*leaves)
    wrong, _ = torch.utils._pytree.tree_flatten(((), {"a": torch.zeros(2, 6), "kw": {"b": torch.zeros(5, 3)}}))
    with pytest.raises(InputError, match=r"break a size relation .*: L\['kw'\]\['b'\].size\(\)\[0\] == "):
        check(*wrong)


def test_input_guards_refuse_anything_but_size_arithmetic():
    from svdq_compiler.errors import CheckpointError

    with pytest.raises(CheckpointError, match="refusing to load: guard"):
        guards("L['a'].numpy() is None")
    with pytest.raises(CheckpointError, match="refusing to load"):
        guards("__import__('os').getpid() == 1")


def test_input_guards_walk_the_tree_they_checked():
    check, _ = guards("L['a'].size()[0] == 2")
    assert isinstance(check.trees[0], ast.Compare) and check.guards == ["L['a'].size()[0] == 2"]


@pytest.mark.gpu
def test_a_cuda_load_runs_on_cuda(saved):
    _, path = saved
    loaded = svdq_compiler.load(path, device="cuda")
    example = inputs(9)
    got, expected = loaded(**{name: value.cuda() for name, value in example.items()}), Mixed()(**example)
    assert got["out"].device.type == "cuda"
    torch.testing.assert_close(got["out"].cpu(), expected["out"])
    torch.testing.assert_close(got["rows"].cpu(), expected["rows"])
