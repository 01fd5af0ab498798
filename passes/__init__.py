"""Graph passes, one per file. Importing this package registers every pass in svdq_compiler.pipeline."""

from svdq_compiler.passes import (annotate_linears, calibrate, fuse, lower, lowrank, quantize_weights,  # noqa: F401
                                  smooth, verify)
