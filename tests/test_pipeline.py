"""Pass infrastructure: registry, ordering, requirements, statistics, dumps and IR printing."""

import io
import json

import pytest
import torch

import svdq_compiler
from svdq_compiler.errors import InputError
from svdq_compiler.ir import LinearInfo, Role, format_ir, set_info
from svdq_compiler.pipeline import (PASS_REGISTRY, PassContext, PassResult, register_pass, run_passes,
                                    svdquant_pipeline)
from svdq_compiler.passes.verify import VerifyError, problems_in


def tiny_mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 64))


@pytest.fixture
def captured():
    model = tiny_mlp()
    return model, svdq_compiler.capture(model, (torch.randn(4, 64),))


@pytest.fixture
def temp_passes():
    added = []

    def add(name, fn, **kwargs):
        added.append(name)
        return register_pass(name, ensures="test", **kwargs)(fn)

    yield add
    for name in added:
        PASS_REGISTRY.pop(name, None)


def test_capture_runs_equal_to_eager(captured):
    model, gm = captured
    x = torch.randn(4, 64)
    torch.testing.assert_close(gm(x), model(x))
    assert sum(1 for n in gm.graph.nodes if n.target == torch.ops.aten.linear.default) == 2


def test_run_passes_records_stats_dumps_and_prints(captured, temp_passes, tmp_path):
    _, gm = captured

    def annotate_first(gm, ctx):
        node = next(n for n in gm.graph.nodes if n.target == torch.ops.aten.linear.default)
        set_info(node, LinearInfo(name="0", weight="0.weight", bias="0.bias", in_features=64, out_features=128,
                                  role=Role.MLP_UP))
        return PassResult(gm, True, {"annotated": 1})

    def no_change(gm, ctx):
        return PassResult(gm, False, {})

    first = temp_passes("t_annotate", annotate_first)
    second = temp_passes("t_noop", no_change, requires=("t_annotate",))
    out = io.StringIO()
    ctx = PassContext(config=svdq_compiler.QuantConfig.preset("int4"), dump_dir=tmp_path,
                      print_ir_after_change=True, verify_each=True, out=out)
    run_passes(gm, ctx, [first, second])
    assert [r["name"] for r in ctx.records] == ["t_annotate", "t_noop"]
    assert ctx.records[0]["stats"] == {"annotated": 1} and ctx.records[0]["wall_s"] >= 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "000_capture.py", "000_capture.stats.json", "001_t_annotate.py", "001_t_annotate.stats.json",
        "002_t_noop.py", "002_t_noop.stats.json"]
    assert "# svdq: 0 role=mlp_up" in (tmp_path / "001_t_annotate.py").read_text()
    assert json.loads((tmp_path / "001_t_annotate.stats.json").read_text())["modified"] is True
    printed = out.getvalue()
    assert "IR after t_annotate" in printed and "IR after t_noop" not in printed


def test_missing_requirement_is_a_clear_error(captured, temp_passes):
    _, gm = captured
    needy = temp_passes("t_needy", lambda gm, ctx: PassResult(gm, False), requires=("t_absent",))
    ctx = PassContext(config=svdq_compiler.QuantConfig.preset("int4"))
    with pytest.raises(InputError, match="requires"):
        run_passes(gm, ctx, [needy])


def test_unknown_pass_name_lists_the_valid_ones():
    with pytest.raises(InputError, match="annotate_linears"):
        svdquant_pipeline(["no_such_pass"])


def test_verify_reports_unknown_attr(captured):
    _, gm = captured
    node = next(n for n in gm.graph.nodes if n.target == torch.ops.aten.linear.default)
    set_info(node, LinearInfo(name="0", weight="0.weight", bias=None, in_features=64, out_features=128,
                              qweight="does.not.exist"))
    assert any("does.not.exist" in p for p in problems_in(gm))
    with pytest.raises(VerifyError):
        PASS_REGISTRY["verify"](gm, PassContext(config=svdq_compiler.QuantConfig.preset("int4")))


def test_format_ir_comments_annotated_nodes_only(captured):
    _, gm = captured
    text = format_ir(gm)
    assert "# svdq:" not in text and "aten.linear.default" in text
