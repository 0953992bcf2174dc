"""SiLU-and-mul: x [T, 2I] = [gate | up] -> silu(gate) * up, one read of x and one write of out.

Rounding mirrors `reference.py`: silu in fp32, rounded to x.dtype, then the product in x.dtype.
Grid: (token, column block).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dist_llm.kernels._pdl import pdl_launch_kwargs, pdl_wait
from dist_llm.kernels._rounding import round_to


@triton.jit
def _silu_and_mul_kernel(
    x_ptr, out_ptr,
    stride_x0, stride_out0,
    inter,
    BLOCK: tl.constexpr,
    USE_PDL: tl.constexpr,
):  # fmt: skip
    pdl_wait(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    x_row = x_ptr + row * stride_x0
    x_dtype = x_ptr.dtype.element_ty
    gate = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_row + inter + cols, mask=mask, other=0.0).to(tl.float32)
    act = round_to(gate / (1.0 + tl.exp(-gate)), x_dtype).to(tl.float32)
    y = round_to(act * up, x_dtype)
    tl.store(out_ptr + row * stride_out0 + cols, round_to(y, out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, 2I] (any row stride, last dim contiguous) -> out [T, I]."""
    assert x.dim() == 2 and x.shape[1] % 2 == 0, f"x must be [T, 2I], got {tuple(x.shape)}"
    assert x.stride(1) == 1, "x must be contiguous in its last dim"
    num_tokens, inter = x.shape[0], x.shape[1] // 2
    if out is None:
        out = torch.empty((num_tokens, inter), dtype=x.dtype, device=x.device)
    assert out.shape == (num_tokens, inter) and out.stride(1) == 1 and out.device == x.device
    if num_tokens == 0 or inter == 0:
        return out
    block = min(triton.next_power_of_2(inter), 2048)
    num_warps = min(max(block // 256, 1), 8)
    _silu_and_mul_kernel[(num_tokens, triton.cdiv(inter, block))](
        x, out,
        x.stride(0), out.stride(0),
        inter,
        BLOCK=block, num_warps=num_warps, **pdl_launch_kwargs(x.device),
    )  # fmt: skip
    return out
