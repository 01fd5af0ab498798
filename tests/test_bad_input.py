"""Bad input, as a new user gives it: each case ends in one line naming what, where and the fix (InputError or
CheckpointError; exit 2 on the command line), and leaves no output behind — SIGTERM and a second writer of the
same --out included."""

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import svdq_compiler
from svdq_compiler.cli import compile_main
from svdq_compiler.errors import CheckpointError, InputError
from svdq_compiler.files import atomic_path, exclusive_output
from svdq_compiler.lora import read_lora
from svdq_compiler.models import DynDim, load_model
from scale_fixtures import write_tiny_flux


class TokenMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.up, self.down = torch.nn.Linear(64, 64), torch.nn.Linear(64, 64)

    def forward(self, x, scale):
        return self.down(torch.nn.functional.gelu(self.up(x))) * scale


def token_inputs():
    return {"x": torch.randn(2, 8, 64), "scale": torch.tensor(2.0)}


def one_line_error(capsys, prog="svdq-compile"):
    err = capsys.readouterr().err
    assert err.startswith(f"{prog}: error: ") and err.count("\n") == 1, err
    return err


def left_behind(folder, keep=()):
    return sorted(p.name for p in Path(folder).iterdir() if p.name not in keep)


# ---- weights and inputs -----------------------------------------------------------------------------------

def test_a_nan_weight_is_blamed_by_name():
    model = TokenMLP()
    with torch.no_grad():
        model.down.weight[3, 5] = float("nan")
        model.down.weight[0, 0] = float("inf")
    with pytest.raises(InputError, match=r"weight down.weight holds non-finite values \(1 NaN, 1 Inf of 4096"):
        svdq_compiler.compile(model, token_inputs())


def test_nan_in_example_inputs_is_refused():
    inputs = token_inputs()
    inputs["x"][1, 2, 3] = float("nan")
    with pytest.raises(InputError, match=r"example input \['x'\] holds non-finite values \(1 NaN of 1024"):
        svdq_compiler.compile(TokenMLP(), inputs)


def test_a_lora_holding_nan_is_refused():
    down, up = torch.randn(4, 64), torch.randn(64, 4)
    up[0, 0] = float("nan")
    with pytest.raises(CheckpointError, match=r"LoRA factor up.lora_B.weight holds non-finite values \(1 NaN"):
        read_lora({"up.lora_A.weight": down, "up.lora_B.weight": up})
    with pytest.raises(CheckpointError, match="alpha of module 'up' is inf"):
        read_lora({"up.lora_A.weight": down, "up.lora_B.weight": up.nan_to_num(),
                   "up.alpha": torch.tensor(float("inf"))})


@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory):
    return write_tiny_flux(tmp_path_factory.mktemp("flux"))


def damaged_folder(source, target, change):
    """A copy of the diffusers folder `source` with `change(state)` applied to its weights."""
    target.mkdir()
    (target / "config.json").write_text((source / "config.json").read_text())
    for file in source.glob("*.safetensors"):
        state = load_file(str(file))
        change(state)
        save_file(state, str(target / file.name))
    return target


def test_a_folder_tensor_of_the_wrong_shape_names_the_tensor_and_both_shapes(flux_folder, tmp_path):
    def shrink(state):
        state["x_embedder.weight"] = state["x_embedder.weight"][:, :-1].contiguous()

    folder = damaged_folder(flux_folder, tmp_path / "bad", shrink)
    with pytest.raises(CheckpointError, match=r"size mismatch for x_embedder.weight: copying a param with shape "
                                              r"torch.Size\(\[\d+, \d+\]\) from checkpoint"):
        load_model(str(folder))


@pytest.mark.parametrize("stream", ["off", "on"])
def test_a_nan_weight_in_a_folder_is_blamed_by_name_on_the_command_line(flux_folder, tmp_path, capsys, stream):
    def poison(state):
        name = next(k for k in state if k.endswith("ff.net.0.proj.weight"))
        state[name][0, 0] = float("nan")

    folder = damaged_folder(flux_folder, tmp_path / "nan", poison)
    out = tmp_path / "out"
    assert compile_main([str(folder), "--out", str(out / "g.pt"), "--stream", stream, "--calib-prompts", "1",
                         "--calib-steps", "1"]) == 2
    err = one_line_error(capsys)
    assert re.search(r"weight transformer_blocks\.0\.ff\.net\.0\.proj\.weight holds non-finite values \(1 NaN",
                     err), err
    assert not out.exists() or left_behind(out) == []


def test_flags_a_streamed_compile_does_not_honour_are_refused(flux_folder, tmp_path, capsys):
    out = tmp_path / "out"
    assert compile_main([str(flux_folder), "--out", str(out / "g.pt"), "--stream", "on", "--verify", "--static",
                         "--passes", "annotate_linears"]) == 2
    err = one_line_error(capsys)
    assert "--passes, --static cannot be combined with --stream" in err, err
    assert not out.exists() or left_behind(out) == []


# ---- the command line -------------------------------------------------------------------------------------

@pytest.mark.parametrize("flags, message", [
    (["--set", "group_size=abc"], r"QuantConfig field group_size must be int, got 'abc'; e.g. --set group_size=64"),
    (["--set", "group_size=48"], r"group_size=48: int4 kernels need a power-of-two group size of at least 32, got "
                                 r"48.*allow_reference_ops=true"),
    (["--tokens", "0"], r"--tokens 0: must be at least 1"),
    (["--tokens", "0x8"], r"--tokens 0x8: must be at least 1"),
    (["--batch", "0"], r"--batch 0: must be at least 1"),
    (["--calib-steps", "0"], r"--calib-steps 0: must be at least 1"),
])
def test_bad_values_are_one_line_before_any_work(tmp_path, capsys, flags, message):
    assert compile_main(["random:flux", "--out", str(tmp_path / "g.pt"), "--report", str(tmp_path / "r.json"),
                         *flags]) == 2
    assert re.search(message, one_line_error(capsys))
    assert left_behind(tmp_path) == []


QUICK = ["random:flux", "--passes", "annotate_linears,calibrate", "--calib-prompts", "1", "--calib-steps", "1"]


def all_outputs(tmp_path):
    return ["--out", str(tmp_path / "g.pt"), "--report", str(tmp_path / "r.json"), "--dump-ir",
            str(tmp_path / "ir"), "--save-calib", str(tmp_path / "c.safetensors")]


def test_quick_compile_writes_every_output(tmp_path):
    """The control for the two tests below: the same command, undisturbed, writes all four outputs."""
    assert compile_main(QUICK + all_outputs(tmp_path)) == 0
    assert left_behind(tmp_path) == ["c.safetensors", "g.pt", "ir", "r.json"]


def test_sigterm_during_save_leaves_nothing(tmp_path, capsys, monkeypatch):
    def terminated_save(gm, path):
        Path(path).write_bytes(b"half a graph")
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises here
        raise AssertionError("SIGTERM did not interrupt the save")

    monkeypatch.setattr(svdq_compiler, "save", terminated_save)
    assert compile_main(QUICK + all_outputs(tmp_path)) == 2
    assert "terminated by SIGTERM" in one_line_error(capsys)
    assert left_behind(tmp_path) == []  # no graph, report, IR dumps, calibration file, temporary or lock file
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_sigterm_while_the_flags_are_checked_is_one_line(tmp_path, capsys, monkeypatch):
    """Before any output is staged (the checks of the flags, with torch being imported)."""
    def terminated_check(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises here
        raise AssertionError("SIGTERM did not interrupt the checks")

    monkeypatch.setattr(svdq_compiler.pipeline, "svdquant_pipeline", terminated_check)
    assert compile_main(QUICK + all_outputs(tmp_path)) == 2
    assert "terminated by SIGTERM" in one_line_error(capsys)
    assert left_behind(tmp_path) == []
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def wait_until_catching_sigterm(pid: int, timeout: float = 60) -> None:
    """Until the process has its SIGTERM handler (bit 15 of SigCgt in /proc/PID/status): earlier, the interpreter
    is still starting and the default action applies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        caught = re.search(r"^SigCgt:\s*([0-9a-f]+)$", Path(f"/proc/{pid}/status").read_text(), re.M)
        if caught and int(caught.group(1), 16) >> (signal.SIGTERM - 1) & 1:
            return
        time.sleep(0.01)
    raise AssertionError("the command never installed a SIGTERM handler")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the caught signals from /proc")
def test_sigterm_to_the_command_is_one_line_and_exit_2(tmp_path):
    """The real process, terminated while it imports and compiles: the one line, whatever step it was in."""
    command = subprocess.Popen([sys.executable, "-c", "import sys; from svdq_compiler.cli import compile_main; sys.exit(compile_main())", *QUICK, *all_outputs(tmp_path)],
                               stderr=subprocess.PIPE, text=True)
    wait_until_catching_sigterm(command.pid)
    command.send_signal(signal.SIGTERM)
    _, err = command.communicate(timeout=120)
    assert command.returncode == 2, err
    assert err.strip().splitlines() == [err.strip()] and "terminated by SIGTERM" in err, err
    assert left_behind(tmp_path) == []


def test_a_failure_after_the_compile_leaves_no_report_dumps_or_calibration(tmp_path, capsys, monkeypatch):
    def full_disk(gm, path):
        raise InputError("no space left on the device", where=str(path), fix="free some space")

    monkeypatch.setattr(svdq_compiler, "save", full_disk)
    assert compile_main(QUICK + all_outputs(tmp_path)) == 2
    assert "no space left" in one_line_error(capsys)
    assert left_behind(tmp_path) == []


def write_onnx_with_external_data(gm, path, form):
    """What export_onnx writes for a large model: the model, and its external data beside it."""
    Path(path).write_bytes(b"onnx model naming " + f"{Path(path).name}.data".encode())
    Path(f"{path}.data").write_bytes(b"weights")
    return path


def test_the_onnx_model_appears_with_the_other_outputs(tmp_path, monkeypatch):
    monkeypatch.setattr(svdq_compiler, "export_onnx", write_onnx_with_external_data)
    assert compile_main(QUICK + all_outputs(tmp_path) + ["--onnx", str(tmp_path / "g.onnx")]) == 0
    assert left_behind(tmp_path) == ["c.safetensors", "g.onnx", "g.onnx.data", "g.pt", "ir", "r.json"]
    assert (tmp_path / "g.onnx").read_bytes() == b"onnx model naming g.onnx.data"
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["onnx"]["path"] == str(tmp_path / "g.onnx") and report["onnx"]["bytes"] == 29


def test_a_failure_after_the_onnx_export_leaves_no_onnx_model(tmp_path, capsys, monkeypatch):
    def export_then_fail(gm, path, form):
        write_onnx_with_external_data(gm, path, form)
        raise InputError("no space left on the device", where=str(path), fix="free some space")

    monkeypatch.setattr(svdq_compiler, "export_onnx", export_then_fail)
    assert compile_main(QUICK + all_outputs(tmp_path) + ["--onnx", str(tmp_path / "g.onnx")]) == 2
    assert "no space left" in one_line_error(capsys)
    assert left_behind(tmp_path) == []  # neither the ONNX model nor its data, nor any other output


HOLD_LOCK = textwrap.dedent("""
    import sys, time
    from svdq_compiler.files import exclusive_output
    with exclusive_output(sys.argv[1], "--out"):
        print("held", flush=True)
        time.sleep(60)
""")


def test_a_second_writer_of_the_same_out_is_refused(tmp_path, capsys):
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path / "g.pt")], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert compile_main(QUICK + ["--out", str(tmp_path / "g.pt")]) == 2
        assert re.search(r"another process is writing this --out now \(at .*g.pt\)", one_line_error(capsys))
    finally:
        holder.kill()
        holder.wait()
    assert not (tmp_path / "g.pt").exists()
    with exclusive_output(tmp_path / "g.pt"):  # the lock died with its holder
        pass
    assert left_behind(tmp_path) == []


def test_atomic_path_cleans_up_on_sigterm(tmp_path):
    with pytest.raises(InputError, match="terminated by SIGTERM"):
        with atomic_path(tmp_path / "out.json") as temporary:
            temporary.write_text("partial")
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
    assert left_behind(tmp_path) == []


# ---- calling a loaded graph -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    gm = svdq_compiler.capture(TokenMLP(), token_inputs(),
                               dynamic_shapes={"x": {1: DynDim("tokens", 2, 64, label="tokens")}, "scale": None})
    return svdq_compiler.load(svdq_compiler.save(gm, tmp_path_factory.mktemp("g") / "g.pt"))


def test_loaded_graph_checks_dtype_device_and_names(loaded):
    x, scale = torch.randn(2, 8, 64), torch.tensor(2.0)
    expected = TokenMLP()(x, scale)
    torch.testing.assert_close(loaded(x, scale), expected)  # positional, in the captured order
    with pytest.raises(InputError, match=r"x is bfloat16, but the graph was captured with float32.*x.to\(torch.float32\)"):
        loaded(x=x.bfloat16(), scale=scale)
    with pytest.raises(InputError, match=r"x is on meta, but the graph's weights are on cpu"):
        loaded(x=x.to("meta"), scale=scale)
    with pytest.raises(InputError, match=r"missing a required argument: 'scale'.*pass its inputs by name: x, scale"):
        loaded(x=x)
    with pytest.raises(InputError, match=r"unexpected keyword argument 'y'"):
        loaded(x=x, scale=scale, y=x)


def test_converting_a_graph_to_another_dtype_is_refused(loaded):
    for convert in (lambda g: g.to(torch.bfloat16), lambda g: g.half(), lambda g: g.to("cpu", torch.float16)):
        with pytest.raises(InputError, match=r"compiled for float32; converting it to (bfloat16|float16) would "
                                             r"change its weights but not its kernels"):
            convert(loaded)
    assert loaded.to("cpu") is loaded and loaded.float() is loaded  # no change: allowed
    assert next(loaded.parameters()).dtype == torch.float32
