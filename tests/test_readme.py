"""Every code block of README.md runs, in order, in one scratch folder, and its result is checked.

Shell lines run in this process (`svdq-compile`/`svdq-inspect` through their main functions, `> FILE` honoured), so
the test pays for torch's import once; `~` is a scratch home holding a tiny FLUX.1 pipeline folder at
`~/models/FLUX.1-dev` (the README's example path) and Python blocks run in one shared namespace. A block preceded by
`<!-- readme-test: KIND (why) -->` is checked another way: `synopsis` against the parsers, `make-dry-run` by what
`make -n` runs. Every block must have a check below, so a new example cannot go untested.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from scale_fixtures import ROOT, TINY_FLUX, write_tiny_flux
from svdq_compiler.cli import compile_main, compile_parser, inspect_main, inspect_parser

README = ROOT / "README.md"
FENCE = re.compile(r"^(?P<indent> *)```(?P<lang>\w*)\s*$")
MARKER = re.compile(r"<!--\s*readme-test:\s*(?P<kind>[\w-]+)")


@dataclass
class Block:
    line: int  # 1-based line of the opening fence
    lang: str
    text: str
    kind: str  # "run", or the readme-test marker's kind

    @property
    def key(self) -> str:
        return self.text.strip().splitlines()[0]


def readme_blocks(text: str) -> list[Block]:
    blocks, lines, index = [], text.splitlines(), 0
    while index < len(lines):
        match = FENCE.match(lines[index])
        if not match:
            index += 1
            continue
        indent, start = len(match["indent"]), index
        body = []
        index += 1
        while not FENCE.match(lines[index]):
            body.append(lines[index][indent:])
            index += 1
        before = next((line for line in reversed(lines[:start]) if line.strip()), "")
        marker = MARKER.search(before) if before.lstrip().startswith("<!--") or "-->" in before else None
        if marker is None:  # a marker's comment may span lines: look for its start
            comment = "\n".join(lines[max(0, start - 4):start])
            marker = MARKER.search(comment) if comment.rstrip().endswith("-->") else None
        blocks.append(Block(start + 1, match["lang"], "\n".join(body) + "\n", marker["kind"] if marker else "run"))
        index += 1
    return blocks


def shell_commands(text: str) -> list[list[str]]:
    """The block's command lines as argument lists, comments dropped, `~` expanded against $HOME."""
    commands = []
    for line in text.splitlines():
        words = shlex.split(line, comments=True)
        if words:
            commands.append([str(Path(word).expanduser()) if word.startswith("~") else word for word in words])
    return commands


def run_command(words: list[str], capsys) -> str:
    """Run one shell line in this process; returns its stdout (also written to `> FILE` when redirected)."""
    target = None
    if ">" in words:
        at = words.index(">")
        words, target = words[:at], words[at + 1]
    program, args = words[0], words[1:]
    main = {"svdq-compile": compile_main, "svdq-inspect": inspect_main}.get(program)
    assert main is not None, f"the README test cannot run {program!r}: teach run_command"
    capsys.readouterr()
    status = main(args)
    out = capsys.readouterr().out  # capsys, not redirect_stdout: --print-ir-after-change holds the stream it got
    assert status == 0, f"{shlex.join(words)} exited {status}"
    if target is not None:
        Path(target).write_text(out)
    return out


# ---- the checks, one per block (keyed by the block's first line) ----------------------------------------------

def check_make(block: Block, _) -> None:
    for target, expected in (("demo", "tools/demo.py --model tiny-flux --out build/demo"), ("test", "-m pytest")):
        assert re.search(rf"^make {target}\b", block.text, re.M)
        dry = subprocess.run(["make", "-n", "-C", str(ROOT), target], capture_output=True, text=True, timeout=60)
        assert dry.returncode == 0 and expected in dry.stdout, dry.stdout + dry.stderr


def check_synopsis(block: Block, _) -> None:
    """Every flag the synopsis shows exists, and every flag of the parsers is shown."""
    for program, parser in (("svdq-compile", compile_parser()), ("svdq-inspect", inspect_parser())):
        part = block.text[block.text.index(program):]
        other = "svdq-inspect" if program == "svdq-compile" else None
        part = part[:part.index(other)] if other and other in part else part
        shown = set(re.findall(r"(?<![\w-])(--?[a-z][\w-]*)", part))
        known = {option for action in parser._actions for option in action.option_strings} - {"-h", "--help"}
        assert shown <= known, f"{program} synopsis shows unknown flags {shown - known}"
        missing = [action.option_strings[-1] for action in parser._actions
                   if action.option_strings and "--help" not in action.option_strings
                   and not shown.intersection(action.option_strings)]
        assert not missing, f"{program} synopsis lacks {missing}"


def check_cli_examples(block: Block, outputs: list[str]) -> None:
    compiled, layers, _, folder_compile, pixart = outputs
    assert "outputs: graph g.pt; IR dumps ir; calibration statistics calib.safetensors; ONNX model g.onnx" in compiled
    assert Path("ir/000_capture.py").is_file() and any(Path("ir").glob("00[1-9]_*.py"))
    assert Path("g.onnx").stat().st_size > 0 and Path("calib.safetensors").stat().st_size > 0
    assert "layers quantized" in layers and "compression" in layers
    assert Path("kernels.py").read_text().count("@triton.jit") >= 1
    compile(Path("kernels.py").read_text(), "kernels.py", "exec")  # the redirected kernels are Python
    report = json.loads(Path("flux-int4.json").read_text())
    assert report["adapter"] == "flux" and report["capture"]["inputs"][0]["dtype"] == "bfloat16"
    assert "pass annotate_linears: changed" in pixart and "def forward" in pixart  # IR printed after the change
    assert "pass smooth" not in pixart and Path("p.pt").is_file()
    del folder_compile


def check_streaming(block: Block, outputs: list[str]) -> None:
    auto, streamed = outputs
    assert "streamed" not in auto  # a tiny folder is far below half of the memory
    assert re.search(r"streamed \d+ units \(none smoothing, data-free\)", streamed)
    assert Path("flux-streamed.pt").is_file()


def check_lora_nunchaku(block: Block, namespace: dict) -> None:
    from svdq_compiler.lora import applied_loras

    assert namespace["name"] not in applied_loras(namespace["graph"])
    exported = Path("ours.safetensors")
    assert exported.stat().st_size > 0
    from safetensors import safe_open

    with safe_open(str(exported), framework="pt") as handle, \
            safe_open("svdq-int4-flux.safetensors", framework="pt") as source:
        assert set(handle.keys()) == set(source.keys())


def check_python_api(block: Block, namespace: dict) -> None:
    out, graph = namespace["out"], namespace["graph"]
    assert out[0].shape[:2] == (1, 1024) and torch.isfinite(out[0]).all()
    assert Path("graph.pt").is_file() and Path("ir/000_capture.py").is_file()
    dims = {dim["name"]: dim["status"] for dim in graph.meta["svdq_capture"]["dims"]}
    assert dims.get("image_tokens") == "dynamic" or "dynamic" in dims.values()


def check_generic(block: Block, namespace: dict) -> None:
    from svdq_compiler import REPORT_META

    gm = namespace["gm"]
    with torch.no_grad():
        out = gm(torch.randn(2, 300, 768))
    assert out.shape == (2, 300, 768)  # another token count than captured
    layers = gm.meta[REPORT_META]["layers"]["layers"]
    quantized = [layer["name"] for layer in layers if layer["output_rel_error"] is not None]
    assert quantized == ["1.up", "1.down", "2.up", "2.down"]  # the first and last are the embed and final roles
    assert any(n.op == "call_function" and getattr(n.target, "namespace", "") == "svdq" for n in gm.graph.nodes)


CHECKS = {
    "make demo    # set up a local venv, compile the shipped tiny FLUX to W4A4 and write build/demo/": check_make,
    "svdq-compile MODEL --out graph.pt [--preset int4] [--rank 32] [--set FIELD=VALUE ...]": check_synopsis,
    "svdq-compile random:flux --out g.pt --dump-ir ir --onnx g.onnx --save-calib calib.safetensors  # ir/000_capture.py, …":
        check_cli_examples,
    "svdq-compile ~/models/FLUX.1-dev/transformer --out flux-int4.pt          # streams when above half of RAM":
        check_streaming,
    "import svdq_compiler": check_lora_nunchaku,
    "import torch": check_python_api,
    "from svdq_compiler import DynDim": check_generic,
}


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """A scratch folder as the working directory and home, with the files the examples name."""
    home = tmp_path / "home"
    folder = home / "models" / "FLUX.1-dev"
    write_tiny_flux(folder / "transformer", TINY_FLUX, dtype="bfloat16")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline",
                                                         "transformer": ["diffusers", "FluxTransformer2DModel"]}))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    monkeypatch.setenv("SVDQ_KERNELS", "reference")  # the kernels have their own tests under the interpreter
    return work


def write_example_files(graph_path: str) -> None:
    """style.safetensors (a LoRA of the graph's model) and svdq-int4-flux.safetensors (a Nunchaku checkpoint)."""
    from safetensors.torch import save_file

    from test_lora import make_lora
    from test_nunchaku import synthetic_checkpoint
    from svdq_compiler.models import load_model

    model = load_model(str(Path("~/models/FLUX.1-dev").expanduser()))
    save_file(make_lora(model, ["transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.proj_mlp"]),
              "style.safetensors")
    synthetic_checkpoint("svdq-int4-flux.safetensors", "int4")
    del graph_path


def test_every_readme_block_runs_and_does_what_it_says(workspace, capsys):
    blocks = readme_blocks(README.read_text())
    unchecked = [block.key for block in blocks if block.key not in CHECKS]
    assert not unchecked, f"README blocks without a check in tests/test_readme.py: {unchecked}"
    assert {block.kind for block in blocks} <= {"run", "synopsis", "make-dry-run"}
    namespace: dict = {"__name__": "__readme__"}
    for block in blocks:
        run_block(block, namespace, capsys)


def run_block(block: Block, namespace: dict, capsys) -> None:
    check = CHECKS[block.key]
    if block.kind != "run":
        check(block, None)
    elif block.lang == "python":
        if "flux-int4.pt" in block.text:
            write_example_files("flux-int4.pt")
        with contextlib.redirect_stdout(io.StringIO()):
            exec(compile(block.text, f"README.md line {block.line}", "exec"), namespace)
        check(block, namespace)
    else:
        check(block, [run_command(words, capsys) for words in shell_commands(block.text)])
