"""Triton kernel generation from fused-op specs, the kernel cache, and the packed layouts."""

import os

if os.environ.get("TRITON_INTERPRET") == "1":
    # Before any kernel is interpreted: the kernels' exact divisions need an fma that rounds once, as on a GPU.
    from svdq_compiler.codegen.interpreter_fma import use_fused_fma

    use_fused_fma()
