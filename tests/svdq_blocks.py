"""A tiny block that exercises every fused form: compiled by the ONNX and fresh-process tests."""

import torch
import torch.nn.functional as F

import svdq_compiler
from svdq_compiler.models import DynDim


class Block(torch.nn.Module):
    """Two embedding layers (kept 16-bit), a q/k-like pair sharing its input (one kernel A over the concatenated
    branch), a gated product (epilogue + quantize-next), a plain-GELU input (shifted uint4), a final layer."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.emb = torch.nn.Linear(64, 128), torch.nn.Linear(128, 128)
        self.a, self.b, self.c, self.d = (torch.nn.Linear(128, 128) for _ in range(4))
        self.out = torch.nn.Linear(128, 64)

    def forward(self, x):
        h = F.silu(self.emb(F.gelu(self.inp(x))))
        g = F.gelu(self.a(h)) * self.b(h)
        return self.out(h + self.d(F.gelu(self.c(g))))


def compile_block(preset):
    calib = [{"x": torch.randn(2, 8, 64, generator=torch.Generator().manual_seed(seed))} for seed in range(2)]
    with torch.no_grad():
        return svdq_compiler.compile(Block().eval(), {"x": torch.randn(2, 8, 64)}, preset, calib_inputs=calib,
                                     dynamic_shapes={"x": {1: DynDim("tokens", 2, 64)}})
