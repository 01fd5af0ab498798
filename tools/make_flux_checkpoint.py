"""Write a random-weight FLUX.1 transformer checkpoint in the diffusers folder layout, tensor by tensor.

    python tools/make_flux_checkpoint.py --out /work/bigdata/flux-random            # full size: 11.9B, ~24 GB bf16
    python tools/make_flux_checkpoint.py --out /tmp/f --config '{"num_layers": 1}'  # any config override

The default is `FluxTransformer2DModel()` with its default config (19 double and 38 single blocks, hidden size
3072): the architecture of FLUX.1-dev/schnell. Memory stays small: the model is built on the meta device for
the names and shapes, and each tensor is generated, written and freed before the next (sharded safetensors with
an index, `--max-shard-gb` per shard, as diffusers saves them). The output is never meant for the repository.

Weight scale, chosen to look like a trained transformer rather than N(0, 1): a linear weight [N, K] is
N(0, 1/K) with a log-normal scale per input column (σ = 0.5), so a few input channels carry 3–5× larger
weights, as trained layers do (this is what smoothing and the low-rank branch act on); biases are N(0, 0.02²);
RMSNorm weights are 1 + N(0, 0.05²). Every tensor has its own generator seeded from `--seed` and its name, so
the same command writes the same bytes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import zlib
from pathlib import Path

import torch

from svdq_compiler.sharded import write_sharded

COLUMN_SIGMA = 0.5
BIAS_STD = 0.02
NORM_STD = 0.05


def flux_specs(config: dict, dtype: torch.dtype) -> tuple[dict, dict]:
    """The model's full config and {tensor name: (shape, dtype)}, from a meta-device FluxTransformer2DModel."""
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel(**config)
    specs = {name: (tuple(t.shape), dtype if t.is_floating_point() else t.dtype)
             for name, t in model.state_dict().items()}
    full_config = {k: v for k, v in dict(model.config).items() if not k.startswith("_")}
    full_config.update(_class_name=type(model).__name__, _diffusers_version=_diffusers_version())
    return full_config, specs


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__


def random_tensor(name: str, shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    if len(shape) == 2:
        n, k = shape
        columns = torch.exp(COLUMN_SIGMA * torch.randn(k, generator=generator))
        columns /= columns.square().mean().sqrt()  # keep the layer's overall scale at 1/sqrt(K)
        weight = torch.randn(n, k, generator=generator).mul_(columns / k ** 0.5)
        return weight.to(dtype)
    if name.endswith("bias"):
        return (BIAS_STD * torch.randn(shape, generator=generator)).to(dtype)
    return (1 + NORM_STD * torch.randn(shape, generator=generator)).to(dtype)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="output folder (created; files replaced)")
    parser.add_argument("--config", default="{}", help="JSON overrides of FluxTransformer2DModel's default config")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-shard-gb", type=float, default=10.0, help="largest shard size (diffusers: 10)")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    config, specs = flux_specs(json.loads(args.config), dtype)
    total = sum(torch.Size(shape).numel() for shape, _ in specs.values())
    start = time.perf_counter()

    def progress(names):
        for index, name in enumerate(names):
            if not args.quiet and index % 50 == 0:
                print(f"  {name} ({time.perf_counter() - start:.0f}s)", file=sys.stderr, flush=True)
            yield name

    files = write_sharded(args.out, config, specs, lambda name: random_tensor(name, *specs[name], args.seed),
                          max_shard_bytes=int(args.max_shard_gb * (1 << 30)), progress=progress)
    size = sum(f.stat().st_size for f in files)
    print(json.dumps({"out": str(args.out), "parameters": total, "bytes": size, "files": len(files),
                      "seconds": round(time.perf_counter() - start, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
