"""Tensor-parallel linear layers (the Megatron/vLLM family, with their canonical names).

Weights are stored [out_features_local, in_features_local] and applied as Y = X Wᵀ. The quantization
method is a strategy object on the layer (`create_weights` / `apply(layer, x, bias, act=None)`), so a
quantized layer is the same class with another method, not a branch; `act` is only ever passed where
`takes_gemv` holds.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dist_llm.layers.norm import DeferredNorm, RMSNorm
from dist_llm.parallel import comm


def takes_gemv(layer: nn.Module, x: torch.Tensor | DeferredNorm) -> bool:
    """Whether `layer` runs X through the decode GEMV kernel: the worker gave it one (`layer.gemv`, set on
    the GPU with the Triton backend, unquantized weights) and X has at most `GEMV_MAX_M` rows."""
    if isinstance(x, DeferredNorm):
        x = x.hw
    return layer.gemv is not None and x.dim() == 2 and x.shape[0] <= GEMV_MAX_M and x.stride(-1) == 1


def dense_linear(
    layer: nn.Module, x: torch.Tensor | DeferredNorm, weight: torch.Tensor, bias: torch.Tensor | None,
    act: str | None = None,
) -> torch.Tensor:  # fmt: skip
    """Y = X Wᵀ (+ b): F.linear, or the decode GEMV kernel where `takes_gemv(layer, x)`. With act
    ("silu_and_mul") X is [gate | up] and only the GEMV path can take it: callers check `takes_gemv`.
    A `DeferredNorm` X is normed inside the GEMV (`gemv(..., norm=)`), or materialized first."""
    if isinstance(x, DeferredNorm):
        if act is None and takes_gemv(layer, x):
            return layer.gemv(x.hw, weight, bias, norm=(x.partials, x.eps))
        x = x.materialize()
    if takes_gemv(layer, x):
        return layer.gemv(x, weight, bias, act=act)
    assert act is None, f"act={act!r} needs the decode GEMV (takes_gemv)"
    return F.linear(x, weight, bias)


GEMV_MAX_M = 1  # measured (H200): 1.0-1.2x cuBLAS at one row, 0.5-0.9x at two to four


class UnquantizedLinearMethod:
    def create_weights(self, layer: nn.Module, in_features: int, out_features: int, dtype: torch.dtype):
        layer.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype), requires_grad=False)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None, act: str | None = None):
        return dense_linear(layer, x, layer.weight, bias, act)


class LinearBase(nn.Module):
    gemv = None  # the small-batch kernel, set by the worker where it is faster than cuBLAS
    # RowParallelLinear at tp = 1: the GEMV with the residual add and the next norm's inputs in its epilogue
    # (`kernels/gemv_norm.gemv_add_norm`), set by the worker with `gemv`; None: the fold is off
    gemv_add_norm = None

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, quant_method=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.quant_method = quant_method or UnquantizedLinearMethod()
        self.quant_method.create_weights(self, in_features, out_features, dtype)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False) if bias else None

    def unfold(self, x: torch.Tensor | DeferredNorm) -> torch.Tensor | DeferredNorm:
        """x as this layer's method can take it: a quantized method gets a `DeferredNorm` materialized."""
        if isinstance(x, DeferredNorm) and not isinstance(self.quant_method, UnquantizedLinearMethod):
            return x.materialize()
        return x


class ColumnParallelLinear(LinearBase):
    """Y = X A with A = [A_1, …, A_p] split by columns: rank r computes Y_r = X A_r, no communication.

    `output_size` is the global size; each rank holds output_size / tp of it.
    """

    def __init__(self, input_size: int, output_size: int, bias: bool, dtype: torch.dtype, quant_method=None):
        tp = comm.tp_size()
        if output_size % tp:
            raise ValueError(f"output size {output_size} is not divisible by tp_size {tp}")
        super().__init__(input_size, output_size // tp, bias, dtype, quant_method)

    def forward(self, x: torch.Tensor | DeferredNorm) -> torch.Tensor:
        return self.quant_method.apply(self, self.unfold(x), self.bias)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs in one matmul (gate and up): rank r holds [A_gate,r ; A_up,r]."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool, dtype: torch.dtype, quant_method=None):
        self.output_sizes = output_sizes
        super().__init__(input_size, sum(output_sizes), bias, dtype, quant_method)


class QKVParallelLinear(LinearBase):
    """Fused q, k, v projections, split by heads: rank r holds [W_q,r ; W_k,r ; W_v,r].

    When tp_size exceeds num_kv_heads, each rank holds one KV head and ranks share it
    (tp_size / num_kv_heads ranks per head), as vLLM and TensorRT-LLM do.
    """

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool,
                 dtype: torch.dtype, quant_method=None):
        tp = comm.tp_size()
        self.num_heads = num_heads // tp
        self.num_kv_heads = max(1, num_kv_heads // tp)
        self.head_dim = head_dim
        out = (self.num_heads + 2 * self.num_kv_heads) * head_dim
        super().__init__(hidden_size, out, bias, dtype, quant_method)

    def forward(self, x: torch.Tensor | DeferredNorm) -> torch.Tensor:
        return self.quant_method.apply(self, self.unfold(x), self.bias)


class RowParallelLinear(LinearBase):
    """Y = X A with A = [A_1; …; A_p] split by rows and X = [X_1, …, X_p] split by columns:
    Y = Σ_r X_r A_r. Each rank computes its term, then an all-reduce sums them; the bias is added once,
    after the reduction.

    With reduce_results=False (no bias then) the layer returns this rank's term and the caller owes the
    sum: an RMSNorm with reduce=True, which fuses the all-reduce with the residual add and the norm.
    """

    def __init__(self, input_size: int, output_size: int, bias: bool, dtype: torch.dtype, quant_method=None,
                 reduce_results: bool = True):  # fmt: skip
        tp = comm.tp_size()
        if input_size % tp:
            raise ValueError(f"input size {input_size} is not divisible by tp_size {tp}")
        if bias and not reduce_results:
            raise ValueError("a RowParallelLinear with a bias must reduce its results (the bias goes on the sum)")
        super().__init__(input_size // tp, output_size, bias, dtype, quant_method)
        self.reduce_results = reduce_results

    def forward(self, x: torch.Tensor, act: str | None = None) -> torch.Tensor:
        """act="silu_and_mul": x is [gate | up] and the activation runs in the GEMV (where `takes_gemv`)."""
        y = self.quant_method.apply(self, x, None, act)
        if not self.reduce_results:
            return y
        y = comm.tp_all_reduce(y)
        return y if self.bias is None else y + self.bias

    def add_norm(self, x: torch.Tensor, residual: torch.Tensor | None, norm: RMSNorm | None,
                 act: str | None = None) -> DeferredNorm | None:  # fmt: skip
        """`norm(self(x, act), residual)` with the norm deferred to the next GEMV (`kernels/gemv_norm.py`):
        the residual is updated in place and a `DeferredNorm` returned. None, with nothing done, where the
        fold cannot run: no producer given (`gemv_add_norm`), tp > 1 (the sum owed is the all-reduce's), a
        bias, a quantized method, more than one token, or operands it does not take."""
        if self.gemv_add_norm is None or norm is None or residual is None or comm.tp_size() != 1:
            return None
        if self.bias is not None or not isinstance(self.quant_method, UnquantizedLinearMethod):
            return None
        if not takes_gemv(self, x):
            return None
        from dist_llm.kernels.gemv_norm import gemv_add_norm_supported  # one token, operands it takes

        if not gemv_add_norm_supported(x, self.weight, residual, norm.weight, act):
            return None
        hw, partials = self.gemv_add_norm(x, self.weight, residual, norm.weight, act=act)
        return DeferredNorm(hw=hw, partials=partials, residual=residual, norm=norm)
