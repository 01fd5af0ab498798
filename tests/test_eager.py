"""The eager path (svdq_compiler/eager.py) on the two diffusers classes torch.export cannot capture."""

import pytest
import torch

from eager_models import hidream, hidream_inputs, lumina2, lumina2_inputs
from svdq_compiler.config import QuantConfig
from svdq_compiler.eager import SVDQLinear, compile_eager
from svdq_compiler.ir import Role

MODELS = {"hidream": (hidream, hidream_inputs), "lumina2": (lumina2, lumina2_inputs)}


def relative_error(y, reference):
    return ((y - reference).norm() / reference.norm()).item()


@pytest.fixture(scope="module", params=sorted(MODELS))
def compiled(request):
    build, inputs = MODELS[request.param]
    calib = [inputs(8, seed=seed) for seed in range(3)]
    model = compile_eager(build(), inputs(8), QuantConfig.preset("int4"), calib_inputs=calib,
                          reason="torch.export failed (test)")
    return request.param, model, build(), inputs


def test_linears_are_swapped_with_roles_from_the_recording(compiled):
    name, model, _, _ = compiled
    report = model.svdq_eager.report
    swapped = [m for m in model.modules() if isinstance(m, SVDQLinear)]
    assert report["path"] == "eager" and report["path_reason"] == "torch.export failed (test)"
    assert len(swapped) == report["eager"]["swapped_linears"] > 10
    roles = {info["name"]: info["role"] for info in report["linears"]}
    # annotate_linears' structural roles, read from the recorded forward: attention inputs are q/k/v and share
    # one group (one activation quantization), outputs of attention are out projections
    block = "double_stream_blocks.0.block.attn1" if name == "hidream" else "layers.0.attn"
    assert roles[f"{block}.to_q"] == roles[f"{block}.to_k"] == Role.QKV.value
    assert model.get_submodule(f"{block}.to_q").group is model.get_submodule(f"{block}.to_k").group
    assert roles[f"{block}.to_out" if name == "hidream" else f"{block}.to_out.0"] == Role.OUT.value


def test_runs_at_two_resolutions_close_to_the_float_model(compiled):
    name, model, reference, inputs = compiled
    with torch.no_grad():
        for size, text in ((8, 4), (16, 6)):
            x = inputs(size, text=text, seed=7)
            y, expected = model(**x)[0], reference(**x)[0]
            assert y.shape == expected.shape
            assert 0 < relative_error(y, expected) < 0.08, (name, size)


def test_a_group_recomputes_for_a_new_input(compiled):
    """q/k/v share one computation while the input is the same tensor; another tensor is computed afresh."""
    name, model, reference, _ = compiled
    block = "double_stream_blocks.0.block.attn1" if name == "hidream" else "layers.0.attn"
    to_q, to_k = model.get_submodule(f"{block}.to_q"), model.get_submodule(f"{block}.to_k")
    a, b = torch.randn(2, 5, to_q.in_features), torch.randn(2, 5, to_q.in_features)
    with torch.no_grad():
        q_a = to_q(a)
        k_b = to_k(b)
        assert torch.equal(k_b, to_k(b.clone()))
        assert not torch.equal(q_a, to_q(b))
        b.mul_(2)  # changed in place: same object, new version
        assert torch.equal(to_k(b), to_k(b.clone()))
