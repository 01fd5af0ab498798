"""Distributed calibration: two gloo processes started by torchrun, each running its share of the inputs, end
with the statistics one process gets from all of them — channel ranges, rows seen and reservoir samples exactly,
with the calibrate pass and with the block runner."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import svdq_compiler
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


@pytest.mark.slow
def test_svdq_compile_under_torchrun_writes_the_single_process_graph(tmp_path):
    """Two processes calibrate half the inputs each; process 0 writes exactly the graph one process writes."""
    compile_script = str(TORCHRUN.with_name("svdq-compile"))
    common = ["random:flux", "--calib-prompts", "2", "--calib-steps", "2", "--set", "svd=randomized"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SVDQ_KERNELS": "reference"}
    env.pop("WORLD_SIZE", None)
    for command, name in (([sys.executable, compile_script], "single"),
                          ([str(TORCHRUN), "--standalone", "--nproc-per-node", "2", compile_script], "group")):
        done = subprocess.run(command + common + ["--out", str(tmp_path / f"{name}.pt"), "--report",
                                                  str(tmp_path / f"{name}.json")],
                              capture_output=True, text=True, env=env, timeout=1200)
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.count("wrote ") == 1  # process 0 only
    assert sorted(path.name for path in tmp_path.iterdir()) == ["group.json", "group.pt", "single.json", "single.pt"]
    single, group = (svdq_compiler.load(tmp_path / f"{name}.pt").state_dict() for name in ("single", "group"))
    assert single.keys() == group.keys() and all(torch.equal(single[k], group[k]) for k in single)
    calibrated = [json.loads((tmp_path / f"{name}.json").read_text())["passes"] for name in ("single", "group")]
    single_stats, group_stats = ([p["stats"] for p in passes if p["name"] == "calibrate"][0] for passes in calibrated)
    assert single_stats["inputs"] == group_stats["inputs"] == 4 and "processes" not in single_stats
    assert group_stats["processes"] == 2 and group_stats["inputs_this_process"] == 2  # process 0's share


@pytest.mark.parametrize("cuda, backend, device", [(True, "nccl", "cuda:1"), (False, "gloo", "cpu")])
def test_torchrun_joins_nccl_on_a_gpu_and_gloo_without(monkeypatch, cuda, backend, device):
    """The backend follows the machine: this CPU machine cannot start nccl, so the group's setup is recorded."""
    import torch.distributed as dist

    from svdq_compiler import distributed

    joined = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend: joined.setdefault("backend", backend))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: joined.setdefault("cuda_device", index))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: joined["cuda_device"])
    distributed.init_from_environment()
    assert joined == ({"backend": "nccl", "cuda_device": 1} if cuda else {"backend": "gloo"})
    # the merged tensors travel on the device the backend reduces on
    monkeypatch.setattr(dist, "get_backend", lambda: joined["backend"])
    assert distributed._device() == torch.device(device)
