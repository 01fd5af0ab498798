"""Graph passes, one per file. Importing this package registers every pass in svdq_compiler.pipeline."""

from svdq_compiler.passes import (annotate_linears, calibrate, calibrate_blocks, compress, fuse,  # noqa: F401
                                  lower, lowrank, propagate_block, quantize_weights, smooth, smooth_weight_only,
                                  verify)
