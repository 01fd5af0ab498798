"""Before graphs for the one-pass tests (TVM style): a tiny captured module whose annotations, calibration and
quantized weights are written by hand, so a test runs exactly one pass and a regression in another pass cannot
fail it. `run_one` applies the pass through `run_passes` with verification on (the IR's invariants, the stage's
op allow-list and the pass's own `ensures`); the tests compare `format_ir` with FileCheck."""

from __future__ import annotations

import torch

import svdq_compiler
from svdq_compiler.calibration import Calibration, SiteStats
from svdq_compiler.config import Scheme
from svdq_compiler.fx_utils import is_linear
from svdq_compiler.ir import LinearInfo, Role, set_info
import svdq_compiler.passes  # noqa: F401  (registers the passes)
from svdq_compiler.pipeline import PASS_REGISTRY, PassContext, run_passes

W4A4 = Scheme(weight="int4", act="int4", weight_group=64, act_group=64, smooth=True, rank=8)


class SharedInput(torch.nn.Module):
    """Two linears reading one tensor (one smoothing group), a third reading their sum."""

    def __init__(self, k: int = 64, n: int = 32):
        super().__init__()
        self.a, self.b, self.c = torch.nn.Linear(k, n), torch.nn.Linear(k, n), torch.nn.Linear(n, n)

    def forward(self, x):
        return self.c(self.a(x) + self.b(x))


class ProjectedMlp(torch.nn.Module):
    """x @ Wᵀ (a matmul for annotate_linears to canonicalize), a normed GELU MLP with a residual, a final linear."""

    def __init__(self, gelu: str = "tanh"):
        super().__init__()
        self.gelu = gelu
        self.w = torch.nn.Parameter(torch.randn(64, 64) / 8)
        self.norm = torch.nn.LayerNorm(64)
        self.fc1, self.fc2, self.out = torch.nn.Linear(64, 128), torch.nn.Linear(128, 64), torch.nn.Linear(64, 16)

    def forward(self, x):
        h = x @ self.w.t()
        return self.out(h + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm(h)), approximate=self.gelu)))


def outlier_rows(rows: int = 48, k: int = 64, seed: int = 0) -> torch.Tensor:
    """Rows with two channels 25× the rest (what smoothing is for)."""
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(seed))
    x[:, 3] *= 25
    x[:, 17] *= 25
    return x


def before(model: torch.nn.Module, x: torch.Tensor, schemes: dict[str, Scheme], *, groups: dict[str, str] | None
           = None) -> torch.fx.GraphModule:
    """Capture `model` on `x` and annotate each linear named in `schemes` by hand (role other; the group of
    `groups`, else its own name)."""
    gm = svdq_compiler.capture(model.eval(), (x,), dynamic_shapes=None)
    for node in [n for n in gm.graph.nodes if is_linear(n)]:
        name = node.args[1].target.removesuffix(".weight")
        if name not in schemes:
            continue
        weight = gm.get_parameter(node.args[1].target)
        bias = node.args[2].target if len(node.args) > 2 and node.args[2] is not None else None
        set_info(node, LinearInfo(name=name, weight=node.args[1].target, bias=bias, in_features=weight.shape[1],
                                  out_features=weight.shape[0], role=Role.OTHER, scheme=schemes[name],
                                  group=(groups or {}).get(name, name), shift=schemes[name].shift))
    return gm


def calibration_of(gm: torch.fx.GraphModule, rows: dict[str, torch.Tensor]) -> Calibration:
    """A Calibration whose site for the tensor named `site` holds exactly `rows[site]` (readers from the
    annotations), as if calibrate had seen those rows and nothing else."""
    sites = {}
    for node in gm.graph.nodes:
        info = node.meta.get("svdq")
        if isinstance(info, LinearInfo) and info.scheme.kind != "fp":
            site = node.args[0].name
            if site not in sites:
                sample = rows[site]
                sites[site] = SiteStats(node=site, readers=[], minimum=sample.amin(0), maximum=sample.amax(0),
                                        rows=sample, priorities=torch.rand(sample.shape[0]),
                                        rows_seen=sample.shape[0])
            sites[site].readers.append(info.name)
    return Calibration(sites=sites, source="hand-built", inputs=1)


def context(preset: str = "int4", *, available=("linears",), **fields) -> PassContext:
    config = fields.pop("config", None) or svdq_compiler.QuantConfig.preset(preset)
    return PassContext(config=config, verify_each=True, available=set(available), **fields)


def run_one(gm: torch.fx.GraphModule, ctx: PassContext, name: str) -> torch.fx.GraphModule:
    """Apply the one pass `name` (verified: run_passes raises on a broken invariant or contract)."""
    return run_passes(gm, ctx, [PASS_REGISTRY[name]])
