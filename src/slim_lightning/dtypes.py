"""The floating dtypes a model, an adapter or a stored tensor may have, by their config names."""

from __future__ import annotations

import torch

FLOAT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
