"""The residual add and RMSNorm folded into the decode GEMVs around them (one token, tp = 1): no norm kernel.

At batch 1 a layer's two `fused_add_rms_norm` launches do little work, but each sits between two GEMVs in a
chain of dependent kernels: the norm cannot start before the o (or down) projection's last program is done,
and the next projection cannot start before the norm is. Each hop costs ~2 us of latency (H200, with PDL);
removing the 64 norms of a Llama-2-7B step entirely measured 121 us a step (fifth session). Here the norm's
work moves into the epilogues of the GEMVs on either side, so o -> gate_up and down -> next qkv (or the LM
head) are direct hops:

  producer  `gemv_add_norm` (o, down): y = round(x @ Wᵀ) as the plain GEMV stores it; h = round(y + residual),
            written back to the residual (the add of `fused_add_rms_norm`, bit for bit); hw = round(h * w),
            w the next RMSNorm's weight; and per program the fp32 sum of squares of its rows of h.
  consumer  `gemv(hw, W, bias, norm=(partials, eps))` (qkv, gate_up, LM head): every program loads the
            producer's partials after its PDL wait, sums them after its K loop in one fixed-order tree
            (deterministic) and scales its dot products by rsqrt(sum / K + eps) before the bias. (Summed before
            the loop, the first chunk waited for them: 203.2 against 203.9 tok/s, H100, same machine.)

Since W (h * w * r) = r * (W (h * w)) for the scalar r = 1 / rms(h), this is the norm. The rounding differs
from HF's (which rounds h * r to the dtype, then the product with w): here h * w is rounded once and r is
applied to the fp32 sums, a little closer to exact; so at 16 bits outputs differ in the last bits from the
unfolded path, like any change of summation order. Where an epilogue would cost a program an SM, the launch caps
its registers (`gemv._FOLD_MAX_REGISTERS`). It is used at one token only, and for eager steps and
graphs alike, so that graphs still equal eager token for token.

The torch twins are `reference.gemv_add_norm_ref` and `reference.gemv_normed_ref`; `layers/norm.DeferredNorm`
carries (hw, partials) from producer to consumer. DIST_LLM_GEMV_NORM=0 turns the fold off (the worker then
gives the layers no producer) for A/B timing.
"""

from __future__ import annotations

import os

import torch
import triton

from dist_llm.kernels import gemv as _gemv

FOLD_NORM = os.environ.get("DIST_LLM_GEMV_NORM", "1") != "0"


def gemv_add_norm_supported(
    x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, act: str | None = None
) -> bool:
    """Whether `gemv_add_norm` takes these: one token row (`gemv_supported(x, weight, act)` with x [1, ...]),
    residual [1, N] contiguous in x's dtype, norm_weight [N] contiguous of a float dtype, all on x's device."""
    n = weight.shape[0] if weight.dim() == 2 else -1
    return (
        _gemv.gemv_supported(x, weight, act)
        and x.shape[0] == 1
        and residual.shape == (1, n)
        and residual.stride(1) == 1
        and residual.dtype == x.dtype
        and norm_weight.shape == (n,)
        and norm_weight.stride(0) == 1
        and norm_weight.dtype.is_floating_point
        and residual.device == norm_weight.device == x.device
    )


def gemv_add_norm(
    x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, act: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """residual [1, N] <- round(round(x @ weightᵀ) + residual), in place; returns (hw, partials): hw [1, N] =
    round(residual * norm_weight) in x's dtype, and partials [P] fp32, P = the launch's program count, whose
    sum is the new residual's sum of squares. `act` as in `gemv`. Allocates hw and partials in the current
    stream's pool, so the call can be captured in a CUDA graph."""
    assert gemv_add_norm_supported(x, weight, residual, norm_weight, act), (
        f"gemv_add_norm cannot take x {tuple(x.shape)} {x.dtype} on {x.device}, weight {tuple(weight.shape)} "
        f"{weight.dtype}, residual {tuple(residual.shape)} {residual.dtype} strides {residual.stride()}, "
        f"norm_weight {tuple(norm_weight.shape)} {norm_weight.dtype} (see gemv_add_norm_supported)"
    )
    n, k = weight.shape
    block_n = _gemv.launch_config(x, n, k)[0]  # the launch's: one partial a program
    hw = torch.empty_like(residual)
    partials = torch.empty(triton.cdiv(n, block_n), dtype=torch.float32, device=x.device)
    _gemv.launch(
        x, weight, None, hw, act,  # hw stands in for out: the ADD_NORM epilogue stores hw, never y
        ADD_NORM=True, res_ptr=residual, nw_ptr=norm_weight, hw_ptr=hw, part_out_ptr=partials,
    )  # fmt: skip
    return hw, partials
