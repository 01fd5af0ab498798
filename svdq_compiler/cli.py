"""Command-line front ends: `svdq-compile` (model → graph.pt) and `svdq-inspect` (graph.pt → summary).

Every user mistake ends in one line on stderr (what, where, what to do) and exit status 2; an unexpected error
is a bug and keeps its traceback.

Building the parsers imports neither torch nor diffusers (`--help` answers at once): everything heavy is imported
inside the functions that run a command.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Sequence

from svdq_compiler.errors import InputError, SvdqError
from svdq_compiler.files import terminate_as_exception

DEFAULT_MODEL = "tiny-flux"
DEFAULT_CALIB_PROMPTS = 4
DTYPES = ("float32", "bfloat16", "float16")


# ---- svdq-compile ---------------------------------------------------------------------------------------------

# The registry of built-in models (svdq_compiler.models) needs torch; tests/test_cli.py checks this line names
# every one of them.
BUILTINS_HELP = ("Built-in models: tiny-flux (the shipped trained FLUX), and the tiny random-weight random:flux, "
                 "random:pixart, random:sd3, random:sana and random:unet.")


def compile_parser() -> argparse.ArgumentParser:
    from svdq_compiler.config import ONNX_FORMS, PRESETS

    parser = argparse.ArgumentParser(
        prog="svdq-compile",
        description="Compile a diffusion model to a 4-bit SVDQuant graph (graph.pt) that svdq_compiler.load runs.",
        epilog=BUILTINS_HELP)
    parser.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                        help="a built-in name, a diffusers model or pipeline folder, or a single-file .safetensors "
                             "checkpoint (default: %(default)s)")
    parser.add_argument("--out", "-o", required=True, type=Path, help="where to write the compiled graph")
    parser.add_argument("--preset", default="int4", choices=sorted(PRESETS),
                        help="quantization preset (default: %(default)s)")
    parser.add_argument("--rank", type=int, help="rank of the 16-bit low-rank branch (overrides the preset)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help="override any QuantConfig field (JSON value, e.g. --set group_size=128 "
                             "--set 'skip=[\"proj_out\"]'); repeatable")
    parser.add_argument("--batch", type=int, default=2,
                        help="batch of the example inputs; 2 or more makes the batch dimension dynamic "
                             "(default: %(default)s)")
    parser.add_argument("--tokens", type=grid_arg,
                        help="image tokens of the example inputs: a count, or ROWSxCOLS (patch grid; latent "
                             "pixels for a U-Net); default: the adapter's non-square default")
    parser.add_argument("--calib-prompts", type=int,
                        help=f"calibration prompts (default: {DEFAULT_CALIB_PROMPTS}, spread over the shipped captions "
                             "for a pipeline folder; with --calib-prompts-file: every prompt of the file)")
    parser.add_argument("--calib-steps", type=int, default=4,
                        help="denoising steps recorded per calibration prompt; a pipeline's are drawn at random, one "
                             "per equal stretch of its sampler's steps (default: %(default)s)")
    parser.add_argument("--calib-prompts-file", type=Path, metavar="FILE",
                        help="calibrate on these prompts (one per line, # comments) run through the folder's own "
                             "diffusers pipeline; a pipeline folder without it uses the shipped captions")
    parser.add_argument("--calib-sampler-steps", type=int, metavar="T",
                        help="sampler steps of each calibration prompt through the pipeline (default: the pipeline's)")
    parser.add_argument("--calib-size", type=size_arg, metavar="HEIGHTxWIDTH",
                        help="image size in pixels the pipeline samples calibration prompts at (default: the "
                             "pipeline's)")
    parser.add_argument("--calib-set", type=Path, metavar="FILE",
                        help="calibrate on a saved calibration set (the NAME.calibset.safetensors a pipeline "
                             "compile writes beside --out) instead of collecting one")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of example and calibration inputs (default: %(default)s)")
    parser.add_argument("--dtype", choices=DTYPES, help="convert the weights (default: the checkpoint's dtype)")
    parser.add_argument("--static", action="store_true", help="capture every dimension static (no dynamic shapes)")
    parser.add_argument("--path", choices=("auto", "graph", "eager"), default="auto",
                        help="graph: capture with torch.export; eager: quantize the model by module swap, for models "
                             "torch.export cannot capture (no cross-layer fusion); auto (the default): graph, falling "
                             "back to eager when torch.export fails on data-dependent code in the model")
    parser.add_argument("--dump-ir", type=Path, metavar="DIR",
                        help="write NNN_<pass>.py (IR with annotations) and NNN_<pass>.stats.json after each pass")
    parser.add_argument("--print-ir-after-change", action="store_true",
                        help="print the IR to stdout after each pass that changed it")
    parser.add_argument("--passes", type=passes_arg, metavar="A,B,C",
                        help="run only these passes (in pipeline order), for debugging; an unknown name lists them")
    parser.add_argument("--verify", action="store_true", help="check the IR's invariants after capture and each pass")
    parser.add_argument("--report", type=Path, metavar="FILE", help="write the compile report as JSON")
    parser.add_argument("--stream", choices=("auto", "on", "off"), default="auto",
                        help="compile a diffusers folder one block at a time, writing graph.pt as it goes, so the "
                             "model never sits in memory (data-free unless --stream-smoothing activations); auto streams when the "
                             "checkpoint is larger than half the machine's memory. A streamed compile refuses "
                             "--passes, --static, --save-calib and --onnx; its --dump-ir has a folder per unit")
    parser.add_argument("--stream-smoothing", choices=("none", "weight-only", "activations"),
                        help="smoothing when streaming: none (λ = 1); weight-only: λ from the weights' column ranges, "
                             "searched per group on synthetic inputs (slower); activations: calibrated block by "
                             "block on the --calib-set inputs, or else the adapter's --calib-prompts x --calib-steps "
                             "random conditioning, activation-aware (slowest: every block runs on every input; "
                             "blocks see the fp outputs of the ones before, or the quantized ones with --set "
                             "calib_propagation=quantized). Default: activations with --calib-set, else none")
    parser.add_argument("--onnx", type=Path, metavar="FILE",
                        help="also export the compiled graph as an ONNX model (svdq_compiler.export_onnx)")
    parser.add_argument("--onnx-form", choices=ONNX_FORMS, default="portable",
                        help="portable: standard ops (INT4 DequantizeLinear + MatMul, runs in onnxruntime); custom: "
                             "svdq-domain fused ops (default: %(default)s)")
    parser.add_argument("--save-calib", type=Path, metavar="FILE",
                        help="write the calibration statistics (safetensors) for torch.compile(backend='svdquant', "
                             "options={'calib_stats': FILE}) or a later compile")
    parser.add_argument("--progress", choices=("auto", "on", "off"), default="auto",
                        help="progress bars on stderr; auto (the default) shows them when stderr is a terminal")
    parser.add_argument("--verbose", "-v", action="store_true", help="log each step and pass")
    return parser


def grid_arg(text: str) -> int | tuple[int, int]:
    try:
        if "x" in text:
            rows, cols = text.lower().split("x")
            return int(rows), int(cols)
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a token count or ROWSxCOLS") from None


def size_arg(text: str) -> tuple[int, int]:
    height, sep, width = text.lower().partition("x")
    try:
        size = int(height), int(width)
    except ValueError:
        size = None
    if not sep or size is None or min(size) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not HEIGHTxWIDTH in pixels (e.g. 512x768)")
    return size


def passes_arg(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def quant_config(args: argparse.Namespace):
    from svdq_compiler.config import QuantConfig

    overrides: dict[str, Any] = {}
    for item in args.overrides:
        field, sep, value = item.partition("=")
        if not sep:
            raise InputError(f"--set {item!r} is not FIELD=VALUE", fix="e.g. --set group_size=128")
        try:
            overrides[field.strip()] = json.loads(value)
        except json.JSONDecodeError:
            overrides[field.strip()] = value  # a bare word is a string
    if args.rank is not None:
        overrides["rank"] = args.rank
    return QuantConfig.preset(args.preset, **overrides)


class Steps:
    """The top-level steps of a command, as a progress bar on stderr (and log lines with --verbose)."""

    def __init__(self, names: Sequence[str], show: bool):
        from tqdm import tqdm

        self.bar = tqdm(total=len(names), file=sys.stderr, disable=not show, bar_format="{desc} [{n}/{total}]",
                        leave=False)
        self.times: dict[str, float] = {}

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        self.bar.set_description_str(name)
        start = time.perf_counter()
        result = fn()
        self.times[name] = round(time.perf_counter() - start, 3)
        logging.getLogger("svdq_compiler").info("%s: %.2fs", name, self.times[name])
        self.bar.update(1)
        return result

    def close(self) -> None:
        self.bar.close()


def wants_progress(args: argparse.Namespace) -> bool:
    """--progress on, or auto with a terminal on stderr."""
    return args.progress == "on" or (args.progress == "auto" and sys.stderr.isatty())


def run_compile(args: argparse.Namespace) -> dict[str, Any]:
    import svdq_compiler
    from svdq_compiler.files import ensure_dir, exclusive_output, staged_outputs

    check_counts(args)
    # Check every output location before the long work, so a typo costs seconds, not a compile.
    ensure_dir(args.out.parent, "folder of --out")
    if args.out.is_dir():
        raise InputError("--out is a folder", where=str(args.out), fix="give a file name such as graph.pt")
    if args.report is not None:
        ensure_dir(args.report.parent, "folder of --report")
    if args.save_calib is not None:
        ensure_dir(args.save_calib.parent, "folder of --save-calib")
    if args.onnx is not None:
        ensure_dir(args.onnx.parent, "folder of --onnx")
        if args.onnx.is_dir():
            raise InputError("--onnx is a folder", where=str(args.onnx), fix="give a file name such as model.onnx")
    if args.dump_ir is not None:
        ensure_dir(args.dump_ir.parent, "folder of --dump-ir")
        if args.dump_ir.exists() and not args.dump_ir.is_dir():
            raise InputError("--dump-ir is a file", where=str(args.dump_ir), fix="give a folder name")
    config = quant_config(args)
    if args.onnx is not None:
        from svdq_compiler.onnx_export import form_problem, require_onnx_packages

        require_onnx_packages("--onnx")
        problem = form_problem(config, args.onnx_form)
        if problem is not None:
            raise InputError(f"--preset {args.preset} with --onnx-form {args.onnx_form}: {problem}",
                             fix="add --onnx-form custom, or compile with an int4 or int8 preset")
    svdq_compiler.pipeline.svdquant_pipeline(args.passes)  # an unknown pass name fails here, before loading
    if args.save_calib is not None and args.passes is not None and "calibrate" not in args.passes:
        raise InputError("--save-calib needs the calibrate pass, which --passes leaves out", where=str(args.save_calib),
                         fix="add calibrate to --passes, or drop --save-calib")
    # One writer per --out; every output (graph, report, IR dumps, calibration file) appears only if the whole
    # command succeeds, and SIGTERM removes what was written so far.
    with exclusive_output(args.out, "--out"), staged_outputs() as staged:
        if wants_streaming(args):
            return run_streaming(args, config, staged)
        return compile_and_save(args, config, staged)


def check_counts(args: argparse.Namespace) -> None:
    """Sizes and counts must be positive: 0 would silently mean "the default" or fail deep inside torch."""
    tokens = args.tokens if isinstance(args.tokens, tuple) else (args.tokens,)
    for flag, values in (("--batch", (args.batch,)), ("--tokens", tokens), ("--calib-prompts", (args.calib_prompts,)),
                         ("--calib-steps", (args.calib_steps,)), ("--calib-sampler-steps", (args.calib_sampler_steps,))):
        if any(value is not None and value < 1 for value in values):
            given = "x".join(str(v) for v in values)
            raise InputError(f"{flag} {given}: must be at least 1",
                             fix=f"give a positive {flag}" + (", or leave it out for the adapter's default"
                                                              if flag == "--tokens" else ""))


def compile_and_save(args: argparse.Namespace, config, staged) -> dict[str, Any]:
    import torch

    import svdq_compiler
    from svdq_compiler.files import write_json
    from svdq_compiler.models import adapter_for, load_model

    show_progress = wants_progress(args)
    steps = Steps(["load model", "example inputs", "calibration inputs", "compile", "save"]
                  + (["onnx"] if args.onnx else []), show=show_progress)
    out = staged.file(args.out, "graph file")
    dump_ir = staged.folder(args.dump_ir, "IR dump folder (--dump-ir)") if args.dump_ir is not None else None
    save_calib = staged.file(args.save_calib, "calibration file") if args.save_calib is not None else None
    onnx = staged.files_beside(args.onnx, "ONNX model") if args.onnx is not None else None
    try:
        dtype = getattr(torch, args.dtype) if args.dtype else None
        model = steps.run("load model", lambda: load_model(args.model, dtype=dtype))
        adapter = adapter_for(model)

        example = steps.run("example inputs", lambda: adapter.example_inputs(model, batch=args.batch,
                                                                             tokens=args.tokens, seed=args.seed))
        calib, calibration = steps.run("calibration inputs", lambda: calibration_inputs(
            args, config, model, adapter, example, staged, show_progress))
        gm = steps.run("compile", lambda: svdq_compiler.compile(
            model, example, config, calib_inputs=calib, dump_ir=dump_ir, passes=args.passes,
            dynamic_shapes=None if args.static else "auto", verify=args.verify,
            print_ir_after_change=args.print_ir_after_change, progress=show_progress, adapter=adapter,
            save_calib=save_calib, path=args.path))
        steps.run("save", lambda: svdq_compiler.save(gm, out))
        if args.onnx is not None:
            steps.run("onnx", lambda: svdq_compiler.export_onnx(gm, onnx, form=args.onnx_form))
    finally:
        steps.close()
    report = dict(svdq_compiler.eager.compile_report_of(gm))
    outputs = {"output": {"path": str(args.out), "bytes": out.stat().st_size}}
    if args.onnx is not None:
        outputs["onnx"] = {"path": str(args.onnx), "bytes": onnx.stat().st_size, "form": args.onnx_form}
    report.update(model=args.model, adapter=adapter.name, **outputs, compression=compression(args.model, model,
                                                                                             out.stat().st_size),
                  calibration=calibration, written=written_files(args, calibration.get("written")),
                  steps_s=steps.times, versions=svdq_compiler.serialize.versions())
    if args.report is not None:
        write_json(staged.file(args.report, "compile report"), report, "compile report")
    return report


def written_files(args: argparse.Namespace, calibration_set: str | None = None) -> dict[str, str]:
    """{what: where} for every output the command writes."""
    places = {"graph": args.out, "report": args.report, "IR dumps": args.dump_ir,
              "calibration statistics": getattr(args, "save_calib", None), "calibration set": calibration_set,
              "ONNX model": getattr(args, "onnx", None)}
    return {what: str(path) for what, path in places.items() if path is not None}


def calibration_set_path(out: Path) -> Path:
    """Where a compile that collected a calibration set writes it: beside the graph, named after it."""
    return out.with_name(f"{out.stem}.calibset.safetensors")


def calibration_inputs(args: argparse.Namespace, config, model, adapter, example: dict, staged,
                       progress: bool) -> tuple[Any, dict[str, Any]]:
    """The calibration inputs of a compile, and the report's account of them ("source", "detail", and for a
    calibration set its provenance and the file written).

    --calib-set reuses a saved set; a runnable diffusers pipeline folder (or --calib-prompts-file) collects one
    through the pipeline (svdq_compiler/calibration_set.py) and writes it beside --out; otherwise the adapter's
    inputs: random conditioning, or tiny-flux's sampler on its class prompts.
    """
    from svdq_compiler import calibration_set as sets
    from svdq_compiler.models.tiny_flux import TinyFluxAdapter

    if config.calib_source == "weights" or (args.passes is not None and "calibrate" not in args.passes):
        detail = ("data-free: isotropic Gaussian rows per layer (calib_source=weights)" if config.calib_source ==
                  "weights" else "none: --passes leaves out calibrate")
        if args.calib_set is not None or args.calib_prompts_file is not None:
            raise InputError(f"calibration inputs were given but the compile uses none ({detail})",
                             fix="drop --calib-set / --calib-prompts-file, or calibrate on inputs")
        return None, {"source": "none", "detail": detail}
    if args.calib_set is not None:
        if args.calib_prompts_file is not None:
            raise InputError("--calib-set and --calib-prompts-file both give the calibration inputs",
                             fix="give one of them")
        loaded = sets.load_calibration_set(args.calib_set).conformed(model, example)
        return loaded, {"source": "calibration set", "detail": loaded.source,
                        "provenance": asdict(loaded.provenance), "samples": len(loaded)}
    folder = Path(args.model)
    problem = sets.pipeline_problem(folder) if folder.is_dir() else "it is not a diffusers pipeline folder"
    if isinstance(adapter, TinyFluxAdapter) and args.calib_prompts_file is not None:
        from svdq_compiler.models import tiny_flux

        pipe = tiny_flux.load_pipeline(tiny_flux.folder_of(model), transformer=model)
    elif problem is None:
        pipe = sets.load_pipeline(folder, denoiser=model)
    elif args.calib_prompts_file is not None:
        raise InputError(f"--calib-prompts-file runs the model's own pipeline, but {problem}", where=args.model,
                         fix="give a diffusers pipeline folder (model_index.json with its text encoders, scheduler "
                             f"and VAE) of one of: {', '.join(sets.PIPELINE_CLASSES)}")
    else:
        prompts = args.calib_prompts or DEFAULT_CALIB_PROMPTS
        calib = adapter.calib_inputs(model, prompts, args.calib_steps, seed=args.seed, batch=args.batch,
                                     tokens=args.tokens)
        if isinstance(adapter, TinyFluxAdapter):
            return calib, {"source": "tiny-flux sampler",
                           "detail": f"the tiny-flux sampler on its class prompts ({prompts} prompts × "
                                     f"{args.calib_steps} steps)"}
        return calib, {"source": "random conditioning",
                       "detail": f"random conditioning: random text embeddings and latents on the {adapter.name} "
                                 f"noise schedule ({prompts} prompts × {args.calib_steps} steps), because {problem}"}
    prompts = calibration_prompts(args)
    height, width = args.calib_size or (None, None)
    collected = sets.collect(pipe, prompts, args.calib_steps, sampler_steps=args.calib_sampler_steps,
                             guidance_scale=None, height=height, width=width, seed=args.seed, progress=progress)
    target = calibration_set_path(args.out)
    collected.save(staged.file(target, "calibration set"))
    collected.path = target
    conformed = collected.conformed(model, example)
    return conformed, {"source": "pipeline prompts", "detail": conformed.source,
                       "provenance": asdict(conformed.provenance), "samples": len(conformed), "written": str(target)}


def calibration_prompts(args: argparse.Namespace) -> list[str]:
    """The prompts a pipeline calibration samples: every prompt of --calib-prompts-file, or --calib-prompts of
    them (of the shipped captions: 4 by default) spread evenly over the list, so the default few cover its
    kinds of caption (objects, scenes, people, text, styles)."""
    from svdq_compiler.calibration_set import read_prompts

    available = read_prompts(args.calib_prompts_file)
    count = args.calib_prompts or (len(available) if args.calib_prompts_file is not None else DEFAULT_CALIB_PROMPTS)
    if count > len(available):
        raise InputError(f"--calib-prompts {count} asks for more prompts than the {len(available)} of "
                         f"{args.calib_prompts_file or 'the shipped list'}",
                         fix=f"give at most {len(available)}, or a longer --calib-prompts-file")
    return [available[index * len(available) // count] for index in range(count)]


def compression(spec: str, model, graph_bytes: int) -> dict[str, Any]:
    """The graph file against the checkpoint the model came from (in its own dtype) and against the same
    weights in float32, each as bytes and a ratio (how many times smaller the graph is)."""
    from svdq_compiler.models import checkpoint_files
    from svdq_compiler.models.loading import checkpoint_dtype, checkpoint_tensor_bytes

    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}.values()
    fp32 = sum(t.numel() * (4 if t.is_floating_point() else t.element_size()) for t in tensors)
    result: dict[str, Any] = {"graph_bytes": graph_bytes,
                              "fp32": {"bytes": fp32, "ratio": round(fp32 / graph_bytes, 3)}}
    files = checkpoint_files(spec)
    if files:
        size = checkpoint_tensor_bytes(files)
        result["checkpoint"] = {"dtype": str(checkpoint_dtype(files)).removeprefix("torch."), "bytes": size,
                                "ratio": round(size / graph_bytes, 3)}
    return result


def wants_streaming(args: argparse.Namespace) -> bool:
    """--stream on, or auto with a diffusers folder whose weights exceed half of the physical memory."""
    if args.stream == "off":
        return False
    from svdq_compiler.streaming import checkpoint_bytes

    folder = Path(args.model)
    # what a streamed compile does not do: refused rather than silently dropped
    unsupported = [flag for flag, given in (("--passes", args.passes), ("--static", args.static),
                                            ("--save-calib", args.save_calib), ("--onnx", args.onnx)) if given]
    if args.stream == "on":
        if not folder.is_dir():
            raise InputError("--stream compiles a diffusers model folder", where=args.model,
                             fix="give the folder holding config.json and the safetensors shards")
        if unsupported:
            raise InputError(f"{', '.join(unsupported)} cannot be combined with --stream",
                             fix="drop them, or compile without --stream")
        if args.calib_prompts_file is not None:
            raise InputError("--calib-prompts-file runs the model's own pipeline, and a streamed model is never "
                             "whole in memory to run it", where=args.model,
                             fix="pass a set the pipeline recorded with --calib-set (a compile of the pipeline "
                                 "folder writes NAME.calibset.safetensors), or compile without --stream")
        return True
    if not folder.is_dir():
        return False
    import os

    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    streams = checkpoint_bytes(folder) > memory // 2
    if streams and unsupported:
        raise InputError(f"the checkpoint is larger than half of the memory, so it would be streamed, and "
                         f"{', '.join(unsupported)} cannot be combined with streaming", where=args.model,
                         fix="add --stream off to compile in memory, or drop them")
    if streams and args.calib_prompts_file is not None:
        raise InputError("the checkpoint is larger than half of the memory, so it would be streamed, and a streamed "
                         "model is never whole in memory to run its pipeline: --calib-prompts-file would be ignored",
                         where=args.model, fix="add --stream off to calibrate in memory, or pass a set the pipeline "
                                               "recorded with --calib-set")
    return streams


def run_streaming(args: argparse.Namespace, config, staged) -> dict[str, Any]:
    import torch

    import svdq_compiler
    from svdq_compiler.files import write_json
    from svdq_compiler.streaming import compile_streaming

    from tqdm import tqdm

    bar = tqdm(file=sys.stderr, disable=not wants_progress(args), unit="block", leave=False, desc="streaming")

    def on_unit(record, index, total):
        bar.total = total
        bar.set_postfix_str(record.name)
        bar.update(1)

    smoothing = args.stream_smoothing or ("activations" if args.calib_set is not None else "none")
    calib_set = None
    if args.calib_set is not None:
        if smoothing != "activations":
            raise InputError(f"--calib-set gives calibration inputs, but --stream-smoothing {smoothing} streams "
                             f"data-free", fix="drop --stream-smoothing (a calibration set calibrates block by "
                                               "block), or drop --calib-set")
        from svdq_compiler.calibration_set import load_calibration_set

        calib_set = load_calibration_set(args.calib_set)
    out = staged.file(args.out, "graph file")
    dump_ir = staged.folder(args.dump_ir, "IR dump folder (--dump-ir)") if args.dump_ir is not None else None
    try:
        prompts = args.calib_prompts or DEFAULT_CALIB_PROMPTS
        report = compile_streaming(Path(args.model), out, config.replace(calib_prompts=prompts,
                                                                          calib_steps=args.calib_steps),
                                   calibration=smoothing, batch=args.batch, tokens=args.tokens,
                                   input_seed=args.seed, calib_inputs=calib_set,
                                   dtype=getattr(torch, args.dtype) if args.dtype else None, on_unit=on_unit,
                                   dump_ir=dump_ir, verify=args.verify,
                                   print_ir_after_change=args.print_ir_after_change)
    finally:
        bar.close()
    blocks = report["streaming"]["block_calibration"]
    if blocks is None:
        calibration = {"source": "none", "detail": f"data-free: the streaming compile runs no calibration "
                                                   f"({smoothing} smoothing)"}
    elif calib_set is not None:
        calibration = {"source": "calibration set", "detail": blocks["source"],
                       "provenance": asdict(calib_set.provenance), "samples": blocks["inputs"]}
    else:
        calibration = {"source": "random conditioning", "detail": f"random conditioning, calibrated block by block: "
                                                                  f"{blocks['source']} (no --calib-set: a streamed "
                                                                  f"model is never whole in memory to run a pipeline)"}
    report.update(model=args.model, adapter=report["capture"]["adapter"], written=written_files(args),
                  calibration=calibration,
                  output={"path": str(args.out), "bytes": out.stat().st_size},
                  steps_s=report["streaming"]["steps_s"], versions=svdq_compiler.serialize.versions())
    if args.report is not None:
        write_json(staged.file(args.report, "compile report"), report, "compile report")
    return report


def compile_summary(report: dict[str, Any]) -> str:
    capture = report["capture"]
    lines = [f"wrote {report['output']['path']} ({human_bytes(report['output']['bytes'])}): "
             f"{report.get('eager', {}).get('class', capture['module_class'])} ({report['adapter']}), preset "
             f"{report['config']['preset_name']}"]
    if "path" in report:
        lines.append(f"  path: {report['path']} ({report['path_reason']})")
    if "onnx" in report:
        onnx = report["onnx"]
        lines.append(f"wrote {onnx['path']} ({human_bytes(onnx['bytes'])}): ONNX, {onnx['form']} form")
    lines.append("  dimensions: " + (describe_dims(capture) or "all static"))
    if "calibration" in report:
        lines.append(f"  calibration: {report['calibration']['detail']}")
    lines += [f"  {pass_line(record)}" for record in report["passes"]]
    if not report["passes"]:
        lines.append("  passes: none ran (capture only)")
    streaming = report.get("streaming")
    if streaming:
        calibrated = streaming["block_calibration"]
        how = f"calibrated block by block on {calibrated['inputs']} inputs" if calibrated else "data-free"
        lines.append(f"  streamed {len(streaming['units'])} units ({streaming['calibration']} smoothing, {how}): "
                     f"{streaming['wall_s']:.0f} s, peak RSS {human_bytes(streaming['peak_rss_bytes'])}; "
                     f"{human_bytes(streaming['checkpoint_bytes'])} {streaming['dtype']} checkpoint → "
                     f"{human_bytes(streaming['output_bytes'])} ({streaming['size_ratio']}× smaller)")
    sizes = report.get("compression")
    if sizes:
        against = [f"the {sizes['checkpoint']['dtype']} checkpoint ({human_bytes(sizes['checkpoint']['bytes'])}): "
                   f"{sizes['checkpoint']['ratio']}×"] if "checkpoint" in sizes else []
        against.append(f"float32 ({human_bytes(sizes['fp32']['bytes'])}): {sizes['fp32']['ratio']}×")
        lines.append(f"  graph {human_bytes(sizes['graph_bytes'])}, smaller than " + "; than ".join(against))
    totals = report["totals"]
    lines.append(f"  {totals['nodes']} nodes, {totals['linears_annotated']} annotated linears, "
                 f"{human_bytes(totals['parameter_bytes'])} of parameters")
    lines.append("outputs: " + "; ".join(f"{what} {where}" for what, where in report["written"].items()))
    return "\n".join(lines)


def pass_line(record: dict[str, Any], max_items: int = 8) -> str:
    """`pass smooth: changed, 1.20s groups=28 kept_identity=0 …`: the scalar statistics and small tables; the
    per-group detail stays in the report and the IR dumps."""
    shown = []
    for key, value in record["stats"].items():
        if isinstance(value, (int, float, str, bool)) or value is None:
            shown.append(f"{key}={value}")
        elif isinstance(value, dict) and len(value) <= max_items and all(
                isinstance(v, (int, float, str, bool)) for v in value.values()):
            shown.append(f"{key}={json.dumps(value, separators=(',', ':'))}")
        elif isinstance(value, (list, dict)):
            shown.append(f"{key}=[{len(value)}]")
    state = "changed" if record["modified"] else "no change"
    took = f", {record['wall_s']:.2f}s" if "wall_s" in record else ""  # a saved graph keeps no timings
    return f"pass {record['name']}: {state}{took} " + " ".join(shown)


def describe_dims(capture: dict[str, Any]) -> str:
    """One entry per dimension name: `image tokens 2..65536`, `batch static 1 (why)`."""
    seen: dict[str, str] = {}
    for dim in capture["dims"]:
        key = dim["name"] or f"{dim['input']}[{dim['index']}]"
        if key in seen:
            continue
        label = dim["label"] or key
        if dim["status"] == "dynamic":
            low, high, step = dim["min"] * dim["multiple"], dim["max"] * dim["multiple"], dim["multiple"]
            seen[key] = f"{label} {low}..{high}" + (f" step {step}" if step > 1 else "")
        else:
            seen[key] = f"{label} {dim['status']} {dim['size']}" + (f" ({dim['reason']})" if dim["reason"] else "")
    return "; ".join(seen.values())


def run_compile_in_group(args: argparse.Namespace) -> dict[str, Any] | None:
    """`run_compile`, or under torchrun (WORLD_SIZE > 1) one process of a group: each calibrates its share of
    the inputs and the statistics are merged (`svdq_compiler.distributed`), so every process compiles the same
    model; process 0 writes the outputs, the others compile into a scratch folder that is removed, and return
    None (nothing to print)."""
    import tempfile

    from svdq_compiler import distributed

    if not distributed.init_from_environment() or distributed.rank() == 0:
        return run_compile(args)
    with tempfile.TemporaryDirectory(prefix="svdq-rank-") as scratch:
        run_compile(argparse.Namespace(**{**vars(args), "out": Path(scratch) / "graph.pt", "report": None,
                                          "save_calib": None, "onnx": None, "dump_ir": None}))
    return None


def compile_main(argv: Sequence[str] | None = None) -> int:
    args = compile_parser().parse_args(argv)
    configure_logging(args.verbose)

    def compile_and_print() -> None:
        report = run_compile_in_group(args)
        if report is not None:
            print(compile_summary(report))

    return run_reporting_errors("svdq-compile", compile_and_print)


# ---- svdq-inspect ---------------------------------------------------------------------------------------------

def inspect_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="svdq-inspect", description="Summarize a compiled graph file: inputs and dynamic dimensions, nodes by "
                                         "op, linears and their annotations, parameter bytes, passes.")
    parser.add_argument("graph", type=Path, help="a graph file written by svdq-compile or svdq_compiler.save")
    parser.add_argument("--layers", action="store_true", help="one line per annotated linear")
    parser.add_argument("--ir", action="store_true", help="print the saved IR (graph code with annotations)")
    parser.add_argument("--kernels", action="store_true",
                        help="print the generated Triton source of each fused kernel (for this machine's GPU, else "
                             "Hopper sm_90)")
    parser.add_argument("--json", action="store_true",
                        help="print as JSON: the one section asked for, or an object keyed summary/ir/kernels")
    return parser


def graph_summary(path: Path) -> dict[str, Any]:
    import torch

    from svdq_compiler import parameter_bytes, serialize
    from svdq_compiler.ir import CAPTURE_META, MANIFEST_META

    from svdq_compiler.eager import compile_report_of, is_eager, stub_of

    loaded = serialize.load(path)
    gm = stub_of(loaded) if is_eager(loaded) else loaded  # an eager model's quantized linears: its stub graph
    ops = Counter(op_name(node.target) for node in gm.graph.nodes if node.op == "call_function")
    linear_ops = {"aten.linear", "aten.addmm", "aten.mm", "aten.conv2d", "aten.convolution"}
    by_dtype: Counter[str] = Counter()
    for tensor in {id(t): t for t in [*gm.parameters(), *gm.buffers()]}.values():
        by_dtype[str(tensor.dtype).removeprefix("torch.")] += tensor.numel() * tensor.element_size()
    report = compile_report_of(loaded)
    return {
        "path": str(path),
        "compile_path": report.get("path", "graph"),
        "compile_path_reason": report.get("path_reason"),
        "bytes": path.stat().st_size,
        "manifest": gm.meta[MANIFEST_META],
        "model": report.get("eager", {}).get("class", gm.meta[CAPTURE_META]["module_class"]),
        "adapter": gm.meta[CAPTURE_META]["adapter"],
        "config": report.get("config"),
        "inputs": gm.meta[CAPTURE_META]["inputs"],
        "dimensions": describe_dims(gm.meta[CAPTURE_META]),
        "relaxed_guards": (gm.meta[CAPTURE_META].get("relaxed_guards") or {}).get("reason"),
        "nodes": len(gm.graph.nodes),
        "ops": dict(ops.most_common()),
        "linear_ops": sum(count for name, count in ops.items() if name in linear_ops),
        "svdq_ops": sum(count for name, count in ops.items() if name.startswith("svdq.")),
        "linears": report.get("linears", []),
        "layer_report": report.get("layers"),
        "parameter_bytes": parameter_bytes(gm),
        "parameter_bytes_by_dtype": dict(by_dtype),
        "passes": report.get("passes", []),
        "torch_here": torch.__version__,
    }


def op_name(target: Any) -> str:
    name = getattr(target, "name", None)
    text = name() if callable(name) else getattr(target, "__name__", str(target))
    return text.replace("::", ".")


def inspect_text(summary: dict[str, Any], layers: bool) -> str:
    manifest = summary["manifest"]
    config = summary["config"]
    lines = [
        f"{summary['path']}: svdq graph format {manifest['format_version']}, {human_bytes(summary['bytes'])}, "
        f"written by svdq-compiler {manifest['svdq_compiler']} (torch {manifest['torch']}, "
        f"triton {manifest['triton']})",
        f"model: {summary['model']} (adapter {summary['adapter']}); config: "
        + (f"preset {config['preset_name']}, rank {config['rank']}" if config else "none (captured, not compiled)"),
        "inputs: " + ", ".join(f"{i['path']} {i['dtype']}{list(i['shape'])}" for i in summary["inputs"]),
        f"dimensions: {summary['dimensions'] or 'all static'}",
    ]
    if summary["compile_path"] == "eager":
        lines.append(f"path: {summary['compile_path_reason']} (the graph below holds the quantized linears "
                     "only, one input per smoothing group: svdq_compiler/eager.py)")
    if summary["relaxed_guards"]:
        lines.append(f"relaxed size guards: {summary['relaxed_guards']}")
    top = ", ".join(f"{name} {count}" for name, count in list(summary["ops"].items())[:8])
    lines.append(f"nodes: {summary['nodes']} ({top})")
    roles = Counter(layer.get("role") for layer in summary["linears"])
    lines.append(f"linears: {summary['linear_ops']} 16-bit linear/conv ops, {summary['svdq_ops']} svdq ops; "
                 f"{len(summary['linears'])} annotated" + (f" ({dict(roles)})" if roles else ""))
    by_dtype = ", ".join(f"{dtype} {human_bytes(size)}" for dtype, size in summary["parameter_bytes_by_dtype"].items())
    lines.append(f"parameters: {human_bytes(summary['parameter_bytes'])} ({by_dtype})")
    lines += [pass_line(record) for record in summary["passes"]]
    if layers and summary.get("layer_report"):
        from svdq_compiler.report import format_layers

        lines.append(format_layers(summary["layer_report"]).rstrip())
    elif layers:
        for layer in summary["linears"]:
            scheme = layer.get("scheme") or {}
            lines.append(f"  {layer['name']}: {layer['role']} {layer['in_features']}→{layer['out_features']} "
                         f"{scheme.get('weight') or 'fp'}/{scheme.get('act') or '16'}"
                         + (f" skip={layer['skip_reason']}" if layer.get("skip_reason") else "")
                         + (f" fallback={layer['fallback']}" if layer.get("fallback") else ""))
    return "\n".join(lines)


def graph_kernels(path: Path) -> list:
    from svdq_compiler import serialize
    from svdq_compiler.codegen.sources import kernel_sources
    from svdq_compiler.eager import is_eager, stub_of

    loaded = serialize.load(path)
    return kernel_sources(stub_of(loaded) if is_eager(loaded) else loaded)  # kernel specs are node arguments


def kernels_text(path: Path) -> str:
    """Each distinct kernel once, headed by the graph nodes that launch it."""
    sources = graph_kernels(path)
    if not sources:
        return f"# {path}: no fused kernels (the graph was not fused, or keeps every layer 16-bit)\n"
    launches: dict[str, list] = {}  # spec text → its kernels, in first-launch order
    for kernel in sources:
        launches.setdefault(kernel.spec.to_string(), []).append(kernel)
    return "\n".join(f"# ==== {group[0].spec.kind} kernel {group[0].spec.hash[:12]}, launched by "
                     f"{', '.join(kernel.node for kernel in group)}\n# spec: {text}\n{group[0].source.rstrip()}\n"
                     for text, group in launches.items())


def kernel_records(path: Path) -> list[dict[str, str]]:
    return [{"node": kernel.node, "kind": kernel.spec.kind, "spec": kernel.spec.to_string(),
             "hash": kernel.spec.hash, "source": kernel.source} for kernel in graph_kernels(path)]


def inspect_main(argv: Sequence[str] | None = None) -> int:
    args = inspect_parser().parse_args(argv)
    configure_logging(False)

    def run():
        print(inspect_output(args), end="")

    return run_reporting_errors("svdq-inspect", run)


def inspect_output(args: argparse.Namespace) -> str:
    """Every section the flags ask for, in the order summary (with --layers), IR, kernels; --ir and --kernels
    alone print only their section. With --json one section is printed as its JSON (as before), several as one
    object keyed by section."""
    sections = [name for name, wanted in (("summary", args.layers or not (args.ir or args.kernels)),
                                          ("ir", args.ir), ("kernels", args.kernels)) if wanted]
    values: dict[str, Any] = {}
    for name in sections:
        if name == "summary":
            summary = graph_summary(args.graph)
            values[name] = summary if args.json else inspect_text(summary, args.layers) + "\n"
        elif name == "ir":
            from svdq_compiler.serialize import IR_FILE, read_extra

            values[name] = read_extra(args.graph)[IR_FILE]
        else:
            values[name] = kernel_records(args.graph) if args.json else kernels_text(args.graph)
    if not args.json:
        return "\n".join(values.values())
    return json.dumps(values[sections[0]] if len(sections) == 1 else values, indent=2, default=str) + "\n"


# ---- shared -------------------------------------------------------------------------------------------------

def run_reporting_errors(prog: str, fn: Callable[[], Any]) -> int:
    try:
        # SIGTERM at any point (importing torch, loading, compiling) ends in the one line, not a silent exit 143
        with terminate_as_exception():
            fn()
    except SvdqError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    return 0


def configure_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, stream=sys.stderr,
                        format="%(name)s: %(message)s")


def human_bytes(size: int) -> str:
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    value, index = float(size), 0
    while value >= 1024 and index < len(units) - 1:
        value, index = value / 1024, index + 1
    return f"{size} B" if index == 0 else f"{value:.1f} {units[index]}"
