"""Kernel cache: generated text on disk by hash, one import per process, clear errors."""

import os

import pytest

from svdq_compiler.codegen import cache
from svdq_compiler.codegen.generate import Target, generate
from svdq_compiler.codegen.spec import ActQuant, QuantizeSpec

INTERP = Target("interpreter")


@pytest.fixture
def kernel_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SVDQ_KERNEL_CACHE", str(tmp_path / "kernels"))
    cache.clear_memory_cache()
    yield tmp_path / "kernels"
    cache.clear_memory_cache()


def _spec(rank=16):
    return QuantizeSpec(ActQuant("int4", 64), rank, "bfloat16")


def test_kernel_is_written_under_its_hash_and_loaded_once(kernel_dir):
    kernel = cache.load_kernel(_spec(), INTERP)
    path = cache.kernel_path(_spec(), INTERP)
    assert path.parent == kernel_dir and _spec().hash[:10] in path.name and path.name.endswith("-interp.py")
    assert path.read_text() == generate(_spec(), INTERP)
    assert cache.load_kernel(_spec(), INTERP) is kernel
    assert cache.load_kernel(_spec(rank=32), INTERP) is not kernel
    assert not [p for p in kernel_dir.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_a_stale_file_is_replaced_and_an_identical_one_is_kept(kernel_dir):
    path = cache.kernel_path(_spec(), INTERP)
    path.parent.mkdir(parents=True)
    path.write_text("# stale text from an older generator\n")
    cache.load_kernel(_spec(), INTERP)
    assert path.read_text() == generate(_spec(), INTERP)
    cache.clear_memory_cache()
    before = path.stat().st_mtime_ns
    cache.load_kernel(_spec(), INTERP)
    assert path.stat().st_mtime_ns == before


def test_targets_get_separate_files(kernel_dir):
    assert cache.kernel_path(_spec(), INTERP) != cache.kernel_path(_spec(), Target("cuda", (9, 0)))
    assert cache.kernel_path(_spec(), Target("cuda", (9, 0))).name.endswith("-sm90.py")


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into read-only folders")
def test_unwritable_cache_folder_is_a_clear_error(tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    monkeypatch.setenv("SVDQ_KERNEL_CACHE", str(locked / "kernels"))
    cache.clear_memory_cache()
    with pytest.raises(cache.KernelCacheError, match="SVDQ_KERNEL_CACHE"):
        cache.load_kernel(_spec(), INTERP)


def test_a_cache_path_that_is_a_file_is_a_clear_error(tmp_path, monkeypatch):
    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder")
    monkeypatch.setenv("SVDQ_KERNEL_CACHE", str(blocker))
    cache.clear_memory_cache()
    with pytest.raises(cache.KernelCacheError, match="cannot write the generated kernel"):
        cache.load_kernel(_spec(), INTERP)


def test_default_folder_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv("SVDQ_KERNEL_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache.cache_dir() == tmp_path / "svdq_compiler" / "kernels"
