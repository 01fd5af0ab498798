"""Triton kernel generation from fused-op specs, the kernel cache, and the packed layouts."""
