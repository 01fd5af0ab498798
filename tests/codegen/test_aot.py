"""The AOT gate: generated kernels compiled with Triton's real compiler for sm_80 … sm_120, without a GPU.

Every configuration the launcher may time on an arch family must compile, spill nothing and fit the arch's
shared memory, and the hot loop must hold the arch's tensor-core instruction. Compiles are cached on disk by
source text, arch, options and Triton version (`codegen.aot`), so a rerun with nothing changed is quick; the
full matrix (every template) is marked slow and is also what tools/kernel_model.py compiles.
"""

import warnings

import pytest

from svdq_compiler.codegen.aot import GateCase, compile_jobs, expected_tensor_op, gate_cases, ptxas_arches

pytest.importorskip("triton.backends.nvidia")

# Templates of the full matrix that fail the gate today, and why (the test fails when one starts passing).
KNOWN_FAILURES: dict[str, str] = {}


def _check(case: GateCase, result, filecheck) -> None:
    where = f"{case.job.label} on {case.arch}"
    assert result.error is None, f"{where} does not compile: {result.error}"
    assert not result.spills, (f"{where} spills ({result.spill_stores} local stores, {result.spill_loads} local "
                               f"loads, {result.registers} registers): remove it from configs.py for this arch")
    assert result.fits, f"{where} needs {result.shared_bytes} B of shared memory, the arch has {result.smem_limit}"
    loop = result.hot_loop.get("text", "")
    expected = expected_tensor_op(case.spec, case.arch)
    if expected is not None:
        filecheck(loop, f"CHECK: {{{{{expected.lstrip('^')}}}}}\nCHECK-NOT: {{{{^(STL|LDL)}}}}\n")


def _run(full: bool, filecheck) -> None:
    supported = ptxas_arches()
    cases = [case for case in gate_cases(full) if case.arch in supported]
    missing = sorted({case.arch for case in gate_cases(full)} - supported)
    if missing:  # an older Triton's ptxas: say so rather than fail on what this machine cannot compile
        warnings.warn(f"this Triton's ptxas cannot compile for {', '.join(missing)}: not gated here")
    results = compile_jobs([case.job for case in cases])
    failures, known = [], set()
    for case, result in zip(cases, results):
        try:
            _check(case, result, filecheck)
        except AssertionError as exc:
            if case.template in KNOWN_FAILURES:
                known.add(case.template)
            else:
                failures.append(str(exc).splitlines()[0])
    fixed = sorted(set(KNOWN_FAILURES) & {case.template for case in cases} - known)
    assert not fixed, f"{fixed} now pass the gate: remove them from KNOWN_FAILURES"
    assert not failures, f"{len(failures)} of {len(cases)} compiles fail the gate:\n" + "\n".join(failures)


def test_default_kernels_compile_for_every_arch_without_spills(filecheck):
    _run(False, filecheck)


@pytest.mark.slow
def test_every_template_compiles_for_every_arch_without_spills(filecheck):
    _run(True, filecheck)


def test_the_hot_loop_is_the_loop_with_the_tensor_core_instructions():
    from svdq_compiler.codegen.aot import hot_loop, parse_sass

    sass = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   IADD3 R2, R2, 0x1, RZ ;
        /*0020*/                   ISETP.GE.AND P0, PT, R2, 0x4, PT ;
        /*0030*/               @!P0 BRA 0x10 ;
        /*0040*/                   LDG.E R4, desc[UR4][R2.64] ;
        /*0050*/                   PRMT R5, R4, 0x7710, RZ ;
        /*0060*/                   IMMA.16832.S8.S8 R8, R4, R6, R8 ;
        /*0070*/                   STL [R1], R8 ;
        /*0080*/               @P0 BRA 0x40 ;
        /*0090*/                   EXIT ;
    """
    loop = hot_loop(parse_sass(sass))
    assert loop["length"] == 5 and loop["tensor_ops"] == {"IMMA.16832.S8.S8": 1}
    assert loop["mix"] == {"load": 1, "other": 1, "prmt": 1, "spill": 1, "tensor": 1}
    # sm_120 closes loops with a branch on a uniform predicate
    uniform = hot_loop(parse_sass(sass.replace("@P0 BRA 0x40", "BRA.U UP0, 0x40")))
    assert uniform["length"] == 5 and uniform["tensor_ops"] == {"IMMA.16832.S8.S8": 1}


def test_a_branch_back_from_past_exit_is_not_the_hot_loop():
    """ptxas puts the retry of a barrier wait after EXIT and jumps back to the instruction after the wait; that
    span covers the epilogue's MMAs and must not be taken for the main loop."""
    from svdq_compiler.codegen.aot import hot_loop, parse_sass

    sass = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   UTCOMMA.4X gdesc[UR4], gdesc[UR6], tmem[UR8] ;
        /*0020*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR9], R2 ;
        /*0030*/               @!P0 BRA 0x90 ;
        /*0040*/               @P1 BRA 0x10 ;
        /*0050*/                   UTCHMMA gdesc[UR4], gdesc[UR6], tmem[UR8] ;
        /*0060*/                   UTCHMMA gdesc[UR4], gdesc[UR6], tmem[UR8] ;
        /*0070*/                   STG.E desc[UR4][R2.64], R4 ;
        /*0080*/                   EXIT ;
        /*0090*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR9], R2 ;
        /*00a0*/               @!P0 BRA 0x90 ;
        /*00b0*/                   BRA 0x40 ;
    """
    loop = hot_loop(parse_sass(sass))
    assert loop["tensor_ops"] == {"UTCOMMA.4X": 1} and loop["length"] == 4
