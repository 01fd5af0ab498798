"""The graph file itself: every entry has a digest checked at load (a flipped byte is one clear error), two
identical compiles write identical bytes, the file holds the bytes of each view and little else, it follows the
umask, it is mapped (not read) when loaded, and a CUDA load never builds a CPU copy first."""

import hashlib
import json
import os
import zipfile

import pytest
import torch

import svdq_compiler
from svdq_compiler import serialize
from svdq_compiler.archive import DIGESTS_ENTRY, GraphArchive
from svdq_compiler.cli import inspect_main
from svdq_compiler.errors import CheckpointError, InputError
from svdq_compiler.ir import REPORT_META
from svdq_compiler.models import DynDim
from graph_files import rewrite_archive
from scale_fixtures import tool


class Stacked(torch.nn.Module):
    """Weights that are views of larger storages (a slice of a stacked matrix, a row of a table), as q/k/v
    splits and smoothing vectors are in compiled graphs."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        stacked = torch.randn(96, 32)
        self.q = torch.nn.Parameter(stacked[:32])
        self.k = torch.nn.Parameter(stacked[32:64])
        self.register_buffer("scale", torch.rand(64, 32)[3])
        self.tied = self.q  # the same tensor under a second name: one record

    def forward(self, x):
        return (x @ self.q.t()) * self.scale + x @ self.k.t() - x @ self.tied.t()


def inputs():
    return {"x": torch.randn(2, 8, 32)}


def dynamic():
    return {"x": {1: DynDim("tokens", 2, 64, label="tokens")}}


@pytest.fixture(scope="module")
def graph(tmp_path_factory):
    gm = svdq_compiler.capture(Stacked(), inputs(), dynamic_shapes=dynamic())
    return gm, svdq_compiler.save(gm, tmp_path_factory.mktemp("graph") / "graph.pt")


def record_entries(path):
    with zipfile.ZipFile(path) as archive:
        return {info.filename.split("/", 1)[1]: info for info in archive.infolist()
                if "/weights/weight_" in info.filename or "/constants/tensor_" in info.filename}


def flip_byte(source, target, offset):
    data = bytearray(source.read_bytes())
    data[offset] ^= 0x01
    target.write_bytes(bytes(data))
    return target


def test_views_are_stored_as_their_own_bytes_and_tied_weights_once(graph):
    _, path = graph
    records = record_entries(path)
    # q, k (32×32 fp32 each) and scale (32 fp32): not the 96×32 and 64×32 storages they are cut from
    assert sorted(info.file_size for info in records.values()) == [128, 4096, 4096]
    loaded = svdq_compiler.load(path)
    x = torch.randn(2, 20, 32)
    torch.testing.assert_close(loaded(x=x), Stacked()(x), rtol=0, atol=0)


def test_graph_file_is_close_to_the_tensor_bytes(graph):
    _, path = graph
    tensor_bytes = sum(info.file_size for info in record_entries(path).values())
    assert path.stat().st_size <= 1.05 * tensor_bytes + 64 * 1024


def test_the_same_graph_saved_twice_is_byte_identical(graph, tmp_path):
    gm, path = graph
    again = svdq_compiler.save(gm, tmp_path / "again.pt")
    recaptured = svdq_compiler.save(svdq_compiler.capture(Stacked(), inputs(), dynamic_shapes=dynamic()),
                                    tmp_path / "recaptured.pt")
    digests = {hashlib.sha256(p.read_bytes()).hexdigest() for p in (path, again, recaptured)}
    assert len(digests) == 1
    with zipfile.ZipFile(path) as archive:
        assert {name.split("/", 1)[0] for name in archive.namelist()} == {"archive"}  # no temporary name inside
        program = archive.read("archive/models/model.json").decode()
        report = json.loads(archive.read("archive/extra/svdq_capture.json"))
    assert "graph_id" not in program and "stack_trace" not in program and "wall_s" not in report


@pytest.mark.parametrize("entry", ["record", "models/model.json", "extra/svdq_report.json"])
def test_a_flipped_byte_anywhere_is_refused_with_one_clear_line(graph, tmp_path, capsys, entry):
    _, path = graph
    with zipfile.ZipFile(path) as archive:
        name = next(n for n in archive.namelist() if ("/weights/weight_" in n if entry == "record" else
                                                       n.endswith(entry)))
        info = archive.getinfo(name)
    with GraphArchive(path) as opened:
        offset = opened.span(name.split("/", 1)[1])[0] if info.compress_type == zipfile.ZIP_STORED else None
    if offset is None:  # a deflated entry: flip a byte of its content and store it back (the CRC matches)
        damaged = rewrite_archive(path, tmp_path / "damaged.pt", lambda n, data: (
            data.replace(b"{", b"[", 1) if n == name.split("/", 1)[1] else data), redigest=False)
        match = f"{name.split('/', 1)[1]} does not match its SHA-256 digest"
    else:
        damaged = flip_byte(path, tmp_path / "damaged.pt", offset + info.file_size // 2)
        match = f"{name.split('/', 1)[1]} does not match its SHA-256 digest"
    with pytest.raises(CheckpointError, match=match):
        svdq_compiler.load(damaged)
    assert inspect_main([str(damaged)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("svdq-inspect: error: the graph file is corrupt") and err.count("\n") == 1


def test_entries_without_a_digest_and_older_files_are_refused(graph, tmp_path):
    _, path = graph
    added = rewrite_archive(path, tmp_path / "added.pt", lambda name, data: data,
                            add={"extra/notes.txt": b"hello"}, redigest=False)
    with pytest.raises(CheckpointError, match="extra/notes.txt has no digest"):
        svdq_compiler.load(added)
    no_digests = rewrite_archive(path, tmp_path / "nodigests.pt",
                                 lambda name, data: None if name == DIGESTS_ENTRY else data)
    with pytest.raises(CheckpointError, match="corrupt"):
        svdq_compiler.load(no_digests)
    older = rewrite_archive(path, tmp_path / "older.pt", lambda name, data: json.dumps(
        {**json.loads(data), "format_version": 1}).encode() if name.endswith(serialize.MANIFEST_FILE) else data)
    with pytest.raises(CheckpointError, match="written by an older svdq-compiler .*compile the model again"):
        svdq_compiler.load(older)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_outputs_follow_the_umask(graph, tmp_path, umask):
    gm, _ = graph
    previous = os.umask(umask)
    try:
        path = svdq_compiler.save(gm, tmp_path / "graph.pt")
        report = svdq_compiler.files.write_json(tmp_path / "report.json", {"a": 1})
    finally:
        os.umask(previous)
    for written in (path, report):
        assert written.stat().st_mode & 0o777 == 0o666 & ~umask


def test_loaded_weights_are_windows_on_the_mapped_file(graph):
    _, path = graph
    loaded = svdq_compiler.load(path)
    storages = {p.untyped_storage().data_ptr() for p in loaded.parameters()}
    assert len(storages) == 2  # q and k each have their own storage (no aliasing torch would see)
    # A window on a file mapping does not own its memory: it cannot be resized.
    with pytest.raises(RuntimeError):
        next(loaded.parameters()).untyped_storage().resize_(1 << 20)


class Wide(torch.nn.Module):
    def __init__(self, width=2048, layers=4):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in range(layers))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


@pytest.fixture(scope="module")
def wide_graph(tmp_path_factory):
    gm = svdq_compiler.capture(Wide(), {"x": torch.randn(2, 4, 2048)})
    return svdq_compiler.save(gm, tmp_path_factory.mktemp("wide") / "wide.pt")  # 64 MiB of fp32 weights


def peak_rss(path, device=None):
    return tool("bench_load_memory").measure_load(path, "svdq", device)


def test_load_maps_the_file_instead_of_copying_it(wide_graph):
    measured = peak_rss(wide_graph)
    assert measured["peak_rss_above_import"] <= 1.2 * wide_graph.stat().st_size, measured


@pytest.mark.gpu
def test_cuda_load_copies_one_tensor_at_a_time(wide_graph):
    measured = peak_rss(wide_graph, device="cuda")
    assert measured["devices"] == ["cuda"]
    # The weights go to the GPU one by one: the process never holds them all on the CPU.
    assert measured["peak_rss_above_import"] <= 0.5 * wide_graph.stat().st_size, measured


def test_load_refuses_an_unknown_device(graph):
    _, path = graph
    with pytest.raises(InputError, match="unknown device 'nonsense'"):
        svdq_compiler.load(path, device="nonsense")


def test_load_refuses_a_device_this_machine_lacks(graph):
    _, path = graph
    with pytest.raises(InputError, match="device 'cuda:99' is not available here"):
        svdq_compiler.load(path, device="cuda:99")


def test_compression_is_reported_against_the_checkpoint_dtype_and_against_fp32():
    from svdq_compiler.cli import compression
    from svdq_compiler.models import load_model

    model = load_model("tiny-flux")  # float32 in memory, from a float16 checkpoint
    sizes = compression("tiny-flux", model, graph_bytes=1_000_000)
    fp32 = sum(p.numel() * 4 for p in model.parameters())
    assert sizes["fp32"] == {"bytes": fp32, "ratio": round(fp32 / 1e6, 3)}
    assert sizes["checkpoint"]["dtype"] == "float16" and sizes["checkpoint"]["bytes"] == fp32 // 2
    assert "checkpoint" not in compression("random:flux", load_model("random:flux"), 1_000_000)  # no file


class Block(torch.nn.Module):
    """Enough for every pass of a compile: two linears with an activation between them."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.up, self.down = torch.nn.Linear(128, 256), torch.nn.Linear(256, 128)

    def forward(self, x):
        return self.down(torch.nn.functional.gelu(self.up(x)))


def test_two_identical_compiles_write_identical_compact_files(tmp_path):
    """Compiles run the passes (calibration, SVD, quantization, fusion) with their timings and object ids: the
    same model, inputs, preset and seed still write the same bytes, at most 5% + 64 KiB over the tensor bytes
    the report counts."""
    paths = []
    for run in range(2):
        torch.manual_seed(0)
        example = {"x": torch.randn(2, 16, 128)}
        gm = svdq_compiler.compile(Block(), example, "int4", dynamic_shapes=None)
        paths.append(svdq_compiler.save(gm, tmp_path / f"graph{run}.pt"))
    assert hashlib.sha256(paths[0].read_bytes()).digest() == hashlib.sha256(paths[1].read_bytes()).digest()
    counted = gm.meta[REPORT_META]["totals"]["parameter_bytes"]
    assert paths[0].stat().st_size <= 1.05 * counted + 64 * 1024, (paths[0].stat().st_size, counted)
