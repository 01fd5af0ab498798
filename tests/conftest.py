"""Session-wide test settings."""

import torch

# `make test` runs two pytest workers on a 2-core machine: one intra-op thread each avoids oversubscription,
# which makes small LAPACK calls (QR, SVD) up to 100× slower.
torch.set_num_threads(1)
