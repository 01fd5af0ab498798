"""Session-wide test settings."""

import os

import torch

# Without a GPU the generated Triton kernels run under the interpreter, which Triton only honours when the
# variable is set before it is imported (`make test` sets it too).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
