"""fuse: Before (hand-built lowered graphs in the form of docs/architecture.md) → fuse → Expected structure, the
statistics, and the numbers (bit for bit on the reference backend, within rounding through the kernels)."""

import operator

import pytest
import torch
import torch.nn.functional as F
from fuse_check import checking_kernels
from torch import nn
from torch.testing import FileCheck

import svdq_compiler
import svdq_compiler.ops  # noqa: F401
import svdq_compiler.passes  # noqa: F401  (registers the passes)
from svdq_compiler import quant
from svdq_compiler.codegen.fused_ops import kernel_backend
from svdq_compiler.codegen.layout import pack_weight
from svdq_compiler.codegen.spec import parse_spec
from svdq_compiler.config import QuantConfig
from svdq_compiler.ir import QuantOpInfo, format_ir, info, set_info
from svdq_compiler.pipeline import PASS_REGISTRY, PassContext

ops = torch.ops.svdq
aten = torch.ops.aten
BF16 = torch.bfloat16
SHIFT = 0.171875


def _param(*shape, scale=1.0, seed=0, positive=False):
    gen = torch.Generator().manual_seed(seed)
    value = torch.rand(*shape, generator=gen) + 0.5 if positive else torch.randn(*shape, generator=gen) * scale
    return nn.Parameter(value.to(BF16), requires_grad=False)


class QLinear(nn.Module):
    """The tensors `lower` stores for one quantized linear."""

    def __init__(self, k, n, rank, fmt="int4", group=64, seed=0, bias=True):
        super().__init__()
        w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) / k ** 0.5
        packed = pack_weight(quant.quantize_weight(w.to(BF16), fmt, group))
        self.register_buffer("qweight", packed.qweight)
        self.register_buffer("wscales", packed.wscales)
        self.wtscale = None
        if packed.wtscale is not None:
            self.register_buffer("wtscale", packed.wtscale)
        self.lora_up = _param(n, rank, scale=0.1, seed=seed + 1) if rank else None
        self.bias = _param(n, seed=seed + 2) if bias else None
        self.fmt, self.group, self.k = fmt, group, k

    def gemm(self, codes, scales, act_fmt=None):
        return ops.gemm(codes, scales, self.qweight, self.wscales, self.wtscale, act_fmt or self.fmt, self.group,
                        self.k, BF16)

    def out(self, codes, scales, down, act_fmt=None):
        acc = self.gemm(codes, scales, act_fmt)
        if self.lora_up is None:
            return acc + self.bias if self.bias is not None else acc
        return acc + F.linear(down, self.lora_up, self.bias)


class LoweredBlock(nn.Module):
    """q/k/v sharing λ and L2; out-projection with a gate and a residual; an MLP fc1 → GELU → fc2 (shifted
    uint4) whose fc2 output is gated into the residual; a single-block-style group where two linears share λ
    but have their own L2 (q2 and mlp2); and a ragged-K layer."""

    def __init__(self, d=64, hidden=128, rank=16):
        super().__init__()
        self.smooth_qkv = _param(d, positive=True, seed=1)
        self.down_qkv = _param(rank, d, scale=0.1, seed=2)
        self.q, self.k, self.v = (QLinear(d, d, rank, seed=s) for s in (10, 20, 30))
        self.smooth_out = _param(d, positive=True, seed=3)
        self.down_out = _param(rank, d, scale=0.1, seed=4)
        self.o = QLinear(d, d, rank, seed=40)
        self.smooth_fc1 = _param(d, positive=True, seed=5)
        self.down_fc1 = _param(rank, d, scale=0.1, seed=6)
        self.fc1 = QLinear(d, hidden, rank, seed=50)
        self.smooth_fc2 = _param(hidden, positive=True, seed=7)
        self.down_fc2 = _param(rank, hidden, scale=0.1, seed=8)
        self.fc2 = QLinear(hidden, d, rank, seed=60)
        self.smooth_single = _param(d, positive=True, seed=9)
        self.down_single_a = _param(rank, d, scale=0.1, seed=11)
        self.down_single_b = _param(8, d, scale=0.1, seed=12)
        self.q2 = QLinear(d, d, rank, seed=70)
        self.mlp2 = QLinear(d, hidden, 8, seed=80, bias=False)

    def forward(self, x, gate, residual):
        codes, scales = ops.quantize_act(x, self.smooth_qkv, 0.0, "int4", 64)
        down = F.linear(x / self.smooth_qkv, self.down_qkv)
        q, k, v = (lin.out(codes, scales, down) for lin in (self.q, self.k, self.v))
        attn = torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v
        codes, scales = ops.quantize_act(attn, self.smooth_out, 0.0, "int4", 64)
        down = F.linear(attn / self.smooth_out, self.down_out)
        h = residual + gate * self.o.out(codes, scales, down)
        codes, scales = ops.quantize_act(h, self.smooth_fc1, 0.0, "int4", 64)
        down = F.linear(h / self.smooth_fc1, self.down_fc1)
        act = F.gelu(self.fc1.out(codes, scales, down), approximate="tanh")
        codes, scales = ops.quantize_act(act, self.smooth_fc2, SHIFT, "uint4", 64)
        down = F.linear(act / self.smooth_fc2, self.down_fc2)
        h = h + gate * self.fc2.out(codes, scales, down, "uint4")
        codes, scales = ops.quantize_act(h, self.smooth_single, 0.0, "int4", 64)
        smoothed = h / self.smooth_single
        a = self.q2.out(codes, scales, F.linear(smoothed, self.down_single_a))
        b = F.silu(self.mlp2.out(codes, scales, F.linear(smoothed, self.down_single_b)))
        return a.sum(-1, keepdim=True) + b


def _inputs(tokens=9, d=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return ((torch.randn(2, tokens, d, generator=gen)).to(BF16), torch.randn(2, 1, d, generator=gen).to(BF16),
            torch.randn(2, tokens, d, generator=gen).to(BF16))


def _lowered(model, inputs, dynamic=True):
    tokens = torch.export.Dim("tokens", min=2, max=256)
    dynamic_shapes = ({1: tokens}, None, {1: tokens}) if dynamic else None
    gm = svdq_compiler.capture(model, inputs, dynamic_shapes=dynamic_shapes)
    for node in gm.graph.nodes:  # what lower records on its gemm nodes
        if node.target == ops.gemm.default:
            weight = node.args[2].target.rsplit(".", 1)[0]
            set_info(node, QuantOpInfo("svdq.gemm", [f"block.{weight}"]))
    return gm


def _fuse(gm):
    result = PASS_REGISTRY["fuse"](gm, PassContext(config=QuantConfig.preset("int4")))
    result.gm.recompile()
    return result


def _targets(gm):
    return [node.target for node in gm.graph.nodes if node.op == "call_function"]


def _fused_specs(gm, op):
    return [parse_spec(node.args[-1]) for node in gm.graph.nodes if node.target == op]


@pytest.fixture(scope="module")
def block():
    model = LoweredBlock().eval()
    inputs = _inputs()
    before = _lowered(model, inputs)
    with kernel_backend("reference"):
        expected = before(*inputs)
    result = _fuse(_lowered(model, inputs))
    return model, inputs, expected, result


def test_structure_after_fuse(block):
    _, _, _, result = block
    gm = result.gm
    targets = _targets(gm)
    # Before: 5 quantize_act, 8 gemm, 6 down + 8 up linears. Expected: only fused ops remain, plus the attention,
    # the final sum and getitems. Three quantizations moved into the epilogue of the GEMM that produces their
    # input (fc1's into the out-projection, fc2's into fc1, the single group's into fc2): two kernel A remain.
    assert ops.gemm.default not in targets and ops.quantize_act.default not in targets
    assert aten.linear.default not in targets and aten.gelu.default not in targets and aten.silu.default not in targets
    assert aten.div.Tensor not in targets
    assert targets.count(ops.fused_quantize_lora_down.default) == 2
    assert targets.count(ops.fused_gemm.default) == 8
    assert [s.rank for s in _fused_specs(gm, ops.fused_quantize_lora_down.default)] == [16, 16]
    gemms = {tuple(info(n).linears)[0]: parse_spec(n.args[-1]) for n in gm.graph.nodes
             if n.target == ops.fused_gemm.default}
    assert [s.kind for s in gemms["block.o"].epilogue] == ["mul", "add"]
    # h = residual + gate·o(…) feeds fc1's quantizer and, later, the second residual add: it is stored too
    assert gemms["block.o"].quantize_next.quant.fmt == "int4" and gemms["block.o"].quantize_next.emit_output
    fc1 = gemms["block.fc1"]
    assert [s.kind for s in fc1.epilogue] == ["gelu_tanh"]
    assert fc1.quantize_next.quant.fmt == "uint4" and fc1.quantize_next.quant.shift == SHIFT
    assert fc1.quantize_next.rank == 16 and not fc1.quantize_next.emit_output  # the GELU output is never stored
    fc2 = gemms["block.fc2"]
    assert fc2.act == "uint4" and [s.kind for s in fc2.epilogue] == ["mul", "add"]
    # the single group: two linears share λ but have their own L2 → one quantization, L2 concatenated (16 + 8)
    assert fc2.quantize_next.rank == 24 and not fc2.quantize_next.emit_output
    # silu, then "+ a.sum(-1, keepdim=True)": an operand with one value per token
    assert [s.kind for s in gemms["block.mlp2"].epilogue] == ["silu", "add"] and not gemms["block.mlp2"].bias
    assert gemms["block.q"].epilogue == () and gemms["block.q"].k == 64 and gemms["block.q"].n == 64
    # each fused node's annotation holds, frozen, the spec its string argument encodes
    fused = [n for n in gm.graph.nodes if n.target in (ops.fused_gemm.default, ops.fused_quantize_lora_down.default)]
    assert len(fused) == 10 and all(info(n).spec == parse_spec(n.args[-1]) for n in fused)
    # the concatenated L2 replaced the two originals; nothing is left unused
    names = {name for name, _ in result.gm.named_buffers()} | {n for n, _ in result.gm.named_parameters()}
    assert "down_single_a_fused_cat" in names and "down_single_a" not in names and "down_single_b" not in names
    from svdq_compiler.passes.verify import problems_in
    assert problems_in(result.gm) == []
    # the Expected graph as text (format_ir): q/k/v read one kernel A; o's GEMM carries the gate·o + residual
    # epilogue and quantizes fc1's input; fc1's GELU output is quantized for fc2 inside its GEMM
    FileCheck().check("# svdq: svdq.fused_quantize_lora_down for block.q, block.k, block.v") \
        .check("# svdq: svdq.fused_gemm for block.q").check("# svdq: svdq.fused_gemm for block.k") \
        .check("# svdq: svdq.fused_gemm for block.v").check("torch.ops.aten.softmax") \
        .check("# svdq: svdq.fused_quantize_lora_down for block.o") \
        .check("# svdq: svdq.fused_gemm for block.o epilogue=({'kind': 'mul'").check("[gate, residual]") \
        .check("# svdq: svdq.fused_gemm for block.fc1 epilogue=({'kind': 'gelu_tanh'") \
        .check('"quantize_next":{"emit_output":false,"quant":{"fmt":"uint4"') \
        .check("# svdq: svdq.fused_gemm for block.fc2").run(format_ir(result.gm))


def test_statistics(block):
    stats = block[3].stats
    assert stats["linears_fused"] == 8 and stats["kernel_a"] == 2 and stats["quantize_absorbed"] == 3
    assert stats["lora_down_concatenated"] == 1
    assert stats["epilogues"] == {"add": 3, "gelu_tanh": 1, "mul": 2, "quantize_next": 3, "silu": 1}
    assert stats["fallen_back"] == 0 and stats["fallbacks"] == []


def test_numbers_equal_the_lowered_graph_on_the_reference_backend(block):
    model, inputs, expected, result = block
    with kernel_backend("reference"):
        torch.testing.assert_close(result.gm(*inputs), expected, rtol=0, atol=0)
        # another token count: the symbolic dimension survived
        other = _inputs(tokens=5, seed=3)
        torch.testing.assert_close(result.gm(*other), _lowered(model, inputs)(*other), rtol=0, atol=0)


def test_each_fused_node_through_the_kernels_matches_its_reference(block):
    _, inputs, _, result = block
    with checking_kernels() as checked:
        result.gm(*inputs)
    assert checked == {"fused_quantize_lora_down": 2, "fused_gemm": 8}


class Unfusable(nn.Module):
    """int4 with groups of 16 has no kernel (split-half dots need K ≥ 16 per half): it must fall back."""

    def __init__(self):
        super().__init__()
        self.smooth = _param(64, positive=True)
        self.lin = QLinear(64, 32, 0, group=16, seed=3)

    def forward(self, x):
        codes, scales = ops.quantize_act(x, self.smooth, 0.0, "int4", 16)
        return self.lin.out(codes, scales, None)


def test_unsupported_chains_fall_back_with_reasons():
    x = torch.randn(3, 64).to(BF16)
    gm = _lowered(Unfusable(), (x,), dynamic=False)
    with kernel_backend("reference"):
        expected = gm(x)
    result = _fuse(gm)
    assert not result.modified
    assert result.stats["fallen_back"] == 2
    reasons = [f["reason"] for f in result.stats["fallbacks"]]
    assert any("kernel B" in r and "group size of at least 32" in r for r in reasons)
    assert any("kernel A" in r for r in reasons)
    assert ops.gemm.default in _targets(result.gm)
    with kernel_backend("reference"):
        torch.testing.assert_close(result.gm(x), expected, rtol=0, atol=0)


class SharedOutput(nn.Module):
    """The GELU output feeds fc2's quantizer and something else: the epilogue must also store it."""

    def __init__(self):
        super().__init__()
        self.smooth1, self.smooth2 = _param(64, positive=True, seed=1), _param(64, positive=True, seed=2)
        self.fc1, self.fc2 = QLinear(64, 64, 0, seed=1), QLinear(64, 64, 0, seed=2, bias=False)

    def forward(self, x):
        codes, scales = ops.quantize_act(x, self.smooth1, 0.0, "int4", 64)
        act = F.gelu(self.fc1.out(codes, scales, None))
        codes, scales = ops.quantize_act(act, self.smooth2, SHIFT, "uint4", 64)
        return self.fc2.out(codes, scales, None, "uint4") + act


def test_quantize_next_keeps_the_output_when_others_read_it():
    x = torch.randn(2, 5, 64).to(BF16)
    gm = _lowered(SharedOutput(), (x,), dynamic=False)
    with kernel_backend("reference"):
        expected = gm(x)
    result = _fuse(gm)
    specs = _fused_specs(result.gm, ops.fused_gemm.default)
    assert specs[0].quantize_next.emit_output and specs[0].quantize_next.rank == 0
    assert [s.kind for s in specs[0].epilogue] == ["gelu_erf"]
    assert [s.kind for s in specs[1].epilogue] == ["add"]  # fc2 + act, with act the stored output
    assert result.stats["kernel_a"] == 1 and result.stats["quantize_absorbed"] == 1
    with kernel_backend("reference"):
        torch.testing.assert_close(result.gm(x), expected, rtol=0, atol=0)
    getitems = [n for n in result.gm.graph.nodes if n.target is operator.getitem
                and n.args[0].target == ops.fused_gemm.default]
    assert len(getitems) == 4  # fc1: y, codes, scales; fc2: y


def test_ir_dump_writes_the_generated_kernels(tmp_path):
    from svdq_compiler.pipeline import run_passes

    x = torch.randn(2, 5, 64).to(BF16)
    gm = _lowered(SharedOutput(), (x,), dynamic=False)
    ctx = PassContext(config=QuantConfig.preset("int4"), dump_dir=tmp_path, available={"lowered"})
    run_passes(gm, ctx, [PASS_REGISTRY["fuse"]])
    text = (tmp_path / "001_fuse.kernels.py").read_text()
    assert text.count("# ===== fused_") == 3  # kernel A, fc1's B (with quantize-next), fc2's B
    assert "def svdq_quantize_int4_r0_" in text and "quantize for the next layer [uint4" in text


class WLinear(nn.Module):
    """The tensors `lower` stores for one weight-only (W4A16) linear, and the op it lowers to."""

    def __init__(self, k, n, fmt="nf4", group=64, seed=0, bias=True):
        super().__init__()
        w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) / k ** 0.5
        packed = pack_weight(quant.quantize_weight(w.to(BF16), fmt, group))
        self.register_buffer("qweight", packed.qweight)
        self.register_buffer("wscales", packed.wscales)
        self.bias = _param(n, seed=seed + 2) if bias else None
        self.fmt, self.group = fmt, group

    def forward(self, x):
        return ops.weight_only_linear(x, self.qweight, self.wscales, self.bias, self.fmt, self.group)


class WeightOnlyBlock(nn.Module):
    """A FLUX-style block under W4A16: AdaLN modulation (SiLU(temb) → int4 → chunks), an nf4 MLP (fc1 → GELU →
    fc2, gated into the residual), an nf4 layer with a LoRA adapter beside it followed by SiLU, and an int4 layer
    with groups of 16, which has no kernel."""

    def __init__(self, d=64, hidden=128, rank=8):
        super().__init__()
        self.adaln = WLinear(d, 3 * d, "int4", seed=1)
        self.fc1, self.fc2 = WLinear(d, hidden, seed=2), WLinear(hidden, d, seed=3, bias=False)
        self.proj = WLinear(d, d, seed=4)
        self.lora_a, self.lora_b = _param(rank, d, scale=0.1, seed=5), _param(d, rank, scale=0.1, seed=6)
        self.small = WLinear(d, d, "int4", group=16, seed=7)

    def forward(self, x, temb):
        shift, scale, gate = self.adaln(F.silu(temb)).unsqueeze(1).chunk(3, dim=-1)
        h = x * (1 + scale) + shift
        out = x + gate * self.fc2(F.gelu(self.fc1(h), approximate="tanh"))
        adapted = F.silu(self.proj(out) + F.linear(F.linear(out, self.lora_a), self.lora_b))
        return adapted + self.small(out)


def test_weight_only_chains_become_kernel_w_with_their_epilogues():
    gen = torch.Generator().manual_seed(0)
    inputs = (torch.randn(2, 9, 64, generator=gen).to(BF16), torch.randn(2, 64, generator=gen).to(BF16))
    model = WeightOnlyBlock().eval()
    tokens = torch.export.Dim("tokens", min=2, max=256)
    capture = lambda: svdq_compiler.capture(model, inputs, dynamic_shapes=({1: tokens}, None))  # noqa: E731
    before = capture()
    with kernel_backend("reference"):
        expected = before(*inputs)
    result = _fuse(capture())
    gm = result.gm
    targets = _targets(gm)
    # Before: 5 weight_only_linear, the LoRA's two linears, GELU, SiLU, the gate, residual and final adds.
    # Expected: 4 kernel W; the int4 g16 layer stays; the LoRA's down projection stays an aten.linear.
    assert targets.count(ops.fused_weight_only_linear.default) == 4
    assert targets.count(ops.weight_only_linear.default) == 1 and targets.count(aten.linear.default) == 1
    assert aten.gelu.default not in targets and targets.count(aten.silu.default) == 1  # SiLU(temb) is an input
    specs = {node.args[1].target.rsplit(".", 1)[0]: parse_spec(node.args[-1]) for node in gm.graph.nodes
             if node.target == ops.fused_weight_only_linear.default}
    assert specs["adaln"].weight == "int4" and specs["adaln"].epilogue == () and specs["adaln"].n == 192
    assert specs["fc1"].weight == "nf4" and [s.kind for s in specs["fc1"].epilogue] == ["gelu_tanh"]
    assert [s.kind for s in specs["fc2"].epilogue] == ["mul", "add"] and not specs["fc2"].bias
    assert specs["proj"].rank == 8 and [s.kind for s in specs["proj"].epilogue] == ["silu", "add"]
    stats = result.stats
    assert stats["weight_only_fused"] == 4 and stats["weight_only_kept"] == 1 and stats["linears_fused"] == 0
    assert stats["epilogues"] == {"add": 2, "gelu_tanh": 1, "mul": 1, "silu": 1}
    assert [f["reason"] for f in stats["fallbacks"]] == [
        "kernel W: weight-only kernels need a power-of-two group size of at least 32, got 16"]
    from svdq_compiler.passes.verify import problems_in
    assert problems_in(gm) == []
    with kernel_backend("reference"):
        torch.testing.assert_close(gm(*inputs), expected, rtol=0, atol=0)
        other = (torch.randn(2, 5, 64, generator=gen).to(BF16), inputs[1])  # another token count
        torch.testing.assert_close(gm(*other), before(*other), rtol=0, atol=0)
    with checking_kernels() as checked:
        gm(*inputs)
    assert checked == {"fused_weight_only_linear": 4}
