"""Helpers for the codegen tests: FileCheck on generated text, a private kernel cache per test session."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.fixture(autouse=True, scope="session")
def _private_kernel_cache(tmp_path_factory):
    """Generated kernels go to a fresh folder, so the tests never read a stale kernel from an older generator."""
    mp = pytest.MonkeyPatch()
    mp.setenv("SVDQ_KERNEL_CACHE", str(tmp_path_factory.mktemp("kernels")))
    yield
    mp.undo()


@pytest.fixture
def filecheck(tmp_path):
    """filecheck(text, checks): assert that `text` satisfies the FileCheck directives in `checks`."""

    def check(text: str, checks: str) -> None:
        check_file = tmp_path / "checks.txt"
        check_file.write_text(checks)
        result = subprocess.run([sys.executable, "-m", "filecheck", str(check_file)], input=text, text=True,
                                capture_output=True)
        assert result.returncode == 0, f"FileCheck failed:\n{result.stderr}\n--- input ---\n{text}"

    return check
