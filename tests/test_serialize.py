"""Saving and loading graph files: round trip with dynamic dimensions and reports, and clear errors for missing,
corrupt, foreign and newer files; a failed save leaves nothing behind."""

import json
import zlib

import pytest
import torch

import svdq_compiler
from svdq_compiler import serialize
from svdq_compiler.capture import CAPTURE_META
from svdq_compiler.errors import CheckpointError, InputError, ShapeError
from svdq_compiler.files import atomic_path
from svdq_compiler.models import DynDim
from graph_files import rewrite_archive


class TokenMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.up, self.down = torch.nn.Linear(16, 32), torch.nn.Linear(32, 16)

    def forward(self, x, scale):
        return self.down(torch.nn.functional.gelu(self.up(x))) * scale


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = TokenMLP()
    inputs = {"x": torch.randn(2, 8, 16), "scale": torch.tensor(2.0)}
    gm = svdq_compiler.compile(model, inputs, dynamic_shapes={"x": {1: DynDim("tokens", 2, 64, label="tokens")}})
    path = tmp_path_factory.mktemp("graph") / "graph.pt"
    svdq_compiler.save(gm, path)
    return model, gm, path


def test_round_trip_keeps_dynamic_dims_reports_and_shape_check(saved):
    model, gm, path = saved
    loaded = svdq_compiler.load(path)
    x = torch.randn(2, 40, 16)
    torch.testing.assert_close(loaded(x=x, scale=torch.tensor(2.0)), model(x, torch.tensor(2.0)), rtol=0, atol=0)
    assert loaded.meta[CAPTURE_META] == json.loads(json.dumps(serialize.without_run_measurements(gm.meta[CAPTURE_META])))
    assert loaded.meta[serialize.REPORT_META]["config"]["preset_name"] == "int4"
    assert "def forward" in zlib.decompress(loaded.meta[serialize.IR_META]).decode()
    assert loaded.meta["svdq_manifest"]["torch"] == torch.__version__
    with pytest.raises(ShapeError, match=r"x dim 2 is 15, but the graph was captured with a static 16"):
        loaded(x=torch.randn(2, 40, 15), scale=torch.tensor(2.0))


def test_a_loaded_graph_saves_again(saved, tmp_path):
    model, _, path = saved
    again = tmp_path / "again.pt"
    svdq_compiler.save(svdq_compiler.load(path), again)
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(svdq_compiler.load(again)(x=x, scale=torch.tensor(2.0)), model(x, torch.tensor(2.0)))


def test_extra_files_are_readable_without_loading_the_program(saved):
    _, _, path = saved
    extra = serialize.read_extra(path)
    assert set(extra) == set(serialize.EXTRA_FILES)
    manifest = json.loads(extra[serialize.MANIFEST_FILE])
    assert (manifest["format"], manifest["format_version"]) == (serialize.FORMAT, serialize.FORMAT_VERSION)
    assert (manifest["svdq_compiler"], manifest["torch"]) == (svdq_compiler.__version__, torch.__version__)
    assert "triton" in manifest and "python" in manifest
    assert json.loads(extra[serialize.CONFIG_FILE])["rank"] == 32


def rewrite_manifest(source, target, **changes):
    def edit(name, data):
        return json.dumps({**json.loads(data), **changes}).encode() if name.endswith(serialize.MANIFEST_FILE) \
            else data

    rewrite_archive(source, target, edit)


def test_bad_files_are_clear_errors(saved, tmp_path):
    _, _, path = saved
    with pytest.raises(CheckpointError, match="no such graph file"):
        svdq_compiler.load(tmp_path / "missing.pt")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        svdq_compiler.load(truncated)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a graph at all")
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        svdq_compiler.load(garbage)
    foreign = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(2)}, foreign)
    with pytest.raises(CheckpointError, match="another tool"):
        svdq_compiler.load(foreign)
    newer = tmp_path / "newer.pt"
    rewrite_manifest(path, newer, format_version=serialize.FORMAT_VERSION + 1, svdq_compiler="9.0")
    version = serialize.FORMAT_VERSION
    with pytest.raises(CheckpointError, match=rf"svdq-compiler 9.0 in format version {version + 1}; this version "
                                              rf"reads up to {version}"):
        svdq_compiler.load(newer)
    other = tmp_path / "other.pt"
    rewrite_manifest(path, other, format="something-else")
    with pytest.raises(CheckpointError, match="unknown format marker"):
        svdq_compiler.load(other)


def test_failed_save_leaves_nothing(saved, tmp_path, monkeypatch):
    _, gm, _ = saved

    def broken_write(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(svdq_compiler.archive.zipfile.ZipFile, "writestr", broken_write)
    with pytest.raises(RuntimeError, match="disk full"):
        svdq_compiler.save(gm, tmp_path / "graph.pt")
    assert list(tmp_path.iterdir()) == []


def test_unwritable_destination_and_uncaptured_graph(saved, tmp_path):
    _, gm, _ = saved
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(InputError, match="cannot create the folder of the graph file"):
        svdq_compiler.save(gm, blocker / "graph.pt")
    with pytest.raises(InputError, match="not made by svdq_compiler.capture"):
        svdq_compiler.save(torch.fx.symbolic_trace(TokenMLP()), tmp_path / "graph.pt")


def test_atomic_path_replaces_only_on_success(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(ValueError):
        with atomic_path(target) as temporary:
            temporary.write_text("half")
            raise ValueError
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]
    with atomic_path(target) as temporary:
        temporary.write_text("new")
    assert target.read_text() == "new"
