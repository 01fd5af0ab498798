"""Calibration statistics: what the calibrate pass records per tensor read by quantized linears, and their file
form (`svdq-compile --save-calib`). Library types the passes import (smooth, lowrank, quantize_weights read a
Calibration from `PassContext.calibration`), and the data-free calibration both the calibrate pass
(`calib_source="weights"`) and the streaming compile use."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx
import torch.nn.functional as F

from svdq_compiler.errors import CheckpointError
from svdq_compiler.fx_utils import aten, packet, tensor_val, through_views
from svdq_compiler.ir import annotated_linears
from svdq_compiler.svdquant import conv_geometry, raw_input, site_name


@dataclass
class SiteStats:
    """What calibration saw of one tensor read by quantized linears (channels last)."""

    node: str
    readers: list[str]  # qualified names of the linears reading it
    minimum: torch.Tensor  # fp32 [K]
    maximum: torch.Tensor  # fp32 [K]
    rows: torch.Tensor  # [≤ calib_rows, K] in the activation dtype: a uniform sample of every row seen
    priorities: torch.Tensor  # the reservoir keys of `rows`
    rows_seen: int = 0

    def absmax(self, shift: float = 0.0) -> torch.Tensor:
        """Per-channel max |x + shift| over every row seen."""
        return torch.maximum((self.minimum + shift).abs(), (self.maximum + shift).abs())


@dataclass
class Calibration:
    sites: dict[str, SiteStats] = field(default_factory=dict)
    source: str = ""
    inputs: int = 0
    data_free: bool = False  # synthetic rows: the ranges say nothing about the real activations


def _gelu_approximation(x: torch.fx.Node) -> str:
    """How the graph computes the GELU whose output `x` is: "tanh" (FLUX, SD3, PixArt's `gelu-approximate`) or
    "none" (erf). The data-free rows must follow the graph's own GELU: the two differ most on negative inputs,
    which is exactly the range the unsigned shift and the smoothing search see after the GELU. (The streaming
    compile used to hard-code tanh and calib_source="weights" erf, each right for some models only.) A shifted
    input that is not a GELU output (none is today: only plain-GELU readers get the shift) takes the exact erf."""
    source = through_views(x)
    return source.kwargs.get("approximate", "none") if packet(source) is aten.gelu else "none"


def isotropic_calibration(gm: torch.fx.GraphModule, rows: int, seed: int) -> Calibration:
    """Data-free calibration: `rows` standard normal rows per site of every non-16-bit layer. With x ~ N(0, I),
    E‖ΔW·x‖² = ‖ΔW‖_F², so searches on these rows minimise the weight-space error. An input that the layer shifts
    (post-GELU, unsigned INT4) gets the graph's own GELU of the rows; a k×k convolution's site holds its im2col
    patch rows (svdq_compiler.conv): isotropic pixels per tap, SiLU'd where shifted, the padding channels holding
    the value its patches hold. Ranges are those of the rows in the graph's dtype, as recorded from real
    activations; the reservoir keys are uniform, as a reservoir sample of these rows would hold. Only shifted inputs
    get the activation: the unsigned shift needs x + shift ≥ 0, which plain Gaussian rows would violate, while
    every other input keeps the isotropic rows that make the search minimise the weight-space error."""
    layers = [(node, info) for node, info in annotated_linears(gm) if info.scheme is not None
              and info.scheme.kind != "fp"]
    shifted = {site_name(node, info) for node, info in layers if info.shift}
    generator = torch.Generator().manual_seed(seed)
    sites: dict[str, SiteStats] = {}
    for node, info in layers:
        name = site_name(node, info)
        if name in sites:
            sites[name].readers.append(info.name)
            continue
        x = raw_input(node)
        val = tensor_val(x)
        if info.kind == "conv":
            geometry = conv_geometry(gm, node, info)
            sample = torch.randn(rows, geometry.taps, geometry.channels, generator=generator)
            if name in shifted:
                sample = F.silu(sample)
            sample = F.pad(sample, (0, geometry.padded_channels - geometry.channels), value=-info.shift).flatten(1)
        else:
            sample = torch.randn(rows, val.shape[-1], generator=generator)
            if name in shifted:
                sample = F.gelu(sample, approximate=_gelu_approximation(x))
        sample = sample.to(val.dtype)
        # on the activations' device, as the calibrate pass records real activations
        sample = sample.to(val.device)
        sites[name] = SiteStats(node=name, readers=[info.name], minimum=sample.float().amin(0),
                                maximum=sample.float().amax(0), rows=sample,
                                priorities=torch.rand(rows, generator=generator).to(val.device), rows_seen=rows)
    return Calibration(sites=sites, source=f"{rows} isotropic Gaussian rows per site (weight-space error)",
                       inputs=0, data_free=True)


CALIBRATION_FORMAT = "svdq-calibration"


def save_calibration(calibration: Calibration, path) -> None:
    """Write calibration statistics as safetensors (tensors plus JSON metadata: nothing is pickled)."""
    import json

    from safetensors.torch import save_file

    from svdq_compiler.files import atomic_path

    tensors, sites = {}, []
    for index, stats in enumerate(calibration.sites.values()):
        for field_name in ("minimum", "maximum", "rows", "priorities"):
            tensors[f"{index}.{field_name}"] = getattr(stats, field_name).detach().cpu().contiguous()
        sites.append({"node": stats.node, "readers": stats.readers, "rows_seen": stats.rows_seen})
    metadata = {"format": CALIBRATION_FORMAT, "source": calibration.source, "inputs": str(calibration.inputs),
                "sites": json.dumps(sites)}
    with atomic_path(path, "calibration statistics file") as temporary:
        save_file(tensors, str(temporary), metadata=metadata)


def load_calibration(path) -> Calibration:
    """Statistics written by `save_calibration`; clear errors for a missing or foreign file."""
    import json
    from pathlib import Path

    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError("no such calibration statistics file", where=str(path),
                              fix="write one with svdq-compile --save-calib FILE")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != CALIBRATION_FORMAT:
                raise CheckpointError("not a calibration statistics file (no svdq-calibration marker)",
                                      where=str(path), fix="write one with svdq-compile --save-calib FILE")
            calibration = Calibration(source=metadata["source"], inputs=int(metadata["inputs"]))
            for index, site in enumerate(json.loads(metadata["sites"])):
                fields = {name: handle.get_tensor(f"{index}.{name}")
                          for name in ("minimum", "maximum", "rows", "priorities")}
                calibration.sites[site["node"]] = SiteStats(node=site["node"], readers=list(site["readers"]),
                                                            rows_seen=int(site["rows_seen"]), **fields)
    except (SafetensorError, OSError, KeyError, ValueError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"the calibration statistics file is corrupt ({exc})", where=str(path),
                              fix="write it again with svdq-compile --save-calib FILE") from exc
    return calibration
