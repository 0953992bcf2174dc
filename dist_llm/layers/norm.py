from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dist_llm.parallel import comm


class RMSNorm(nn.Module):
    """RMSNorm; with `residual`, the residual add is fused in: returns (normed, new residual).

    reduce=True: x is this tp rank's term of a row-parallel projection (`reduce_results=False`); it is
    summed over the tp group first, in the same kernel as the add and the norm where the group's one-shot
    all-reduce can take it (decode sizes), else by a separate all-reduce. Every tp rank gets the same bits.
    """

    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype, ops):
        super().__init__()
        self.eps, self.ops = eps, ops
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, reduce: bool = False):
        if reduce:
            if residual is not None and comm.tp_all_reduce_add_rms_norm(x, residual, self.weight, self.eps):
                return x, residual
            x = comm.tp_all_reduce(x)
        if residual is None:
            return self.ops.rms_norm(x, self.weight, self.eps), x
        self.ops.fused_add_rms_norm(x, residual, self.weight, self.eps)
        return x, residual


@dataclass
class DeferredNorm:
    """An RMSNorm's output that was never written (`kernels/gemv_norm.py`): the producer GEMV (o or down, one
    token, tp = 1) left hw = residual * norm.weight and per-program sums of squares of the residual
    (`partials`); the consumer GEMV (qkv, gate_up, LM head) applies 1 / rms to its dot products. A layer that
    cannot take it calls `materialize()` for the normed tensor itself."""

    hw: torch.Tensor
    partials: torch.Tensor
    residual: torch.Tensor
    norm: RMSNorm

    @property
    def shape(self) -> torch.Size:
        return self.hw.shape

    @property
    def eps(self) -> float:
        return self.norm.eps

    def materialize(self) -> torch.Tensor:
        return self.norm.ops.rms_norm(self.residual, self.norm.weight, self.norm.eps)
