"""The compute dtype of the functional core: float64 stays float64, everything else computes in float32."""

import torch
from torch import Tensor

__all__ = ["compute_dtype"]


def compute_dtype(t: Tensor) -> torch.dtype:
    """``torch.float64`` for float64 inputs, else ``torch.float32`` (low-precision weights are upcast)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32
