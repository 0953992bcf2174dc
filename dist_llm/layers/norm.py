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

    def deferred(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> DeferredRMSNorm:
        """This norm of (x + residual), left to the layer that consumes it (see DeferredRMSNorm)."""
        return DeferredRMSNorm(self, x, residual)


class DeferredRMSNorm:
    """The input of a linear layer that is still to be RMS-normalised: `norm(x, residual)`, not yet run.

    A consumer that can fold the norm into its own kernel (the decode GEMV: `linear.dense_linear`) takes
    `gemv_kwargs()`; any other calls `materialize()`, which runs the norm kernel as `RMSNorm.forward` does.
    Either way, once consumed, `residual` is the new residual stream (x + residual, or x when there was
    none), which the model passes on. Consume it exactly once.
    """

    def __init__(self, norm: RMSNorm, x: torch.Tensor, residual: torch.Tensor | None):
        self.norm, self.x, self._residual_in = norm, x, residual
        self._residual: torch.Tensor | None = None

    @property
    def residual(self) -> torch.Tensor:
        assert self._residual is not None, "the deferred norm has not been consumed by a layer yet"
        return self._residual

    def materialize(self) -> torch.Tensor:
        assert self._residual is None, "a deferred norm is consumed once"
        out, self._residual = self.norm(self.x, self._residual_in)
        return out

    def gemv_kwargs(self) -> dict:
        """The RMSNorm prologue of `kernels.gemv.gemv`: the kernel writes the new residual stream."""
        assert self._residual is None, "a deferred norm is consumed once"
        kw = {"norm_weight": self.norm.weight, "eps": self.norm.eps}
        if self._residual_in is None:
            self._residual = self.x
        else:
            self._residual = torch.empty_like(self._residual_in)
            kw.update(residual=self._residual_in, residual_out=self._residual)
        return kw
