"""Ahead-of-time compilation of generated kernels for GPUs this machine does not have, and what the SASS shows.

`triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", cc, 32), ...)` runs Triton's
whole pipeline (TTIR → TTGIR → LLVM → PTX → ptxas) with no GPU: the wheel ships ptxas, cuobjdump and nvdisasm.
From the cubin this module reads the registers, the spill traffic (local loads and stores), the shared memory,
and the hot loop: the backward branch whose body holds the most tensor-core instructions, with its instruction
mix (tensor-core, integer, float, PRMT byte permutes, loads, stores, spills).

Triton fixes compiled-or-interpreted for the whole process when it is imported (TRITON_INTERPRET), so the
compiles run in a child process without that variable (`python -m svdq_compiler.codegen.aot`), a few at a time.
Each result is cached as JSON under `~/.cache/svdq_compiler/aot/<key>.json` ($SVDQ_AOT_CACHE), the key hashing the kernel's source text,
the arch, the constexprs, warps and stages, and the Triton version: a rerun with nothing changed reads files.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from svdq_compiler.codegen.configs import gemm_configs, quantize_configs, tile_constexprs, weight_only_configs
from svdq_compiler.codegen.generate import Target, generate
from svdq_compiler.codegen.signature import signature_of
from svdq_compiler.codegen.spec import GemmSpec, KernelSpec, QuantizeSpec, WeightOnlySpec
from svdq_compiler.errors import SvdqError

# Shared memory one block may use (the opt-in maximum), per compute capability: CUDA C Programming Guide,
# "Technical Specifications per Compute Capability" (163 KB on sm_80/87, 99 KB on sm_86/89/120, 227 KB on
# sm_90/100).
SMEM_LIMIT = {(8, 0): 163 * 1024, (8, 6): 99 * 1024, (8, 7): 163 * 1024, (8, 9): 99 * 1024, (9, 0): 227 * 1024,
              (10, 0): 227 * 1024, (12, 0): 99 * 1024}
# The tensor-core instruction each arch's hot loop should hold, by operand kind.
TENSOR_OPCODES = ("IMMA", "HMMA", "IGMMA", "HGMMA", "QMMA", "OMMA", "QGMMA", "UTCIMMA", "UTCHMMA", "UTCQMMA",
                  "UTCOMMA", "UTCMXQMMA", "DMMA", "BMMA")
_FLOAT_PIPE = ("FFMA", "FADD", "FMUL", "FMNMX", "FSETP", "FSEL", "FSET", "FCHK", "FRND", "HFMA2", "HADD2", "HMUL2",
               "HSETP2", "HMNMX2", "FSWZADD")
_CONVERT = ("I2F", "F2I", "F2F", "I2FP", "F2IP", "F2FP", "MUFU")
_LOADS = ("LDG", "LDS", "LDSM", "LDC", "LD", "LDGSTS", "UTMALDG", "UBLKCP", "ULDC", "LDTM", "UTMAPF")
_STORES = ("STG", "STS", "ST", "RED", "ATOM", "ATOMG", "ATOMS", "REDG", "UTMASTG", "STTM", "STSM")
_INT_EXTRA = ("LOP3", "LOP", "SHF", "LEA", "SEL", "SGXT", "BMSK", "POPC", "FLO", "VIADD", "VIMNMX", "BREV", "LEA.HI")


# Bumped whenever what is read from the SASS changes, so cached results are recomputed.
_ANALYSIS_VERSION = 3


class AotError(SvdqError):
    """Ahead-of-time compilation could not run (no Triton, or the child process failed)."""


@dataclass(frozen=True, eq=False)
class AotJob:
    """One kernel text compiled for one arch with one set of constexprs."""

    label: str  # what the caller calls it (kernel template, config)
    source: str  # the module text holding the @triton.jit kernel
    kernel: str  # the kernel's name in the module
    types: dict  # parameter name → triton signature type ("*bf16", "i32", "constexpr")
    constexprs: dict
    capability: tuple
    num_warps: int
    num_stages: int

    @property
    def key(self) -> str:
        import triton

        text = json.dumps([self.source, self.kernel, self.types, self.constexprs, list(self.capability),
                           self.num_warps, self.num_stages, triton.__version__, _ANALYSIS_VERSION], sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:32]


@dataclass
class AotResult:
    label: str
    arch: str
    kernel: str
    constexprs: dict
    num_warps: int
    num_stages: int
    registers: int = 0
    spill_stores: int = 0  # STL instructions in the whole kernel
    spill_loads: int = 0  # LDL instructions
    stack_bytes: int = 0  # the local-memory frame ptxas reserved (spilled registers live there)
    shared_bytes: int = 0
    smem_limit: int = 0
    instructions: int = 0
    hot_loop: dict = field(default_factory=dict)  # length, mix, tensor_ops, serialized_waits, text
    error: str | None = None

    @property
    def spills(self) -> bool:
        return bool(self.spill_stores or self.spill_loads)

    @property
    def fits(self) -> bool:
        return self.error is None and self.shared_bytes <= self.smem_limit


def arch_name(capability: tuple) -> str:
    return f"sm_{capability[0]}{capability[1]}"


def spec_job(spec: KernelSpec, target: Target, config, *, m: int = 4096, n: int = 3072, k: int = 3072,
             label: str | None = None) -> AotJob:
    """The job that compiles `spec`'s kernel for `target` with `config`, at shapes that make every EVEN_* true."""
    signature = signature_of(spec)
    constexprs = tile_constexprs(spec, config, m, n, k)
    return AotJob(label or spec.name, generate(spec, target), spec.name,
                  {p.name: p.triton_type for p in signature.params}, constexprs, tuple(target.capability),
                  config.num_warps, config.num_stages)


def offered_configs(spec: KernelSpec, target: Target) -> list:
    """Every configuration the launcher may time for `spec` on `target`'s arch family, over all M buckets."""
    if isinstance(spec, GemmSpec):
        found = gemm_configs(spec, target, 8192) + gemm_configs(spec, target, 16)
    elif isinstance(spec, WeightOnlySpec):
        found = weight_only_configs(spec, target, 1) + weight_only_configs(spec, target, 8192)
    else:
        found = quantize_configs(spec, target, 8192)
    return list(dict.fromkeys(found))


# ---------------------------------------------------------------------------------------------------------
# What the project can emit

ARCHES = {"sm_80": (8, 0), "sm_86": (8, 6), "sm_89": (8, 9), "sm_90": (9, 0), "sm_100": (10, 0), "sm_120": (12, 0)}
INTEGER_ARCHES = ("sm_80", "sm_86", "sm_89", "sm_90")  # int4/int8 kernels and W4A16 (Blackwell runs Hopper's)
NVFP4_ARCHES = tuple(ARCHES)  # the dequantize path below sm_100, native block-scaled MMA on sm_100/sm_120


def kernel_templates() -> dict[str, KernelSpec]:
    """One spec per kernel template the compiler emits (format, epilogue kinds, rank, next-layer quantization),
    at the FLUX size K = N = 3072 (bf16; fp16 where a template's code differs by dtype)."""
    from svdq_compiler.codegen.spec import ActQuant, Epilogue, QuantizeNext

    k = n = 3072
    every_epilogue = (Epilogue("gelu_tanh"), Epilogue("mul"), Epilogue("add_scalar", 1.0), Epilogue("gelu_erf"),
                      Epilogue("add"), Epilogue("silu"), Epilogue("mul_scalar", 0.5))
    return {
        "A int4 r32": QuantizeSpec(ActQuant("int4", 64), 32, "bfloat16", k=k),
        "A uint4 r0": QuantizeSpec(ActQuant("uint4", 64, 0.171875), 0, "bfloat16", k=k),
        "A nvfp4 r32": QuantizeSpec(ActQuant("nvfp4", 16), 32, "bfloat16", k=k),
        "A int8 r32 fp16": QuantizeSpec(ActQuant("int8", 0), 32, "float16", k=k),
        "A int8 g64 r32": QuantizeSpec(ActQuant("int8", 64), 32, "bfloat16", k=k),
        "A uint8 g64 r16": QuantizeSpec(ActQuant("uint8", 64, 0.171875), 16, "bfloat16", k=k),
        "A uint8 r0 fp16": QuantizeSpec(ActQuant("uint8", 0, 0.171875), 0, "float16", k=k),
        "B int4 r32 bias": GemmSpec("int4", 64, 32, True, "bfloat16", k=k, n=n),
        "B int4 r0": GemmSpec("int4", 64, 0, False, "bfloat16", k=k, n=n),
        "B uint4 r32 epilogues": GemmSpec("uint4", 64, 32, True, "bfloat16", k=k, n=n, epilogue=every_epilogue),
        "B int4 r32 quantize-next uint4 r32": GemmSpec(
            "int4", 64, 32, True, "bfloat16", k=k, n=n, epilogue=(Epilogue("gelu_tanh"),),
            quantize_next=QuantizeNext(ActQuant("uint4", 64, 0.171875), 32)),
        "B int8 r32 bias": GemmSpec("int8", 0, 32, True, "bfloat16", k=k, n=n),
        "B int8 g64 r32 bias": GemmSpec("int8", 64, 32, True, "bfloat16", k=k, n=n),
        "B int8 g64 r32 quantize-next int8 g64": GemmSpec(
            "int8", 64, 32, True, "bfloat16", k=k, n=n, epilogue=(Epilogue("gelu_tanh"),),
            quantize_next=QuantizeNext(ActQuant("int8", 64), 32)),
        "B uint8 g64 r16 bias": GemmSpec("uint8", 64, 16, True, "bfloat16", k=k, n=n),
        "B uint8 r16 bias": GemmSpec("uint8", 0, 16, True, "bfloat16", k=k, n=n),
        "B int8 g64 r16 quantize-next uint8 g64 r16": GemmSpec(
            "int8", 64, 16, True, "bfloat16", k=k, n=n, epilogue=(Epilogue("gelu_tanh"),),
            quantize_next=QuantizeNext(ActQuant("uint8", 64, 0.171875), 16)),
        "B nvfp4 r32 bias": GemmSpec("nvfp4", 16, 32, True, "bfloat16", k=k, n=n),
        "B nvfp4 r32 quantize-next nvfp4": GemmSpec(
            "nvfp4", 16, 32, True, "bfloat16", k=k, n=n, epilogue=(Epilogue("mul"),),
            quantize_next=QuantizeNext(ActQuant("nvfp4", 16), 32, emit_output=True)),
        "W int4 r0 bias": WeightOnlySpec("int4", 64, 0, True, "bfloat16", k=k, n=18432),
        "W int4 r0 fp16": WeightOnlySpec("int4", 64, 0, False, "float16", k=k, n=n),
        "W nf4 r32 epilogues fp16": WeightOnlySpec("nf4", 64, 32, True, "float16", k=k, n=n,
                                                   epilogue=(Epilogue("silu"), Epilogue("mul"))),
    }


def template_arches(spec: KernelSpec) -> tuple[str, ...]:
    uses_nvfp4 = (isinstance(spec, GemmSpec) and spec.act == "nvfp4") or (
        isinstance(spec, QuantizeSpec) and spec.quant.fmt == "nvfp4")
    return NVFP4_ARCHES if uses_nvfp4 else INTEGER_ARCHES


def expected_tensor_op(spec: KernelSpec, arch: str) -> str | None:
    """A regular expression the hot loop's tensor-core opcodes must match (None: a loop without MMA is fine)."""
    if isinstance(spec, QuantizeSpec):
        return None  # memory-bound; its rank-r down projection is one small HMMA per step at most
    if isinstance(spec, WeightOnlySpec):
        return r"^H(G)?MMA\."
    if spec.act == "nvfp4":
        if arch == "sm_100":
            return r"^UTC[OQ]MMA"  # tcgen05.mma with block scales (kind::mxf4nvf4)
        if arch == "sm_120":
            return r"^OMMA\.SF\..*E2M1.*UE4M3"  # mma.sync block-scaled E2M1 × E2M1 with E4M3 scales
        return r"^H(G)?MMA\."
    return r"^IGMMA\..*S8" if arch == "sm_90" else r"^IMMA\..*S8"


@dataclass(frozen=True)
class GateCase:
    template: str
    spec: KernelSpec
    arch: str
    job: AotJob


# The default suite's subset: kernel B's main template under every configuration of each arch family, and one
# configuration of the other kinds of kernel (the full matrix is `gate_cases(full=True)`).
_DEFAULT_EVERY_CONFIG = ("B int4 r32 bias", ("sm_80", "sm_89", "sm_90"))
_DEFAULT_ONE_CONFIG = (("B int4 r32 bias", "sm_86"), ("B nvfp4 r32 bias", "sm_100"), ("B nvfp4 r32 bias", "sm_120"),
                       ("A int4 r32", "sm_90"), ("W int4 r0 bias", "sm_89"), ("W int4 r0 fp16", "sm_90"),
                       ("B int8 g64 r32 bias", "sm_80"),
                       ("B int8 g64 r32 bias", "sm_90"), ("A int8 g64 r32", "sm_90"),
                       ("B uint8 g64 r16 bias", "sm_90"))


def gate_cases(full: bool) -> list[GateCase]:
    """The compiles of the AOT gate: every template × arch × offered configuration, or the default subset."""
    templates = kernel_templates()
    if full:
        plan = [(name, arch, None) for name, spec in templates.items() for arch in template_arches(spec)]
    else:
        name, arches = _DEFAULT_EVERY_CONFIG
        plan = [(name, arch, None) for arch in arches] + [(name, arch, 1) for name, arch in _DEFAULT_ONE_CONFIG]
    cases = []
    for name, arch, limit in plan:
        spec, target = templates[name], Target("cuda", ARCHES[arch])
        for config in offered_configs(spec, target)[:limit]:
            cases.append(GateCase(name, spec, arch, spec_job(spec, target, config, label=f"{name} {config}")))
    return cases


# ---------------------------------------------------------------------------------------------------------
# Running the compiles


def _results_dir() -> Path:
    """`$SVDQ_AOT_CACHE`, else `aot` beside the kernel cache's default folder (results are keyed by source
    text and Triton version, so a folder shared across runs and checkouts never serves a stale one)."""
    explicit = os.environ.get("SVDQ_AOT_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "svdq_compiler" / "aot"


def compile_jobs(jobs: list[AotJob], workers: int = 2) -> list[AotResult]:
    """The result of every job, from the on-disk cache or compiled in a child process (`workers` at once)."""
    folder = _results_dir()
    unique = {job.key: job for job in jobs}
    missing = [job for key, job in unique.items() if not (folder / f"{key}.json").exists()]
    if missing:
        folder.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, stated so it does not warn
        payload = json.dumps({"workers": workers, "folder": str(folder), "jobs": [asdict(j) for j in missing]})
        done = subprocess.run([sys.executable, "-m", "svdq_compiler.codegen.aot"], input=payload, text=True,
                              capture_output=True, env=env)
        if done.returncode != 0:
            raise AotError(f"the ahead-of-time compiler process failed: {done.stderr.strip()[-2000:]}")
    return [AotResult(**json.loads((folder / f"{job.key}.json").read_text())) for job in jobs]


def _tool(name: str) -> str:
    import triton.backends.nvidia

    return str(Path(triton.backends.nvidia.__file__).parent / "bin" / name)


def ptxas_arches() -> frozenset[str]:
    """The sm_XY targets the ptxas binaries shipped with this Triton accept (ptxas, and ptxas-blackwell where
    the wheel has it); an arch outside the set cannot be compiled here and the gate skips it."""
    found: set[str] = set()
    for name in ("ptxas", "ptxas-blackwell"):
        if Path(_tool(name)).exists():
            listing = subprocess.run([_tool(name), "--help"], capture_output=True, text=True).stdout
            found |= set(re.findall(r"\b(sm_\d+)\b", listing))
    return frozenset(found)


def _compile_one(job: AotJob, folder: Path) -> None:
    """Compile in this (non-interpreting) process and write the result JSON atomically."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    result = AotResult(job.label, arch_name(job.capability), job.kernel, job.constexprs, job.num_warps,
                       job.num_stages, smem_limit=SMEM_LIMIT.get(tuple(job.capability), 0))
    try:
        source_path = folder / "src" / f"{job.key}.py"
        source_path.parent.mkdir(parents=True, exist_ok=True)
        source_path.write_text(job.source)
        module_spec = importlib.util.spec_from_file_location(f"svdq_aot_{job.key}", source_path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        fn = getattr(module, job.kernel)
        names = fn.arg_names
        types = {name: job.types[name] for name in names}
        constexprs = {(i,): job.constexprs[name] for i, name in enumerate(names) if types[name] == "constexpr"}
        # what a launch with 16-byte aligned pointers and sizes that are multiples of 16 specialises on
        attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(names) if types[name] != "constexpr"}
        major, minor = job.capability
        compiled = triton.compile(ASTSource(fn, types, constexprs, attrs),
                                  target=GPUTarget("cuda", major * 10 + minor, 32),
                                  options={"num_warps": job.num_warps, "num_stages": job.num_stages})
        result.shared_bytes = int(compiled.metadata.shared)
        with tempfile.TemporaryDirectory() as tmp:
            cubin = Path(tmp) / "kernel.cubin"
            cubin.write_bytes(compiled.asm["cubin"])
            usage = subprocess.run([_tool("cuobjdump"), "-res-usage", str(cubin)], capture_output=True, text=True,
                                   check=True).stdout
            sass = subprocess.run([_tool("cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True,
                                  check=True).stdout
        registers = re.search(r"REG:(\d+)", usage)
        stack = re.search(r"STACK:(\d+)", usage)
        result.registers = int(registers.group(1)) if registers else 0
        result.stack_bytes = int(stack.group(1)) if stack else 0
        instructions = parse_sass(sass)
        opcodes = Counter(base_opcode(text) for _, text in instructions)
        result.spill_stores, result.spill_loads = opcodes["STL"], opcodes["LDL"]
        result.instructions = len(instructions)
        result.hot_loop = hot_loop(instructions)
    except Exception as exc:  # a template that does not compile for this arch is a finding, not a crash
        result.error = f"{type(exc).__name__}: {str(exc).strip()[-1500:]}"
    tmp = folder / f".{job.key}.json.tmp{os.getpid()}"
    tmp.write_text(json.dumps(asdict(result)))
    os.replace(tmp, folder / f"{job.key}.json")


# ---------------------------------------------------------------------------------------------------------
# Reading SASS

_LINE = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")


def parse_sass(sass: str) -> list[tuple[int, str]]:
    """(address, instruction text without predicate noise) for each instruction of cuobjdump -sass output."""
    found = []
    for line in sass.splitlines():
        match = _LINE.match(line)
        if match:
            found.append((int(match.group(1), 16), match.group(2).strip()))
    return found


def base_opcode(text: str) -> str:
    """The opcode without predicate and modifiers: "@P0 IMMA.16832.S8.S8 R0, ..." → "IMMA"."""
    tokens = text.split()
    if tokens and tokens[0].startswith("@"):
        tokens = tokens[1:]
    return tokens[0].split(".")[0] if tokens else ""


def classify(opcode: str) -> str:
    """The instruction class of a base opcode, as the cost model counts it."""
    if opcode in TENSOR_OPCODES:
        return "tensor"
    if opcode == "PRMT":
        return "prmt"
    if opcode in ("LDL", "STL"):
        return "spill"
    if opcode in _LOADS:
        return "load"
    if opcode in _STORES:
        return "store"
    if opcode in _CONVERT:
        return "convert"
    if opcode in _FLOAT_PIPE or opcode.startswith("F") and opcode not in ("FLO",):
        return "float"
    if opcode == "IMAD" or opcode.startswith("IMAD"):
        return "imad"  # issued to the FMA pipe on sm_70 and newer
    if opcode.startswith("I") or opcode in _INT_EXTRA:
        return "int"
    if opcode.startswith("U"):
        return "uniform"
    return "other"


def hot_loop(instructions: list[tuple[int, str]]) -> dict:
    """The loop (backward branch) with the most tensor-core instructions (ties: the shortest); with none, the
    longest loop. Its length, instruction mix, tensor-core opcodes, and whether each MMA is waited for at once.

    A backward branch whose span holds the kernel's EXIT is not a loop: ptxas places the retry of a barrier wait
    after EXIT and jumps back from there to the instruction after the wait (sm_100's tcgen05 code), a span
    that covers the whole epilogue."""
    loops = []
    index_of = {address: i for i, (address, _) in enumerate(instructions)}
    exits = [i for i, (_, text) in enumerate(instructions) if base_opcode(text) == "EXIT"]
    for i, (address, text) in enumerate(instructions):
        # "BRA 0xa30", "@P0 BRA 0xa30", "BRA.U UP0, 0xd20" (sm_120 branches on a uniform predicate)
        match = re.search(r"\bBRA(?:\.\w+)*\s+(?:!?U?P\w+,\s*)?0x([0-9a-f]+)", text)
        if match and base_opcode(text) == "BRA":
            target = int(match.group(1), 16)
            if target < address and target in index_of and not any(index_of[target] <= e < i for e in exits):
                loops.append((index_of[target], i))
    if not loops:
        return {}

    def tensor_count(loop):
        return sum(1 for _, t in instructions[loop[0]:loop[1] + 1] if base_opcode(t) in TENSOR_OPCODES)

    with_mma = [loop for loop in loops if tensor_count(loop)]
    if with_mma:
        start, end = max(with_mma, key=lambda loop: (tensor_count(loop), -(loop[1] - loop[0])))
    else:
        start, end = max(loops, key=lambda loop: loop[1] - loop[0])
    body = [text for _, text in instructions[start:end + 1]]
    mix = Counter(classify(base_opcode(text)) for text in body)
    tensor_ops = Counter(text.split()[1 if text.startswith("@") else 0] for text in body
                         if base_opcode(text) in TENSOR_OPCODES)
    waits = sum(1 for text in body if text.startswith("WARPGROUP.DEPBAR.LE") and text.rstrip().endswith("0x0"))
    return {"length": len(body), "mix": dict(sorted(mix.items())), "tensor_ops": dict(tensor_ops),
            "serialized_waits": waits, "text": "\n".join(body)}


def _main() -> None:
    from concurrent.futures import ProcessPoolExecutor

    payload = json.loads(sys.stdin.read())
    folder = Path(payload["folder"])
    jobs = [AotJob(**{**job, "capability": tuple(job["capability"])}) for job in payload["jobs"]]
    with ProcessPoolExecutor(max_workers=max(1, payload["workers"])) as pool:
        list(pool.map(_compile_one, jobs, [folder] * len(jobs)))


if __name__ == "__main__":
    _main()
