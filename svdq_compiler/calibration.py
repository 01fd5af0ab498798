"""Calibration statistics: what the calibrate pass records per tensor read by quantized linears, and their file
form (`svdq-compile --save-calib`). Library types the passes import (smooth, lowrank, quantize_weights read a
Calibration from `PassContext.calibration`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from svdq_compiler.errors import CheckpointError


def isotropic_rows(rows: int, channels: int, generator: torch.Generator, gelu: str | None = None) -> torch.Tensor:
    """Data-free sample rows: standard normal [rows, channels], through GELU (`gelu`: "none" for erf, "tanh")
    where the layer reads a GELU output. With x ~ N(0, I), E‖ΔW·x‖² = ‖ΔW‖_F²: searches on these rows minimise
    the weight-space error.

    The two callers still differ in the GELU, by history rather than design: calibrate's
    `calib_source="weights"` uses the erf form, the streaming compile the tanh form (FLUX's). Unifying them
    changes compiled outputs, so each keeps its own until a measured choice is made (ideally the approximation
    of the graph's own GELU node).
    """
    sample = torch.randn(rows, channels, generator=generator)
    return sample if gelu is None else torch.nn.functional.gelu(sample, approximate=gelu)


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
