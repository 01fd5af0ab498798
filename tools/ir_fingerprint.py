"""Fingerprints of what the compiler produces, to show a refactor changes nothing.

For every built-in model × preset (tiny settings) it records SHA-256 hashes of the compiled graph's IR text
(`format_ir`: code plus per-node annotations), of its parameters and buffers (names, dtypes, shapes, bytes), of
the per-layer report, and of its output on a fixed input (bit for bit). It also fingerprints the other ways
into the pipeline: the streaming compile of a tiny FLUX folder and the Nunchaku import of an exported graph.

    python tools/ir_fingerprint.py --out /tmp/before.json
    python tools/ir_fingerprint.py --out /tmp/after.json --compare /tmp/before.json

Each model is captured once and the capture is deep-copied for each preset (capture is deterministic and
dominates the time). Exit status 1 when --compare finds a difference.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("SVDQ_KERNELS", "reference")  # outputs from the reference ops: the same on any machine

import torch  # noqa: E402

import svdq_compiler  # noqa: E402
from svdq_compiler.ir import format_ir  # noqa: E402
from svdq_compiler.models import adapter_for, builtin_names, load_model  # noqa: E402
from bench_common import machine  # noqa: E402

TINY = dict(calib_prompts=2, calib_steps=1, smooth_grid=4)


def sha(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()[:16]


def tensors_hash(module: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted({**dict(module.named_parameters()), **dict(module.named_buffers())}.items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        if not tensor.is_meta:
            digest.update(tensor.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def first_tensor(result):
    if isinstance(result, (tuple, list)):
        return first_tensor(result[0])
    return getattr(result, "sample", result)


def fingerprint(gm: torch.fx.GraphModule, check: dict | tuple | None) -> dict[str, str]:
    report = gm.meta.get("svdq_report", {})
    prints = {"ir": sha(format_ir(gm)), "tensors": tensors_hash(gm),
              "layers": sha(json.dumps(report.get("layers"), sort_keys=True, default=str)),
              "linears": sha(json.dumps(report.get("linears"), sort_keys=True, default=str))}
    if check is not None:
        with torch.no_grad():
            out = first_tensor(gm(**check) if isinstance(check, dict) else gm(*check))
        prints["output"] = sha(out.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return prints


class CaptureOnce:
    """Patches the capture entry points that `svdq_compiler.compile` calls so one model is captured once."""

    def __init__(self):
        self.cached = None
        self.module = sys.modules[svdq_compiler.compile.__module__]  # where compile looks the capture up
        self.real = (self.module.capture_replicated, self.module.capture)

    def __enter__(self):
        replicated, plain = self.real

        def capture_replicated(*args, **kwargs):
            if self.cached is None:
                self.cached = replicated(*args, **kwargs) or plain(*args, **kwargs)
            return copy.deepcopy(self.cached)

        self.module.capture_replicated = capture_replicated
        return self

    def __exit__(self, *exc):
        self.module.capture_replicated, self.module.capture = self.real


def models_by_preset(models: list[str], presets: list[str]) -> dict[str, dict]:
    results = {}
    for name in models:
        model = load_model(name)
        adapter = adapter_for(model)
        inputs = adapter.example_inputs(model)
        check = adapter.calib_inputs(model, 1, 1, seed=99)[0]
        with CaptureOnce():
            for preset in presets:
                config = svdq_compiler.QuantConfig.preset(preset, **TINY)
                gm = svdq_compiler.compile(model, inputs, config)
                results[f"{name} {preset}"] = fingerprint(gm, check)
                print(f"{name} {preset}: {results[f'{name} {preset}']}", flush=True)
            # the data-free calibration (isotropic rows, as the torch.compile backend uses without inputs)
            config = svdq_compiler.QuantConfig.preset(presets[0], calib_source="weights", **TINY)
            key = f"{name} {presets[0]} calib_source=weights"
            results[key] = fingerprint(svdq_compiler.compile(model, inputs, config), check)
            print(f"{key}: {results[key]}", flush=True)
    return results


def other_paths(work: Path) -> dict[str, dict]:
    """The streaming compile and the Nunchaku import of a tiny FLUX."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from scale_fixtures import flux_inputs, write_tiny_flux

    from svdq_compiler.config import QuantConfig
    from svdq_compiler.streaming import compile_streaming

    folder = write_tiny_flux(work / "flux")
    results = {}
    check = flux_inputs(seed=3)
    for calibration in ("none", "weight-only"):
        out = work / f"stream-{calibration}.pt"
        compile_streaming(folder, out, QuantConfig.preset("int4"), calibration=calibration)
        results[f"streaming {calibration}"] = fingerprint(svdq_compiler.load(out), check)
    from svdq_compiler.interop.nunchaku import NUNCHAKU_COMPATIBLE, export_nunchaku, import_nunchaku

    model = load_model("random:flux", dtype=torch.bfloat16)  # Nunchaku checkpoints hold 16-bit layers
    adapter = adapter_for(model)
    config = svdq_compiler.QuantConfig.preset("int4", **TINY, **NUNCHAKU_COMPATIBLE)
    gm = svdq_compiler.compile(model, adapter.example_inputs(model), config)
    export_nunchaku(gm, work / "nunchaku.safetensors")
    imported = import_nunchaku(work / "nunchaku.safetensors")
    results["nunchaku import"] = fingerprint(imported, adapter.calib_inputs(model, 1, 1, seed=99, batch=2)[0])
    for key in ("streaming none", "streaming weight-only", "nunchaku import"):
        print(f"{key}: {results[key]}", flush=True)
    return results


MACHINE = "machine"  # the run's machine record (bench_common.machine), beside the fingerprints


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--compare", type=Path, help="an earlier result: report every fingerprint that differs")
    parser.add_argument("--models", default=",".join(builtin_names()), help="comma-separated; empty: none")
    parser.add_argument("--presets", default=",".join(svdq_compiler.PRESETS))
    parser.add_argument("--no-other-paths", action="store_true", help="skip the streaming and Nunchaku paths")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    results = models_by_preset([m for m in args.models.split(",") if m], args.presets.split(","))
    if not args.no_other_paths:
        with tempfile.TemporaryDirectory() as work:
            results.update(other_paths(Path(work)))
    args.out.write_text(json.dumps({**results, MACHINE: machine()}, indent=1, sort_keys=True))
    print(f"wrote {args.out}")
    if args.compare is None:
        return 0
    before = {key: value for key, value in json.loads(args.compare.read_text()).items() if key != MACHINE}
    differ = [f"{key} {part}" for key in sorted(set(before) & set(results))
              for part in before[key] if before[key][part] != results[key].get(part)]
    missing = sorted(set(before) ^ set(results))
    for line in differ:
        print(f"DIFFERS: {line}")
    if missing:
        print(f"only in one run: {missing}")
    print(f"{len(set(before) & set(results)) - len({d.rsplit(' ', 1)[0] for d in differ})} identical, "
          f"{len(differ)} fingerprint(s) differ")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
