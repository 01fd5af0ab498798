"""Graph passes, one per file. Importing this package registers every pass in svdq_compiler.pipeline."""

from svdq_compiler.passes import fuse, verify  # noqa: F401
