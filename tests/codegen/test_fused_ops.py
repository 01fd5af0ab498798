"""The fused custom ops: dispatch between the kernels and the reference, fake shapes, export and reload."""

import pytest
import torch

import svdq_compiler.ops  # noqa: F401
from svdq_compiler import quant
from svdq_compiler.codegen import fused_ops
from svdq_compiler.codegen.fused_ops import kernel_backend, resolve_backend
from svdq_compiler.codegen.layout import pack_weight
from svdq_compiler.codegen.spec import ActQuant, Epilogue, GemmSpec, QuantizeNext, QuantizeSpec
from svdq_compiler.errors import InputError

ops = torch.ops.svdq
K, N, R = 64, 32, 16
QUANTIZE = QuantizeSpec(ActQuant("int4", 64), R, "bfloat16", k=K)
GEMM = GemmSpec("int4", 64, R, True, "bfloat16", k=K, n=N, epilogue=(Epilogue("gelu_tanh"), Epilogue("add")),
                quantize_next=QuantizeNext(ActQuant("uint4", 64, 0.171875), rank=R, emit_output=True))


@pytest.fixture(scope="module")
def tensors():
    gen = torch.Generator().manual_seed(0)
    bf16 = lambda *shape, scale=1.0: (torch.randn(*shape, generator=gen) * scale).to(torch.bfloat16)  # noqa: E731
    weight = pack_weight(quant.quantize_weight(bf16(N, K, scale=0.1), "int4", 64))
    return dict(x=bf16(2, 9, K), smooth=(torch.rand(K, generator=gen) + 0.5).to(torch.bfloat16),
                lora_down=bf16(R, K, scale=0.1), weight=weight, lora_up=bf16(N, R, scale=0.1), bias=bf16(N),
                residual=bf16(2, 9, N), next_smooth=(torch.rand(N, generator=gen) + 0.5).to(torch.bfloat16),
                next_lora_down=bf16(R, N, scale=0.1))


def _run(t, x=None):
    x = t["x"] if x is None else x
    codes, scales, down = ops.fused_quantize_lora_down(x, t["smooth"], t["lora_down"], None, QUANTIZE.to_string())
    w = t["weight"]
    outputs = ops.fused_gemm(codes, scales, w.qweight, w.wscales, w.wtscale, down, t["lora_up"], t["bias"],
                             [t["residual"][: x.shape[0]]], t["next_smooth"], t["next_lora_down"], None, None,
                             GEMM.to_string())
    return (codes, scales, down), outputs


def test_backend_choice(monkeypatch):
    monkeypatch.delenv("SVDQ_KERNELS", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert resolve_backend(torch.device("cpu")) == "reference"
    assert resolve_backend(torch.device("cuda")) == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend(torch.device("cpu")) == "triton"
    monkeypatch.setenv("SVDQ_KERNELS", "reference")
    assert resolve_backend(torch.device("cpu")) == "reference"
    with kernel_backend("triton"):
        assert resolve_backend(torch.device("cpu")) == "triton"
        with kernel_backend(None):
            assert resolve_backend(torch.device("cpu")) == "reference"
    monkeypatch.setenv("SVDQ_KERNELS", "cuda")
    with pytest.raises(InputError, match=r"\$SVDQ_KERNELS='cuda' is not a kernel backend"):
        resolve_backend(torch.device("cpu"))
    with pytest.raises(InputError, match="unknown kernel backend"):
        with kernel_backend("fast"):
            pass


def test_kernels_and_reference_agree_through_the_ops(tensors):
    with kernel_backend("reference"):
        (ref_codes, ref_scales, ref_down), ref_out = _run(tensors)
    with kernel_backend("triton"):
        (codes, scales, down), out = _run(tensors)
    assert torch.equal(codes, ref_codes) and torch.equal(scales, ref_scales)
    torch.testing.assert_close(down, ref_down)
    assert [o.shape for o in out] == [o.shape for o in ref_out] == [(2, 9, N), (2, 9, 32), (2, 9, 1), (2, 9, R)]
    torch.testing.assert_close(out[0], ref_out[0], rtol=2e-2, atol=2e-2)
    assert (out[1] != ref_out[1]).float().mean() < 0.02  # codes of slightly different y: rare boundary flips
    torch.testing.assert_close(out[3], ref_out[3], rtol=3e-2, atol=3e-2)


def test_fake_implementations_give_the_real_shapes_and_dtypes(tensors):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with kernel_backend("reference"):
        (codes, scales, down), out = _run(tensors)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = {k: (mode.from_tensor(v) if isinstance(v, torch.Tensor) else v) for k, v in tensors.items()}
        (f_codes, f_scales, f_down), f_out = _run(fake)
    for real, fk in zip((codes, scales, down, *out), (f_codes, f_scales, f_down, *f_out)):
        assert real.shape == fk.shape and real.dtype == fk.dtype


def test_opcheck_on_the_reference_backend(tensors):
    w = tensors["weight"]
    with kernel_backend("reference"):
        torch.library.opcheck(ops.fused_quantize_lora_down.default,
                              (tensors["x"], tensors["smooth"], tensors["lora_down"], None, QUANTIZE.to_string()))
        codes, scales, down = ops.fused_quantize_lora_down(tensors["x"], tensors["smooth"], tensors["lora_down"],
                                                           None, QUANTIZE.to_string())
        torch.library.opcheck(ops.fused_gemm.default, (
            codes, scales, w.qweight, w.wscales, w.wtscale, down, tensors["lora_up"], tensors["bias"],
            [tensors["residual"]], tensors["next_smooth"], tensors["next_lora_down"], None, None, GEMM.to_string()))


class _Fused(torch.nn.Module):
    def __init__(self, t):
        super().__init__()
        self.t = t

    def forward(self, x, residual):
        return _run({**self.t, "residual": residual}, x)[1][0]


def test_export_with_a_dynamic_token_count_saves_and_reloads(tensors, tmp_path):
    module = _Fused(tensors)
    tokens = torch.export.Dim("tokens", min=2, max=64)
    with kernel_backend("reference"):
        program = torch.export.export(module, (tensors["x"], tensors["residual"]),
                                      dynamic_shapes=({1: tokens}, {1: tokens}), strict=False)
        path = tmp_path / "fused.pt2"
        torch.export.save(program, path)
        loaded = torch.export.load(path).module()
        x, residual = tensors["x"][:, :5], tensors["residual"][:, :5]
        torch.testing.assert_close(loaded(x, residual), module(x, residual))
    spec_args = [n.args[-1] for n in program.graph.nodes if n.op == "call_function" and "fused" in str(n.target)]
    assert QUANTIZE.to_string() in spec_args and GEMM.to_string() in spec_args


def test_a_malformed_spec_string_fails_clearly(tensors):
    with pytest.raises(fused_ops.SpecError, match="expected a quantize_lora_down spec, got a gemm spec"):
        ops.fused_quantize_lora_down(tensors["x"], tensors["smooth"], tensors["lora_down"], None, GEMM.to_string())
