"""Graph passes, one per file. Importing this package registers every pass in svdq_compiler.pipeline."""

from svdq_compiler.passes import (annotate_linears, calibrate, compress, fuse, lower, lowrank,  # noqa: F401
                                  quantize_weights, smooth, smooth_weight_only, verify)
