"""Make sure the running interpreter has a usable torch before the project is installed.

An existing torch >= 2.9 (for example the CUDA build on a GPU machine) is kept. Without one, the CPU wheel is
installed: a loose `torch` requirement would pull a multi-GB CUDA build onto a machine that cannot use it. On a
machine without an NVIDIA driver, PyTorch's CPU index is offered beside the configured ones, so pip takes
2.13.0+cpu there (a local version sorts above the registry's plain 2.13.0); an unreachable index is skipped.
Override the choice with SVDQ_TORCH_SPEC (a pip requirement) and SVDQ_TORCH_INDEX (an extra index URL).
"""

import os
import socket
import subprocess
import sys
from urllib.parse import urlparse

MIN_TORCH = (2, 9)
DEFAULT_SPEC = "torch==2.13.0"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def installed_torch_version():
    try:
        import torch
    except ImportError:
        return None
    return tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])


def has_nvidia_driver() -> bool:
    return os.path.exists("/proc/driver/nvidia/version")


def reachable(url: str) -> bool:
    """Whether the index's host answers at all: pip retries an unreachable index five times for every package it
    resolves, minutes of warnings on an offline mirror. Behind a proxy only pip can tell, so it is offered."""
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    address = urlparse(url)
    try:
        port = address.port or (80 if address.scheme == "http" else 443)
        socket.create_connection((address.hostname, port), timeout=5).close()
    except OSError:
        return False
    return True


def main() -> int:
    version = installed_torch_version()
    if version is not None and version >= MIN_TORCH:
        print(f"ensure_torch: keeping the installed torch {'.'.join(map(str, version))}")
        return 0
    if version is not None:
        print(f"ensure_torch: torch {'.'.join(map(str, version))} is older than 2.9; installing a newer one", flush=True)
    spec = os.environ.get("SVDQ_TORCH_SPEC", DEFAULT_SPEC)
    cmd = [sys.executable, "-m", "pip", "install", spec]
    index = os.environ.get("SVDQ_TORCH_INDEX") or (None if has_nvidia_driver() else CPU_INDEX)
    if index and not reachable(index):
        local = " and PIP_FIND_LINKS" if os.environ.get("PIP_FIND_LINKS") else \
            " (from PyPI that is the CUDA build, several GB: set SVDQ_TORCH_INDEX or PIP_FIND_LINKS to a CPU wheel)"
        print(f"ensure_torch: {index} cannot be reached; installing from the configured index{local}", flush=True)
        index = None
    if index:
        cmd += ["--extra-index-url", index]
    print("ensure_torch:", " ".join(cmd), flush=True)  # before pip's own output
    return subprocess.call(cmd)


if __name__ == "__main__":
    sys.exit(main())
