"""A diffusers model called with inputs no adapter can rebuild (the user's own, from its pipeline): torch.export's
automatic dimensions make the graph run at other sizes; an input torch.export cannot take, or a size carried in
a Python int, sends the compile down the eager path with the reason."""

import copy

import pytest
import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config

import svdq_compiler
from svdq_compiler.capture import CAPTURE_META
from svdq_compiler.eager import compile_report_of
from svdq_compiler.errors import ShapeError
from svdq_compiler.models import adapter_for


class PairStack(ModelMixin, ConfigMixin):
    """A denoiser whose forward no adapter lays out: per-residue features, a residue-pair map and a mask."""

    @register_to_config
    def __init__(self, width: int = 64):
        super().__init__()
        self.single, self.pair, self.out = (torch.nn.Linear(width, width) for _ in range(3))

    def forward(self, residues, pair_map, residue_mask):
        hidden = self.single(residues) * residue_mask[..., None] + self.pair(pair_map).mean(2)
        return self.out(torch.nn.functional.gelu(hidden))


class TokenStack(ModelMixin, ConfigMixin):
    """A token denoiser with an input layout of its own: blocks of MLPs over masked tokens."""

    @register_to_config
    def __init__(self, width: int = 64, depth: int = 2):
        super().__init__()
        self.proj_in, self.proj_out = torch.nn.Linear(width, width), torch.nn.Linear(width, width)
        self.blocks = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(width, 2 * width), torch.nn.GELU(), torch.nn.Linear(2 * width, width))
            for _ in range(depth))

    def forward(self, tokens, token_mask, length=None, cache=None):
        hidden = self.proj_in(tokens) * token_mask[..., None]
        for block in self.blocks:
            hidden = hidden + block(hidden)
        if length is not None:  # a size handed over as a Python int: a graph would keep this one
            hidden = hidden[:, :length]
        return self.proj_out(hidden)


class Cache:
    """Stands for a key-value cache object a pipeline threads through its calls."""


def pair_inputs(batch: int, residues: int, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {"residues": torch.randn(batch, residues, 64, generator=generator),
            "pair_map": torch.randn(batch, residues, residues, 64, generator=generator),
            "residue_mask": torch.ones(batch, residues)}


def model():
    torch.manual_seed(0)
    return PairStack().eval()


def test_own_inputs_get_automatic_dimensions_and_run_at_other_sizes():
    net = model()
    assert adapter_for(net).sizes_of(net, pair_inputs(2, 6)) is None  # the auto adapter cannot rebuild these
    gm = svdq_compiler.capture(net, pair_inputs(2, 6))
    report = gm.meta[CAPTURE_META]
    assert report["automatic_dims"]["failed"] is None and "cannot rebuild" in report["automatic_dims"]["reason"]
    dynamic = {(d["input"], d["index"]): d["name"] for d in report["dims"] if d["status"] == "dynamic"}
    # batch and residue count, one symbol each where the code ties them (the pair map is averaged over its
    # second residue axis, which nothing ties); the width, a Linear's, stays static
    assert dynamic == {("residues", 0): "residues_0", ("pair_map", 0): "residues_0", ("residue_mask", 0): "residues_0",
                       ("residues", 1): "residues_1", ("pair_map", 1): "residues_1", ("pair_map", 2): "pair_map_2",
                       ("residue_mask", 1): "residues_1"}
    assert all("automatic" in d["why_dynamic"] for d in report["dims"] if d["status"] == "dynamic")
    for batch, residues in [(3, 9), (4, 3)]:
        inputs = pair_inputs(batch, residues, seed=1)
        with torch.no_grad():
            torch.testing.assert_close(gm(**inputs), net(**inputs), rtol=0, atol=0)
    with pytest.raises(ShapeError, match="residues_1"):  # one symbol: the pair map must follow the residues
        gm(**{**pair_inputs(2, 7), "pair_map": torch.zeros(2, 8, 8, 64)})


def test_without_automatic_dimensions_the_graph_is_static():
    net = model()
    gm = svdq_compiler.capture(net, pair_inputs(2, 6), dynamic_shapes=None)
    assert gm.meta[CAPTURE_META]["dims"] == [] and gm.meta[CAPTURE_META]["automatic_dims"] is None
    with pytest.raises(ShapeError, match="not declared dynamic"):
        gm(**pair_inputs(2, 9))


def test_a_plain_module_stays_as_declared():
    class Plain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(64, 64)

        def forward(self, residues):
            return self.proj(residues)

    gm = svdq_compiler.capture(Plain().eval(), {"residues": torch.randn(2, 6, 64)})
    assert gm.meta[CAPTURE_META]["dims"] == [] and gm.meta[CAPTURE_META]["automatic_dims"] is None


def test_a_failed_automatic_export_falls_back_to_static(monkeypatch):
    from torch.export.dynamic_shapes import _DimHint

    export = torch.export.export

    def refuse_hints(module, args, kwargs=None, *, dynamic_shapes=None, **options):
        hints = torch.utils._pytree.tree_leaves(dynamic_shapes, is_leaf=lambda x: isinstance(x, _DimHint))
        if any(isinstance(hint, _DimHint) for hint in hints):
            raise RuntimeError("automatic dimensions refused (test)")
        return export(module, args, kwargs, dynamic_shapes=dynamic_shapes, **options)

    monkeypatch.setattr(torch.export, "export", refuse_hints)
    gm = svdq_compiler.capture(model(), pair_inputs(2, 6))
    report = gm.meta[CAPTURE_META]
    assert report["automatic_dims"]["failed"] == "automatic dimensions refused (test)" and report["dims"] == []


def token_inputs(batch: int, tokens: int, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {"tokens": torch.randn(batch, tokens, 64, generator=generator), "token_mask": torch.ones(batch, tokens)}


@pytest.mark.parametrize("extra, why", [
    ({"cache": Cache()}, "cache (Cache): an object torch.export cannot take as a graph input"),
    ({"length": 6}, "length carry sizes as Python values"),
])
def test_inputs_a_graph_cannot_generalize_take_the_eager_path(extra, why):
    torch.manual_seed(0)
    net = TokenStack().eval()
    fp32 = copy.deepcopy(net)  # the eager path swaps the model's own linears
    inputs = {**token_inputs(2, 6), **extra}
    compiled = svdq_compiler.compile(net, inputs, "int4", calib_inputs=[inputs])
    report = compile_report_of(compiled)
    assert report["path"] == "eager" and why in report["path_reason"], report["path_reason"]
    other = {**token_inputs(3, 9, seed=1), **({"length": 9} if "length" in extra else extra)}
    with torch.no_grad():
        got, want = compiled(**other), fp32(**other)
    assert got.shape == want.shape == (3, 9, 64) and float((got - want).norm() / want.norm()) < 0.2
