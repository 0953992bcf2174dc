from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """RMSNorm; with `residual`, the residual add is fused in: returns (normed, new residual)."""

    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype, ops):
        super().__init__()
        self.eps, self.ops = eps, ops
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is None:
            return self.ops.rms_norm(x, self.weight, self.eps), x
        self.ops.fused_add_rms_norm(x, residual, self.weight, self.eps)
        return x, residual
