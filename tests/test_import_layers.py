"""The import layers of docs/architecture.md: the libraries, codegen and the passes never import a driver; the
libraries and codegen never import a pass, and no pass imports another (passes → libraries, never the reverse)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIBRARIES = ["errors", "files", "config", "quant", "ir", "fx_utils", "conv", "ops", "svdquant", "calibration",
             "recording", "rewrites", "roles", "scheme_policy", "grouping", "report", "blockwise", "distributed",
             "pipeline"]
# the modules that build a PassContext and call run_passes, and what only they use
DRIVERS = {"capture", "meta_capture", "api", "eager", "streaming", "backend", "interop", "dropin", "serialize",
           "archive", "archive_check", "graph_record", "onnx_export", "lora", "cli", "sharded", "calibration_set"}
FILES = [ROOT / "svdq_compiler" / f"{name}.py" for name in LIBRARIES] + sorted((ROOT / "codegen").glob("*.py")) \
    + sorted((ROOT / "passes").glob("*.py"))


def imported(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, dotted name) of every import, at module level or inside a function."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return found


def reaching_up(source: str) -> list[str]:
    return [f"line {line} imports {name}" for line, name in imported(ast.parse(source))
            if name.split(".")[0] == "svdq_compiler" and len(name.split(".")) > 1 and name.split(".")[1] in DRIVERS]


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_below_the_drivers(path):
    assert reaching_up(path.read_text()) == []


def test_a_lazy_driver_import_is_found():
    assert reaching_up("import torch\n\ndef f():\n    from svdq_compiler.capture import split_inputs\n") == \
        ["line 4 imports svdq_compiler.capture.split_inputs"]


# pipeline is the pass manager: it alone loads the registry (svdq_compiler.passes) and calls verify's check
BELOW_THE_PASSES = [path for path in FILES if path.parent.name != "passes" and path.stem != "pipeline"]
PASSES = sorted(path for path in (ROOT / "passes").glob("*.py") if path.stem != "__init__")


def reaching_passes(source: str, own: str | None = None) -> list[str]:
    """Imports of svdq_compiler.passes or any pass module other than `own`."""
    found = []
    for line, name in imported(ast.parse(source)):
        parts = name.split(".")
        if parts[:2] == ["svdq_compiler", "passes"] and parts[2:3] != [own]:
            found.append(f"line {line} imports {name}")
    return found


@pytest.mark.parametrize("path", BELOW_THE_PASSES, ids=lambda p: str(p.relative_to(ROOT)))
def test_libraries_below_the_passes(path):
    assert reaching_passes(path.read_text()) == []


@pytest.mark.parametrize("path", PASSES, ids=lambda p: p.stem)
def test_passes_never_import_one_another(path):
    assert reaching_passes(path.read_text(), own=path.stem) == []


def test_a_pass_import_is_found():
    source = "import torch\nfrom svdq_compiler.passes.smooth import apply\n\ndef f():\n    import svdq_compiler.passes\n"
    assert reaching_passes(source) == ["line 2 imports svdq_compiler.passes.smooth.apply",
                                       "line 5 imports svdq_compiler.passes"]
    assert reaching_passes(source, own="smooth") == ["line 5 imports svdq_compiler.passes"]
