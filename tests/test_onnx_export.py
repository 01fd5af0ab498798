"""ONNX export: the portable form runs in onnxruntime and matches our reference ops at another token count, with
4-bit weights as INT4 DequantizeLinear that ONNX Runtime fuses into MatMulNBits; the custom form holds svdq-domain
nodes that onnx.checker accepts; bad requests are clear errors and leave no file."""

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import svdq_compiler
from svdq_compiler.codegen.fused_ops import kernel_backend
from svdq_compiler.errors import InputError
from svdq_blocks import Block, compile_block

# ONNX Runtime's MatMulNBits quantizes activations to int8 by default (accuracy level 4); level 1 keeps float32,
# so the only differences left to our reference are float32 summation orders.
FLOAT32_MATMULNBITS = {"session.qdq_matmulnbits_accuracy_level": "1"}
TOLERANCE = 1e-5  # of the output's largest magnitude


@pytest.fixture(scope="module")
def int4_graph():
    return compile_block("int4")


@pytest.fixture(scope="module")
def int4_onnx(int4_graph, tmp_path_factory):
    return svdq_compiler.export_onnx(int4_graph, tmp_path_factory.mktemp("onnx") / "model.onnx")


def run_onnxruntime(path, x, config=FLOAT32_MATMULNBITS, optimized_path=None):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    for key, value in config.items():
        options.add_session_config_entry(key, value)
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def reference_output(gm, x):
    with kernel_backend("reference"), torch.no_grad():
        out = gm(x=x)
    return (out[0] if isinstance(out, (tuple, list)) else out).numpy()


def assert_matches_reference(gm, path, tokens=13):
    x = torch.randn(2, tokens, 64, generator=torch.Generator().manual_seed(5))
    expected, got = reference_output(gm, x), run_onnxruntime(path, x)
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= TOLERANCE * np.abs(expected).max()


def test_portable_int4_runs_in_onnxruntime_like_the_reference_ops(int4_graph, int4_onnx):
    path = int4_onnx
    model = onnx.load(str(path))
    ops = [node.op_type for node in model.graph.node]
    assert all(node.domain in ("", "ai.onnx") for node in model.graph.node)
    # every quantized linear is a blocked INT4 DequantizeLinear feeding a MatMul; activations are rounded and
    # clipped in standard ops (one quantization per smoothing group: a+b share one)
    int4 = [init for init in model.graph.initializer if init.data_type == onnx.TensorProto.INT4]
    assert len(int4) == ops.count("DequantizeLinear") == 4
    assert all(list(init.dims)[0] == 128 for init in int4)  # [K, N]
    assert ops.count("Round") == 3
    dequantize = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert {a.name: a.i for a in dequantize[0].attribute} == {"axis": 0, "block_size": 64}
    token_axis = model.graph.input[0].type.tensor_type.shape.dim[1]
    assert token_axis.dim_param and not token_axis.HasField("dim_value")
    assert_matches_reference(int4_graph, path, tokens=13)
    assert_matches_reference(int4_graph, path, tokens=40)


def test_onnxruntime_fuses_the_int4_weights_into_matmulnbits(int4_graph, int4_onnx, tmp_path):
    path = int4_onnx
    optimized = tmp_path / "optimized.onnx"
    x = torch.randn(2, 9, 64)
    got = run_onnxruntime(path, x, config={}, optimized_path=optimized)  # ORT's defaults: int8 activations
    fused = [n.op_type for n in onnx.load(str(optimized)).graph.node]
    assert fused.count("MatMulNBits") == 4 and "DequantizeLinear" not in fused
    expected = reference_output(int4_graph, x)
    assert np.abs(got - expected).max() <= 0.05 * np.abs(expected).max()


def test_custom_form_has_the_fused_svdq_nodes_with_their_specs(int4_graph, tmp_path):
    path = svdq_compiler.export_onnx(int4_graph, tmp_path / "custom.onnx", form="custom")
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    svdq_nodes = [n for n in model.graph.node if n.domain == "svdq"]
    fused = [n for n in int4_graph.graph.nodes if getattr(n.target, "namespace", None) == "svdq"]
    assert sorted(n.op_type for n in svdq_nodes) == sorted(
        "".join(p.capitalize() for p in n.target._opname.split("_")) for n in fused)
    specs = sorted(next(a.s.decode() for a in n.attribute if a.name == "spec") for n in svdq_nodes)
    assert specs == sorted(n.args[-1] for n in fused)
    assert any(opset.domain == "svdq" and opset.version == 1 for opset in model.opset_import)
    # the packed weights stay in our layout: uint8 [N, K/2]
    packed = [init for init in model.graph.initializer if init.data_type == onnx.TensorProto.UINT8]
    assert packed and all(list(init.dims) == [128, 64] for init in packed)
    gemm = next(n for n in svdq_nodes if n.op_type == "FusedGemm")
    assert len(gemm.input) >= 8 and gemm.input[4] == ""  # absent w_tscale is an empty name


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["w8a8", "w4a16-nf4"])
def test_portable_w8a8_and_weight_only_nf4_match_the_reference(preset, tmp_path):
    gm = compile_block(preset)
    path = svdq_compiler.export_onnx(gm, tmp_path / "model.onnx")
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    gathers = bool(ops & {"Gather", "GatherND"})  # the codebook lookup; torch ≥ 2.13 writes GatherND
    assert ("DequantizeLinear" in ops) == (preset == "w8a8") and gathers == (preset == "w4a16-nf4")
    assert_matches_reference(gm, path)


def test_bad_requests_are_clear_errors_and_leave_nothing(int4_graph, tmp_path, monkeypatch):
    with pytest.raises(InputError, match="unknown ONNX form 'fancy'"):
        svdq_compiler.export_onnx(int4_graph, tmp_path / "m.onnx", form="fancy")
    with pytest.raises(InputError, match="is a folder"):
        svdq_compiler.export_onnx(int4_graph, tmp_path)
    with pytest.raises(InputError, match="no capture report"):
        svdq_compiler.export_onnx(torch.fx.symbolic_trace(Block()), tmp_path / "m.onnx")

    from svdq_compiler import onnx_export

    def failing_save(model, path, **kwargs):
        Path(path).write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(onnx, "save_model", failing_save)
    with pytest.raises(OSError, match="disk full"):
        onnx_export._write(onnx.ModelProto(), tmp_path / "m.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_nvfp4_has_no_portable_form_and_its_custom_form_carries_the_activation_scales(tmp_path):
    gm = compile_block("nvfp4")
    with pytest.raises(InputError, match="nvfp4 .* no portable ONNX form.*form='custom'"):
        svdq_compiler.export_onnx(gm, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()
    model = onnx.load(str(svdq_compiler.export_onnx(gm, tmp_path / "custom.onnx", form="custom")))
    initializers = {init.name: init for init in model.graph.initializer}
    # the per-tensor fp32 activation scale: FusedQuantizeLoraDown's act_scale, FusedGemm's a_tscale
    position = {"FusedQuantizeLoraDown": 3, "FusedGemm": 10}
    scales = [initializers[n.input[position[n.op_type]]] for n in model.graph.node if n.op_type in position]
    assert len(scales) == sum(1 for n in gm.graph.nodes if getattr(n.target, "namespace", None) == "svdq"
                              and n.target._opname in ("fused_quantize_lora_down", "fused_gemm"))
    assert all(s.data_type == onnx.TensorProto.FLOAT and np.prod(s.dims) == 1 for s in scales)
