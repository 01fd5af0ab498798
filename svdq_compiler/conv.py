"""A k×k convolution seen as a matrix product, the way W4A4 quantizes it (`QuantConfig.conv_kxk`).

The reference quantizes a conv weight [O, C, kh, kw] with group shape (1, G, 1, 1): per output channel, G input
channels, one kernel tap. Its activations are quantized per pixel and group of G channels, as a linear's are
per token. So the conv is a product of the im2col patches with a weight matrix laid out **tap-major**:
column (i·kw + j)·C_pad + c holds W[o, c, i, j], and C is zero-padded to C_pad (a multiple of G) at every tap,
so no group straddles two taps. Each patch row is then kh·kw pixels of C_pad channels, and a per-row, per-group
quantization of a patch quantizes each pixel exactly as the runtime op does. Group size 0 (int8) is one group
per row: per output channel over all taps for weights, per pixel for activations.

Which convs: under `conv_kxk="w4a4"` the U-Net resnet convs (SiLU input, output reaching no graph output), as
the reference quantizes resnet conv1/conv2 and keeps conv_in/conv_out, samplers and shortcuts 16-bit;
"w4a4-all" every 2-D conv with groups=1. Grouped, depthwise and transposed convs stay 16-bit. A quantized conv
has no smoothing and no branch; a SiLU input gets the `silu_shift` and uint4 activations under int4.
Calibration keeps its im2col patch rows (site "<tensor>><conv>"), so quantize_weights measures it like a
linear; the fallback goes straight to 16-bit; `lower` emits `svdq.conv2d`, which fuse leaves alone.
Departure: the reference splits an up-block's first resnet conv by source (ConcatConv2d); we quantize it as one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx
import torch.nn.functional as F

from svdq_compiler.codegen.layout import effective_group, round_up
from svdq_compiler.fx_utils import aten, packet


def conv_args(node: torch.fx.Node) -> dict:
    """input, weight, bias, stride, padding, dilation, transposed, groups of an aten conv node (either form)."""
    names = ("input", "weight", "bias", "stride", "padding", "dilation")
    values = dict(zip(names, node.args))
    values.update({k: v for k, v in node.kwargs.items() if k in names or k in ("groups", "transposed")})
    if packet(node) is aten.convolution:
        values["transposed"] = node.args[6] if len(node.args) > 6 else False
        values["groups"] = node.args[8] if len(node.args) > 8 else 1
    else:
        values.setdefault("groups", node.args[6] if len(node.args) > 6 else 1)
    return values


def _pair(value, default: int) -> tuple[int, int]:
    if value is None:
        return (default, default)
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    return (values[0], values[0]) if len(values) == 1 else (values[0], values[1])


def padded_channels(channels: int, group_size: int) -> int:
    """C_pad: the input channels rounded up to the group size (C for group size 0)."""
    return round_up(channels, effective_group(group_size, channels))


@dataclass(frozen=True)
class ConvGeometry:
    """The shape facts that turn one 2-D convolution into a matrix problem."""

    channels: int  # C, input channels
    padded_channels: int  # C_pad: C rounded up to the group size (C for group size 0)
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]

    @classmethod
    def of(cls, node: torch.fx.Node, weight_shape, group_size: int) -> "ConvGeometry":
        args = conv_args(node)
        channels = weight_shape[1]
        return cls(channels, padded_channels(channels, group_size), tuple(weight_shape[2:]),
                   _pair(args.get("stride"), 1), _pair(args.get("padding"), 0), _pair(args.get("dilation"), 1))

    @property
    def taps(self) -> int:
        return self.kernel[0] * self.kernel[1]

    @property
    def columns(self) -> int:
        return self.taps * self.padded_channels

    @property
    def pad_columns(self) -> int:
        return self.taps * (self.padded_channels - self.channels)

    def matrix(self, weight: torch.Tensor) -> torch.Tensor:
        """[O, C, kh, kw] → the tap-major [O, kh·kw·C_pad] matrix (zero padding columns)."""
        taps_last = weight.permute(0, 2, 3, 1)
        return F.pad(taps_last, (0, self.padded_channels - self.channels)).reshape(weight.shape[0], -1)

    def weight(self, matrix: torch.Tensor) -> torch.Tensor:
        """The inverse of `matrix`: [O, kh·kw·C_pad] → [O, C, kh, kw]."""
        taps = matrix.reshape(matrix.shape[0], *self.kernel, self.padded_channels)[..., :self.channels]
        return taps.permute(0, 3, 1, 2).contiguous()

    def patches(self, x: torch.Tensor, pad_value: float = 0.0) -> torch.Tensor:
        """The im2col rows of x [B, C, H, W]: [B·L, kh·kw·C_pad] in x's dtype, one per output pixel. Pixels
        outside the image are 0 (the conv's zero padding); the C_pad − C padding channels hold `pad_value`
        (the searches pass −shift, so a shifted padding channel is 0 and cannot enlarge its group's range)."""
        columns = F.unfold(x, self.kernel, dilation=self.dilation, padding=self.padding, stride=self.stride)
        batch, _, positions = columns.shape
        by_tap = columns.reshape(batch, self.channels, self.taps, positions).permute(0, 3, 2, 1)
        padded = F.pad(by_tap, (0, self.padded_channels - self.channels), value=pad_value)
        return padded.reshape(batch * positions, self.columns)
