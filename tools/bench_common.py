"""What every benchmark under tools/ records with its numbers, and how it writes them."""

from __future__ import annotations

import json
import os
import platform
import tempfile
from pathlib import Path

import torch

import svdq_compiler


def machine(device: str = "cpu") -> dict:
    info = {"platform": platform.platform(), "processor": platform.processor(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "svdq_compiler": svdq_compiler.__version__,
            "load_average": os.getloadavg()}  # other work on a shared machine skews the timings
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def write_result(report: dict, target: Path) -> None:
    """Write `report` as JSON to a temporary file beside `target`, then rename it into place."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=target.parent, suffix=".tmp", delete=False) as handle:
        json.dump(report, handle, indent=2)
        handle.write("\n")
    Path(handle.name).replace(target)
    print(f"wrote {target}")
