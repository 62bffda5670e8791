"""Constants shared across subpackages (one definition each, so no module copies another's to dodge an import)."""

from __future__ import annotations

import torch

# The label of a position that carries no loss (PyTorch's cross_entropy ignore_index default): document starts,
# masked chat tokens, padding, and the last position of a row once labels are shifted.
IGNORE_INDEX = -100

# dtype names accepted in configs and on command lines -> torch dtypes.
DTYPES: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
