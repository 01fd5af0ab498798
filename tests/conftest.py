"""Session-wide test settings."""

import os

import pytest
import torch

# `make test` runs two pytest workers on a 2-core machine: one intra-op thread each avoids oversubscription,
# which makes small LAPACK calls (QR, SVD) up to 100× slower.
torch.set_num_threads(1)

# Without a GPU the generated Triton kernels run under the interpreter, which Triton only honours when the
# variable is set before it is imported (`make test` sets it too).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` skip, saying why, where no CUDA device is lent (`make test` deselects them; a run that
    selects them with `-m gpu` on such a machine reports skips, not failures)."""
    if torch.cuda.is_available():
        return
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))


@pytest.fixture(scope="session", autouse=True)
def capture_cache():
    """svdq_compiler.compile captures each model once per session (tests/capture_cache.py);
    SVDQ_TEST_CAPTURE_CACHE=0 turns the cache off (tools/bench_suite_time.py measures the suite both ways)."""
    if os.environ.get("SVDQ_TEST_CAPTURE_CACHE", "1") == "0":
        yield
        return
    from capture_cache import install

    undo = install()
    yield
    undo()
