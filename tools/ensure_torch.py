"""Make sure the running interpreter has a usable torch before the project is installed.

An existing torch >= 2.9 (for example the CUDA build on a GPU machine) is kept. Without one, the CPU wheel is
installed: a loose `torch` requirement would pull a multi-GB CUDA build onto a machine that cannot use it.
Override the choice with SVDQ_TORCH_SPEC (a pip requirement) and SVDQ_TORCH_INDEX (an extra index URL).
"""

import os
import subprocess
import sys

MIN_TORCH = (2, 9)
DEFAULT_SPEC = "torch==2.13.0"


def installed_torch_version():
    try:
        import torch
    except ImportError:
        return None
    return tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])


def main() -> int:
    version = installed_torch_version()
    if version is not None and version >= MIN_TORCH:
        print(f"ensure_torch: keeping the installed torch {'.'.join(map(str, version))}")
        return 0
    if version is not None:
        print(f"ensure_torch: torch {'.'.join(map(str, version))} is older than 2.9; installing a newer one")
    spec = os.environ.get("SVDQ_TORCH_SPEC", DEFAULT_SPEC)
    cmd = [sys.executable, "-m", "pip", "install", spec]
    if os.environ.get("SVDQ_TORCH_INDEX"):
        cmd += ["--extra-index-url", os.environ["SVDQ_TORCH_INDEX"]]
    print("ensure_torch:", " ".join(cmd))
    return subprocess.call(cmd)


if __name__ == "__main__":
    sys.exit(main())
