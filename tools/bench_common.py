"""What every benchmark under tools/ records with its numbers, and how it writes them."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import torch

import svdq_compiler
from svdq_compiler.files import write_json


def machine(device: str = "cpu") -> dict:
    info = {"platform": platform.platform(), "processor": platform.processor(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "svdq_compiler": svdq_compiler.__version__,
            "load_average": os.getloadavg(),  # other work on a shared machine skews the timings
            "commit": STARTED_AT}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def source_commit() -> str | None:
    """The checkout's commit, with "+dirty" when tracked files differ from it (the numbers may then not be
    reproducible from the commit alone); None outside a git checkout."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


# Taken when the benchmark starts, as the code it runs is loaded (a long run's checkout may move before it writes).
STARTED_AT = source_commit()


def write_result(report: dict, target: Path) -> None:
    """Write `report` as JSON (to a temporary name beside `target`, then renamed into place) and say where."""
    write_json(target, report, "benchmark result")
    print(f"wrote {target}")
