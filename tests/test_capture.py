"""Capture on the generic path: dynamic dimensions, fallbacks to static, the capture report, the shape check."""

import pytest
import torch

import svdq_compiler
from svdq_compiler.capture import CAPTURE_META, UNBOUNDED, parse_violation
from svdq_compiler.errors import CaptureError, InputError, ShapeError
from svdq_compiler.models import DynDim


class TokenMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.up, self.down = torch.nn.Linear(16, 32), torch.nn.Linear(32, 16)

    def forward(self, x):
        return self.down(torch.nn.functional.gelu(self.up(x)))


class UsesTokenCount(TokenMLP):
    """Reads the token count as a Python int: torch.export must specialize it."""

    def forward(self, x):
        return super().forward(x) * int(x.shape[1])


class CapsTokens(TokenMLP):
    """Branches on the token count: only sizes up to 16 follow the traced branch."""

    def forward(self, x):
        y = super().forward(x)
        return y if x.shape[1] <= 16 else y * 2


class NativeGrid(torch.nn.Module):
    """Compares a derived grid size with a Python int, as PixArt's patch embedding does with its native grid:
    export succeeds with a symbolic size, but its guard pins the size."""

    def forward(self, x):
        return x * 2 if x.shape[1] // 2 != 4 else x


class PairsOfTokens(TokenMLP):
    def forward(self, x):
        return super().forward(x).unflatten(1, (-1, 2)).sum(2)  # needs an even token count


class AtLeast2048(TokenMLP):
    def forward(self, x):
        return super().forward(x)[:, :max(2048, x.shape[1])]  # guard n <= max(2048, n): true, but unproven


class PairMap(torch.nn.Module):
    def forward(self, x):
        return x.softmax(-1) @ x


class DataDependent(TokenMLP):
    def forward(self, x):
        return super().forward(x) if x.sum() > 0 else x


class Pair(torch.nn.Module):
    """Two inputs sharing one dimension (like FLUX's hidden_states and img_ids)."""

    def forward(self, tokens, positions):
        return tokens * positions[:, None]


def dims_of(gm):
    return {(d["input"], d["index"]): d for d in gm.meta[CAPTURE_META]["dims"]}


def test_static_capture_keeps_parameters_as_frozen_attributes():
    model = TokenMLP()
    gm = svdq_compiler.capture(model, (torch.randn(2, 8, 16),))
    assert {n.target for n in gm.graph.nodes if n.op == "get_attr"} >= {"up.weight", "down.bias"}
    assert all(not p.requires_grad for p in gm.parameters())
    assert gm.meta[CAPTURE_META]["dims"] == [] and gm.meta[CAPTURE_META]["adapter"] == "generic"
    with pytest.raises(ShapeError, match=r"args\[0\] dim 1 is 9, but the graph was captured with a static 8"):
        gm(torch.randn(2, 9, 16))


def test_declared_dims_are_dynamic_and_run_equal_to_eager():
    model = TokenMLP()
    spec = ({0: DynDim("batch", 1, 8), 1: DynDim("tokens", 2, 64, label="tokens")},)
    gm = svdq_compiler.capture(model, (torch.randn(2, 8, 16),), dynamic_shapes=spec)
    for shape in [(1, 8, 16), (3, 40, 16), (2, 64, 16)]:
        x = torch.randn(shape)
        torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)
    tokens = dims_of(gm)[("args[0]", 1)]
    assert (tokens["status"], tokens["min"], tokens["max"]) == ("dynamic", 2, 64)
    with pytest.raises(ShapeError, match=r"args\[0\] dim 1 \(tokens\) is 65, outside the captured range \[2, 64\]"):
        gm(torch.randn(2, 65, 16))


def test_torch_dims_and_multiples_are_accepted():
    model = TokenMLP()
    tokens = torch.export.Dim("tokens", min=1, max=32)
    gm = svdq_compiler.capture(model, (torch.randn(2, 8, 16),), dynamic_shapes=({1: 4 * tokens},))
    assert dims_of(gm)[("args[0]", 1)]["multiple"] == 4
    x = torch.randn(2, 12, 16)
    torch.testing.assert_close(gm(x), model(x))
    with pytest.raises(ShapeError, match=r"in steps of 4"):
        gm(torch.randn(2, 10, 16))


def test_specialized_dimension_falls_back_to_static_with_the_reason():
    model = UsesTokenCount()
    gm = svdq_compiler.capture(model, (torch.randn(2, 8, 16),), dynamic_shapes=({1: DynDim("tokens", 2, 64)},))
    entry = dims_of(gm)[("args[0]", 1)]
    assert entry["status"] == "static" and "specialized" in entry["reason"]
    x = torch.randn(2, 8, 16)
    torch.testing.assert_close(gm(x), model(x))
    with pytest.raises(ShapeError, match=r"args\[0\] dim 1 is 12, but the graph was captured with a static 8: "
                                         r".*specialized"):
        gm(torch.randn(2, 12, 16))


def test_range_the_model_cannot_serve_is_narrowed_and_reported():
    model = CapsTokens()
    gm = svdq_compiler.capture(model, (torch.randn(2, 8, 16),), dynamic_shapes=({1: DynDim("tokens", 2, 64)},))
    entry = dims_of(gm)[("args[0]", 1)]
    assert (entry["status"], entry["max"]) == ("dynamic", 16) and entry["reason"]
    assert gm.meta[CAPTURE_META]["export_attempts"] == 2
    x = torch.randn(2, 16, 16)
    torch.testing.assert_close(gm(x), model(x))
    with pytest.raises(ShapeError, match="outside the captured range"):
        gm(torch.randn(2, 17, 16))


def test_size_the_code_needs_even_becomes_a_multiple():
    """torch.export's fix `tokens = 2*_tokens` makes the dimension dynamic in steps of 2 instead of static
    (AceStep's image tokens); a single pair, which torch's range allows but its guard `x.size()[1] // 2 != 1`
    does not, is a ShapeError naming that guard."""
    model = PairsOfTokens()
    gm = svdq_compiler.capture(model, (torch.randn(2, 12, 16),), dynamic_shapes=({1: DynDim("tokens", 2, 64)},))
    entry = dims_of(gm)[("args[0]", 1)]
    assert (entry["status"], entry["multiple"], entry["min"], entry["max"]) == ("dynamic", 2, 1, 32)
    assert "steps of 2" in entry["reason"] and gm.meta[CAPTURE_META]["export_attempts"] == 2
    with pytest.raises(ShapeError, match=r"fail torch.export's guard `.*// 2 != 1`"):
        gm(torch.randn(2, 2, 16))
    for tokens in (4, 6, 64):
        x = torch.randn(2, tokens, 16)
        torch.testing.assert_close(gm(x), model(x))
    with pytest.raises(ShapeError, match=r"in steps of 2"):
        gm(torch.randn(2, 7, 16))


def test_size_a_recorded_guard_rejects_fails_with_a_shape_error():
    """In steps of 3 torch.export accepts the dimension but records the guard `x.size()[1] % 2 == 0`: an odd
    size inside the range gets a ShapeError naming the guard (torch's own check raises a bare AssertionError).
    The range is not narrowed by probing one dimension at a time: guards that couple two dimensions (WanAnimate's
    height and width) would narrow each to a sliver around the example."""
    model = PairsOfTokens()
    gm = svdq_compiler.capture(model, (torch.randn(2, 12, 16),),
                               dynamic_shapes=({1: DynDim("tokens", 2, 21, multiple=3)},))
    entry = dims_of(gm)[("args[0]", 1)]
    assert (entry["status"], entry["min"], entry["max"], entry["multiple"]) == ("dynamic", 2, 21, 3)
    x = torch.randn(2, 18, 16)
    torch.testing.assert_close(gm(x), model(x))
    with pytest.raises(ShapeError, match=r"fail torch.export's guard `.*% 2 == 0`"):
        gm(torch.randn(2, 21, 16))


def test_guard_torch_cannot_prove_keeps_the_dimension_dynamic():
    """torch.export refuses LongCat's range for the guard `n <= max(2048, n)` without a fix: exported again as
    Dim.DYNAMIC the dimension stays dynamic, and the guard it then records (`max(2048, n) > n`: the slice's
    branch taken below 2048) refuses 2048 with a ShapeError naming it."""
    model = AtLeast2048()
    gm = svdq_compiler.capture(model, (torch.randn(2, 8, 16),), dynamic_shapes=({1: DynDim("tokens", 2, 4096)},))
    entry = dims_of(gm)[("args[0]", 1)]
    assert (entry["status"], entry["min"], entry["max"]) == ("dynamic", 2, 4096)
    assert "max(2048" in entry["reason"] and "each call checks it" in entry["reason"]
    for tokens in (3, 2047):
        x = torch.randn(2, tokens, 16)
        torch.testing.assert_close(gm(x), model(x))
    with pytest.raises(ShapeError, match=r"fail torch.export's guard `max\(2048"):
        gm(torch.randn(2, 2048, 16))


def test_torch_dim_without_a_maximum_is_unbounded():
    """A torch Dim declared without a maximum (torch's int_oo, as its automatic dimensions come back) is an
    unbounded DynDim: to_dyn took int() of it and crashed."""
    n = torch.export.Dim("n", min=2)
    gm = svdq_compiler.capture(PairMap(), (torch.randn(2, 8, 8),), dynamic_shapes=({1: n, 2: n},))
    entry = dims_of(gm)[("args[0]", 1)]
    assert (entry["status"], entry["min"], entry["max"]) == ("dynamic", 2, UNBOUNDED)
    x = torch.randn(2, 5, 5)
    torch.testing.assert_close(gm(x), PairMap()(x))


def test_dimension_pinned_by_a_guard_is_reported_static():
    gm = svdq_compiler.capture(NativeGrid(), (torch.randn(2, 8, 3),),
                               dynamic_shapes=({1: DynDim("grid", 2, 32, multiple=2, label="grid")},))
    entry = dims_of(gm)[("args[0]", 1)]
    assert entry["status"] == "static" and "x.size()[1] // 2 == 4" in entry["reason"]
    x = torch.randn(2, 8, 3)
    torch.testing.assert_close(gm(x), x)
    with pytest.raises(ShapeError, match=r"args\[0\] dim 1 \(grid\) is 10, but the graph was captured with a static 8"):
        gm(torch.randn(2, 10, 3))


def test_example_of_size_one_gives_a_static_dimension_without_an_export_round():
    gm = svdq_compiler.capture(TokenMLP(), (torch.randn(1, 8, 16),), dynamic_shapes=({0: DynDim("batch", 1, 8)},))
    entry = dims_of(gm)[("args[0]", 0)]
    assert entry["status"] == "static" and "sizes 0 and 1" in entry["reason"]
    assert gm.meta[CAPTURE_META]["export_attempts"] == 1


def test_shared_dimension_must_match_at_run_time():
    n = DynDim("n", 2, 64, label="positions")
    gm = svdq_compiler.capture(Pair(), {"tokens": torch.randn(8, 4), "positions": torch.randn(8)},
                               dynamic_shapes={"tokens": {0: n}, "positions": {0: n}})
    out = gm(tokens=torch.ones(5, 4), positions=torch.arange(5.0))
    torch.testing.assert_close(out, torch.arange(5.0)[:, None].expand(5, 4))
    with pytest.raises(ShapeError, match="positions dim 0 .* does not match tokens dim 0"):
        gm(tokens=torch.ones(5, 4), positions=torch.arange(6.0))


def test_capture_errors_are_one_clear_line():
    with pytest.raises(CaptureError, match="could not capture DataDependent") as failure:
        svdq_compiler.capture(DataDependent(), (torch.randn(2, 8, 16),))
    assert "\n" not in str(failure.value)
    with pytest.raises(InputError, match="outside its declared range"):
        svdq_compiler.capture(TokenMLP(), (torch.randn(2, 80, 16),), dynamic_shapes=({1: DynDim("t", 2, 64)},))
    with pytest.raises(InputError, match="not given: \\['y'\\]"):
        svdq_compiler.capture(Pair(), {"tokens": torch.randn(8, 4), "positions": torch.randn(8)},
                              dynamic_shapes={"y": None})
    with pytest.raises(CaptureError, match="tuple of positional args or a dict"):
        svdq_compiler.capture(TokenMLP(), "not inputs")


def test_violation_parser_reads_torch_messages():
    message = ("Constraints violated (batch, w)! For more information, run with TORCH_LOGS=\"+dynamic\".\n"
               "  - Not all values of batch = L['x'].size()[0] in the specified range batch <= 64 satisfy the "
               "generated guard L['x'].size()[0] <= 63\n"
               "  - You marked w as dynamic but your code specialized it to be a constant (4). If you're using "
               "mark_dynamic, either remove it.\n"
               "Suggested fixes:\n  batch = Dim('batch', max=63)\n  w = 4\n\nThe error above occurred ...")
    names, reasons, fixes = parse_violation(message)
    assert names == ["batch", "w"]
    assert fixes == {"batch": "Dim('batch', max=63)", "w": "4"}
    assert reasons["w"] == "You marked w as dynamic but your code specialized it to be a constant (4)"


class FixedLengthTable(torch.nn.Module):
    """Adds a positional table of one fixed length: the code pins the token count."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(16, 16)
        self.table = torch.nn.Parameter(torch.randn(24, 16))

    def forward(self, x):
        return self.proj(x + self.table)


def test_a_dimension_declared_as_a_multiple_that_the_code_pins_becomes_static():
    # torch names the violated dimension `8*tokens`, not `tokens`
    gm = svdq_compiler.capture(FixedLengthTable(), (torch.randn(2, 24, 16),),
                               dynamic_shapes=({1: DynDim("tokens", 1, 8, multiple=8)},))
    [dim] = gm.meta[CAPTURE_META]["dims"]
    assert dim["name"] == "tokens" and dim["status"] == "static"
    assert "8*tokens" in dim["reason"] and "constant (24)" in dim["reason"]
    with pytest.raises(ShapeError, match="static 24"):
        gm(torch.randn(2, 32, 16))


class _Residual(torch.nn.Module):
    def __init__(self, in_place: bool):
        super().__init__()
        self.proj, self.drop, self.in_place = torch.nn.Linear(8, 8), torch.nn.Dropout(0.1), in_place

    def forward(self, x):
        y = self.drop(self.proj(x)).reshape(-1, 4, 2)
        if self.in_place:
            y += 1.0
        return y


def _call_targets(gm):
    return {str(node.target) for node in gm.graph.nodes if node.op == "call_function"}


def test_a_program_without_in_place_ops_keeps_torch_export_s_own_ir():
    """No re-trace to the inference IR (60% of a FLUX capture) where the graph is functional already: its ops stay
    as exported (dropout, reshape), and the graph computes the model."""
    model, x = _Residual(in_place=False).eval(), torch.randn(3, 8)
    gm = svdq_compiler.capture(model, (x,), dynamic_shapes=None)
    assert {"aten.dropout.default", "aten.reshape.default"} <= _call_targets(gm)
    torch.testing.assert_close(gm(x), model(x))


def test_a_program_with_an_in_place_op_is_functionalized():
    """`y += 1` is aten.add_ in torch.export's IR; the passes assume no tensor changes in place, so such a program
    is re-traced to the functional inference IR."""
    model, x = _Residual(in_place=True).eval(), torch.randn(3, 8)
    gm = svdq_compiler.capture(model, (x,), dynamic_shapes=None)
    mutating = [node.target for node in gm.graph.nodes
                if isinstance(node.target, torch._ops.OpOverload) and node.target._schema.is_mutable]
    assert not mutating and "aten.add.Tensor" in _call_targets(gm)
    torch.testing.assert_close(gm(x), model(x))
