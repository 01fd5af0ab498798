"""Peak memory of `svdq_compiler.load` against the graph file's size: tiny-flux (the shipped model, compiled
normally), the ~100M-parameter random FLUX of bench_compile (compiled with --stream on, data-free), and any
graph given with --graph (the streamed 12B FLUX).

    OMP_NUM_THREADS=1 .venv/bin/python tools/bench_load_memory.py --work /tmp/load-memory
    .venv/bin/python tools/bench_load_memory.py --graph mine=/path/graph.pt      # measure existing graphs
    .venv/bin/python tools/bench_load_memory.py --device cuda                    # also a load onto the GPU

Each load is measured in a fresh process that first imports every module such a load imports (the first load
of a process imports ~900 modules, ~45 MiB: torch's deserializer and FX passes, diffusers; the list comes from
a load in another process) and, with --device, makes the device's first use (a CUDA context): the peak RSS
(VmHWM, reset through /proc/self/clear_refs) above the RSS after that is what loading the file costs. `load`
maps the file and verifies its digests page by page, so the goal is at most 1.2x the file size. Part of the
peak is per node of the graph, not per byte: CPython compiling the forward's code. `load` compiles it in pieces
of svdq_compiler.piecewise.PIECE_NODES nodes (`forward_compile_peak`, `forward_pieces`); compiled whole, as
torch.fx compiles a forward, it would peak at `flat_compile_peak` (8.4 MiB for tiny-flux, more than its
weights). Of the peak, `library_pages` are the pages of shared libraries the load made resident (file-backed
code of torch's C++ paths run for the first time in the process, ~2 MiB whatever the graph: a fixed cost of the
process, as the imports and the CUDA context are), reported apart; `graph_file_pages` are the graph file's own
pages made resident (0: the weights stay on disk until used). For comparison, files up to --torch-max-bytes
are also loaded with plain `torch.export.load` (which reads every tensor into memory).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

# Run in a fresh process: argv[1] the graph file, argv[2] "svdq" or "torch", argv[3] the modules to import first
# (JSON list, or "list" to print the modules a load imports instead of measuring), argv[4] the device (optional).
LOAD_PEAK_RSS = """
import importlib, json, re, sys, time
import torch, svdq_compiler
svdq_compiler.load  # imports the API, which registers the svdq ops (torch.export.load needs them too)


def run():
    if sys.argv[2] == "svdq":
        return svdq_compiler.load(sys.argv[1], device=sys.argv[4] if len(sys.argv) > 4 else None)
    return torch.export.load(sys.argv[1]).module()


def status(key):
    return int(re.search(key + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024


def mapped_files():  # resident bytes of each file mapped into this process (shared libraries, the graph file)
    resident, path = {}, None
    for line in open("/proc/self/smaps"):
        fields = line.split()
        if re.match(r"^[0-9a-f]+-[0-9a-f]+$", fields[0]):
            path = fields[5] if len(fields) > 5 and fields[5].startswith("/") else None
        elif fields[0] == "Rss:" and path:
            resident[path] = resident.get(path, 0) + int(fields[1]) * 1024
    return resident


if sys.argv[3] == "list":
    before = set(sys.modules)
    run()
    print(json.dumps(sorted(set(sys.modules) - before)))
    sys.exit(0)
for name in json.loads(sys.argv[3]):
    try:
        importlib.import_module(name)
    except Exception:  # a module that only imports in the context that pulled it in
        pass
if len(sys.argv) > 4:  # the device's first use (a CUDA context: ~0.3 GiB of host memory) is not the load's
    torch.ones(1).to(sys.argv[4])
files_before = mapped_files()
before = status("VmRSS")
with open("/proc/self/clear_refs", "w") as handle:  # "5" resets the peak (VmHWM) to the current RSS
    handle.write("5")
start = time.perf_counter()
graph = run()
seconds = time.perf_counter() - start
measured = {"peak_rss_above_import": status("VmHWM") - before, "rss_after_load": status("VmRSS") - before,
            "load_s": round(seconds, 3), "devices": sorted({p.device.type for p in graph.parameters()})}
# Pages of files mapped in the process that the load made resident: the graph file's own (a copy of the weights,
# which a load should not make), and the shared libraries' code run for the first time in this process (torch's
# C++ paths; the same few MiB whatever the graph, as the imports are).
files_after = mapped_files()
graph_file = str(__import__("pathlib").Path(sys.argv[1]).resolve())
grown = {path: files_after[path] - files_before.get(path, 0) for path in files_after}
measured.update(graph_file_pages=max(grown.get(graph_file, 0), 0),
                library_pages=sum(max(v, 0) for path, v in grown.items() if path != graph_file))
# The part of the peak that is per node, not per byte: CPython compiling the forward's code (its parser holds every
# token of the source at once). tracemalloc measures it alone; RSS could not. `flat_compile_peak`: the whole forward
# compiled at once, as torch.fx compiles it; `forward_compile_peak`: compiled in pieces, as `load` does.
import tracemalloc
from svdq_compiler import piecewise
from svdq_compiler.dropin import graph_module_of
module = graph_module_of(graph)
code = module.code
tracemalloc.start()
compile(code, "forward", "exec")
flat_peak = tracemalloc.get_traced_memory()[1]
tracemalloc.stop()
tracemalloc.start()
pieces = piecewise._pieces(module.graph)
measured.update(graph_nodes=len(module.graph.nodes), forward_code_chars=len(code), flat_compile_peak=flat_peak,
                forward_compile_peak=tracemalloc.get_traced_memory()[1], forward_pieces=len(pieces))
print(json.dumps(measured))
"""


def measure_load(path: Path, loader: str = "svdq", device: str | None = None) -> dict:
    """Peak RSS above the import and wall time of loading `path` in a fresh process that has first imported
    every module such a load imports (found by a load in another process), so that only the load is counted."""
    def fresh(modules: str) -> str:
        # run outside the checkout: `-c` puts the working folder first on sys.path, where the checkout's
        # svdq_compiler/ (without codegen/ and passes/, which an install maps in) would shadow the installed one
        run = subprocess.run([sys.executable, "-c", LOAD_PEAK_RSS, str(path.resolve()), loader, modules,
                              *([device] if device else [])], capture_output=True, text=True, timeout=3600,
                             cwd=tempfile.gettempdir())
        if run.returncode != 0:
            raise RuntimeError(f"loading {path} failed:\n{run.stderr[-2000:]}")
        return run.stdout.strip().splitlines()[-1]

    return json.loads(fresh(fresh("list")))


def compile_graph(name: str, work: Path) -> Path:
    out = work / f"{name}.pt"
    if out.exists():
        return out
    if name == "flux100m":
        from bench_compile import FLUX_100M
        import make_flux_checkpoint

        folder = work / "flux100m-checkpoint"
        config = {k: list(v) if isinstance(v, tuple) else v for k, v in FLUX_100M.items()}
        assert make_flux_checkpoint.main(["--out", str(folder), "--config", json.dumps(config), "--quiet"]) == 0
        command = [str(folder), "--stream", "on"]
    else:
        command = [name]
    compiler = [sys.executable, "-c", "import sys; from svdq_compiler.cli import compile_main; sys.exit(compile_main())"]
    subprocess.run([*compiler, *command, "--out", str(out)], check=True, capture_output=True, text=True)
    return out


def main(argv: list[str] | None = None) -> int:
    from bench_common import machine, write_result

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/svdq-load-memory"), help="where graphs are built")
    parser.add_argument("--cases", default="tiny-flux,flux100m", help="graphs to build and measure")
    parser.add_argument("--graph", action="append", default=[], metavar="NAME=PATH", help="also measure this file")
    parser.add_argument("--device", help="also load onto this device (e.g. cuda), weights copied one by one")
    parser.add_argument("--torch-max-bytes", type=int, default=1 << 30,
                        help="compare with plain torch.export.load (which reads every tensor) up to this file size")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "load-memory.json")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    graphs = {name: compile_graph(name, args.work) for name in args.cases.split(",") if name}
    graphs.update({item.split("=", 1)[0]: Path(item.split("=", 1)[1]) for item in args.graph})
    cases = []
    for name, path in graphs.items():
        size = path.stat().st_size
        ours = measure_load(path, "svdq")
        case = {"graph": name, "file_bytes": size, "svdq_load": ours,
                "peak_rss_over_file": round(ours["peak_rss_above_import"] / size, 3),
                "peak_rss_less_library_pages_over_file": round(
                    (ours["peak_rss_above_import"] - ours["library_pages"]) / size, 3)}
        if args.device:
            moved = measure_load(path, "svdq", args.device)
            case.update({f"svdq_load_{args.device}": moved,
                         f"{args.device}_peak_rss_over_file": round(moved["peak_rss_above_import"] / size, 3)})
        if size <= args.torch_max_bytes:
            plain = measure_load(path, "torch")
            case.update(torch_export_load=plain,
                        torch_peak_rss_over_file=round(plain["peak_rss_above_import"] / size, 3))
        cases.append(case)
        print(f"{name}: {size / 2**20:.1f} MiB file, load peak RSS {ours['peak_rss_above_import'] / 2**20:.1f} MiB "
              f"({case['peak_rss_over_file']}x; {case['peak_rss_less_library_pages_over_file']}x less the "
              f"{ours['library_pages'] / 2**20:.1f} MiB of library code first run; graph file pages resident: "
              f"{ours['graph_file_pages']}; compiling its {ours['graph_nodes']}-node forward in "
              f"{ours['forward_pieces']} pieces peaks at {ours['forward_compile_peak'] / 2**20:.2f} MiB, whole at "
              f"{ours['flat_compile_peak'] / 2**20:.1f} MiB); torch.export.load "
              f"{case.get('torch_peak_rss_over_file', 'not run')}x")
    write_result({"benchmark": "load-memory", "goal": "peak RSS of load <= 1.2x the file size above the import",
                  "cases": cases, "machine": machine(), "note": "shared machine: see load_average",
                  "command": " ".join(["tools/bench_load_memory.py", *(argv or sys.argv[1:])])}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
