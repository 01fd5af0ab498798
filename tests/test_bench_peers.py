"""tools/bench_peers.py runs ModelOpt's NVFP4 fake quantization on CPU through ModelOpt's own NVFP4QTensor; these
tests hold that route to our fake_quantize_act of the same format (E2M1 values in blocks of 16, E4M3 block scales
under the per-tensor scale amax/(6·448)), an independent implementation of the same definition."""

from __future__ import annotations

import pytest
import torch

from scale_fixtures import ROOT, tool
from svdq_compiler.quant import fake_quantize_act, nvfp4_act_scale

pytest.importorskip("modelopt.torch.quantization")

from modelopt.torch.quantization import tensor_quant  # noqa: E402
from modelopt.torch.quantization.config import QuantizerAttributeConfig  # noqa: E402
from modelopt.torch.quantization.nn import TensorQuantizer  # noqa: E402

NVFP4 = dict(num_bits=(2, 1), block_sizes={-1: 16, "type": "dynamic", "scale_bits": (4, 3)})


@pytest.fixture
def routed(monkeypatch):
    """The route installed for one test; monkeypatch puts ModelOpt's op back afterwards."""
    monkeypatch.syspath_prepend(str(ROOT / "tools"))  # bench_peers imports its shared bench_common
    monkeypatch.setattr(tensor_quant, "dynamic_block_quantize_op", tensor_quant.dynamic_block_quantize_op)
    tool("bench_peers").route_modelopt_nvfp4_fake_quant_to_qtensor()


def activations(width: int) -> torch.Tensor:
    """Rows of varied magnitude with one channel 50× the others, as the outlier models of the benchmark have."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(8, 32, width, generator=generator) * torch.rand(8, 32, 1, generator=generator) * 3
    x[..., 7] *= 50
    return x


@pytest.mark.parametrize("width", [256, 40])  # 40: a partial last block
def test_the_quantizer_on_cpu_matches_our_nvfp4(routed, width):
    x = activations(width)
    quantized = TensorQuantizer(QuantizerAttributeConfig(**NVFP4))(x)  # uncalibrated: amax is x's absmax
    assert torch.equal(quantized, fake_quantize_act(x, "nvfp4", 16, tensor_scale=nvfp4_act_scale(x.abs().amax())))


@pytest.mark.parametrize("amax_factor", [2.0, 0.25])  # a calibrated amax above the tensor's, and one it saturates
def test_a_calibrated_amax_sets_the_tensor_scale(routed, amax_factor):
    x = activations(256)
    amax = x.abs().amax() * amax_factor
    quantized = tensor_quant.dynamic_block_quant(x, 16, amax, None, (2, 1), (4, 3))
    tensor_scale = nvfp4_act_scale(amax)
    ours = fake_quantize_act(x, "nvfp4", 16, tensor_scale=tensor_scale)
    # The one place the two definitions part: a block whose E4M3 scale underflows (up to half the smallest
    # subnormal, 2^-10, which rounds to 0). NVFP4QTensor clamps that scale to 2^-9, ours flushes the block to zero.
    block_scale = x.unflatten(-1, (-1, 16)).abs().amax(-1) / (6 * tensor_scale)
    underflow = (block_scale <= 2 ** -10).repeat_interleave(16, -1)
    assert torch.equal(quantized[~underflow], ours[~underflow])
    assert ours[underflow].eq(0).all()
    assert quantized[underflow].abs().le(6 * 2 ** -9 * tensor_scale).all()


def test_other_formats_still_reach_modelopts_op(routed):
    x = activations(256)
    with pytest.raises(AssertionError, match="CUDA"):  # FP8 values in E4M3-scaled blocks: not NVFP4
        tensor_quant.dynamic_block_quant(x, 16, x.abs().amax(), None, (4, 3), (4, 3))
