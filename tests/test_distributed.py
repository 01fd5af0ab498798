"""Distributed calibration: two gloo processes started by torchrun, each running its share of the inputs, end
with the statistics one process gets from all of them — channel ranges, rows seen and reservoir samples exactly,
with the calibrate pass and with the block runner."""

import os
import subprocess
import sys
from pathlib import Path

import torch

from svdq_compiler.calibration import load_calibration

sys.path.insert(0, str(Path(__file__).parent))
from distributed_calibration import INPUTS, calibrations  # noqa: E402

TORCHRUN = Path(sys.executable).with_name("torchrun")


def test_two_gloo_ranks_equal_one_process(tmp_path):
    prefix = tmp_path / "stats"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    done = subprocess.run([str(TORCHRUN), "--standalone", "--nproc-per-node", "2",
                           str(Path(__file__).with_name("distributed_calibration.py")), str(prefix)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    single = dict(zip(("calibrate", "blocks"), calibrations()))
    for name, expected in single.items():
        assert expected.inputs == INPUTS
        for rank in (0, 1):
            merged = load_calibration(f"{prefix}-{name}-rank{rank}.safetensors")
            assert merged.inputs == INPUTS
            by_readers = {tuple(stats.readers): stats for stats in merged.sites.values()}
            assert len(by_readers) == len(expected.sites)
            for stats in expected.sites.values():
                got = by_readers[tuple(stats.readers)]
                assert got.rows_seen == stats.rows_seen
                for field in ("minimum", "maximum", "rows", "priorities"):
                    assert torch.equal(getattr(got, field), getattr(stats, field)), (name, rank, field)
