"""RMSNorm and the fused residual-add + RMSNorm, one program per row.

Rounding mirrors `reference.py` (and HF): the row is normalised in fp32, rounded to the input dtype,
then multiplied by the weight in the promoted dtype of (input, weight), and finally stored in the
output dtype. `fused_add_rms_norm` reads `x` and `residual` once and writes both once; the norm uses
the residual *after* it is rounded to its dtype, exactly like the reference.

Rows up to `_MAX_FUSED_BLOCK` elements are kept in registers (one read, one write). Longer rows loop
over chunks: a first pass for the sum of squares, a second pass (re-reading from L2) to normalise.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dist_llm.kernels._pdl import pdl_launch_kwargs, pdl_wait
from dist_llm.kernels._rounding import round_to

_MAX_FUSED_BLOCK = 16384  # widest row held in registers; longer rows take the two-pass loop
_LOOP_BLOCK = 4096


@triton.jit
def _scale_and_store(v, rstd, w_ptr, out_row, offs, mask, norm_dtype: tl.constexpr, ROUND_TO_NORM: tl.constexpr):
    """HF's rounding: (v * rstd) rounded to norm_dtype, times the weight (rounded again to norm_dtype when
    that is the promoted dtype), stored in the output dtype."""
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = round_to(v * rstd, norm_dtype).to(tl.float32) * w
    if ROUND_TO_NORM:
        y = round_to(y, norm_dtype)
    tl.store(out_row + offs, round_to(y, out_row.dtype.element_ty), mask=mask)


@triton.jit
def _add_rms_norm_row(x, res_row, out_row, w_ptr, offs, mask, N, eps, ROUND_TO_RES: tl.constexpr):
    """One row held in registers: res_row <- x (fp32) + res_row, rounded to its dtype; out_row <- the
    normalised residual times the weight. Also the epilogue of the fused all-reduce + norm
    (`lamport_all_reduce.lamport_all_reduce_rms_norm`), so both round alike."""
    res_dtype = res_row.dtype.element_ty
    r = tl.load(res_row + offs, mask=mask, other=0.0).to(tl.float32)
    r = round_to(x + r, res_dtype)
    tl.store(res_row + offs, r, mask=mask)
    r = r.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(r * r, axis=0) / N + eps)
    _scale_and_store(r, rstd, w_ptr, out_row, offs, mask, res_dtype, ROUND_TO_RES)


@triton.jit
def _rms_norm_kernel(
    x_ptr, w_ptr, out_ptr,
    stride_x0, stride_out0,
    N, eps,
    ROUND_TO_X: tl.constexpr,  # (x.dtype, w.dtype) promote to x.dtype: round the product to it
    BLOCK: tl.constexpr,
    ONE_PASS: tl.constexpr,
    USE_PDL: tl.constexpr,
):  # fmt: skip
    pdl_wait(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x0
    out_row = out_ptr + row * stride_out0
    x_dtype = x_ptr.dtype.element_ty
    if ONE_PASS:
        offs = tl.arange(0, BLOCK)
        mask = offs < N
        x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, axis=0) / N + eps)
        _scale_and_store(x, rstd, w_ptr, out_row, offs, mask, x_dtype, ROUND_TO_X)
    else:
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, N, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            x = tl.load(x_row + offs, mask=offs < N, other=0.0).to(tl.float32)
            acc += x * x
        rstd = tl.rsqrt(tl.sum(acc, axis=0) / N + eps)
        for start in range(0, N, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < N
            x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
            _scale_and_store(x, rstd, w_ptr, out_row, offs, mask, x_dtype, ROUND_TO_X)


@triton.jit
def _fused_add_rms_norm_kernel(
    x_ptr, res_ptr, w_ptr,
    stride_x0, stride_res0,
    N, eps,
    ROUND_TO_RES: tl.constexpr,  # (residual.dtype, w.dtype) promote to residual.dtype
    BLOCK: tl.constexpr,
    ONE_PASS: tl.constexpr,
    USE_PDL: tl.constexpr,
):  # fmt: skip
    pdl_wait(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x0
    res_row = res_ptr + row * stride_res0
    res_dtype = res_ptr.dtype.element_ty
    if ONE_PASS:
        offs = tl.arange(0, BLOCK)
        mask = offs < N
        x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
        _add_rms_norm_row(x, res_row, x_row, w_ptr, offs, mask, N, eps, ROUND_TO_RES)
    else:
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, N, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < N
            x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
            r = tl.load(res_row + offs, mask=mask, other=0.0).to(tl.float32)
            r = round_to(x + r, res_dtype)
            tl.store(res_row + offs, r, mask=mask)
            r = r.to(tl.float32)
            acc += r * r
        rstd = tl.rsqrt(tl.sum(acc, axis=0) / N + eps)
        tl.debug_barrier()  # the second pass re-reads the residual this program just wrote
        for start in range(0, N, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < N
            r = tl.load(res_row + offs, mask=mask, other=0.0).to(tl.float32)
            _scale_and_store(r, rstd, w_ptr, x_row, offs, mask, res_dtype, ROUND_TO_RES)


def _launch_config(n: int) -> tuple[int, bool, int]:
    """(BLOCK, ONE_PASS, num_warps) for a row of n elements."""
    block = triton.next_power_of_2(n)
    one_pass = block <= _MAX_FUSED_BLOCK
    if not one_pass:
        block = _LOOP_BLOCK
    # 8 warps up to 8K-wide rows (measured best on H200 at N = 4096..8192), 16 for wider register rows
    num_warps = 16 if block >= 16384 else min(max(block // 512, 1), 8)
    return block, one_pass, num_warps


def _check_row_major(name: str, t: torch.Tensor, n: int) -> None:
    assert t.dim() == 2 and t.shape[1] == n, f"{name} must be [T, {n}], got {tuple(t.shape)}"
    assert t.stride(1) == 1 or n == 1, f"{name} must be contiguous in its last dim, strides {t.stride()}"


def _check_weight(weight: torch.Tensor, x: torch.Tensor, n: int) -> None:
    assert weight.shape == (n,) and weight.stride(0) == 1, f"weight must be contiguous [{n}]"
    assert weight.device == x.device
    assert x.dtype.is_floating_point and weight.dtype.is_floating_point


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None):
    """out = weight * (x_fp32 * rsqrt(mean(x^2) + eps)).to(x.dtype); x [T, N], any row stride."""
    n = x.shape[-1]
    _check_row_major("x", x, n)
    _check_weight(weight, x, n)
    prod_dtype = torch.promote_types(x.dtype, weight.dtype)
    if out is None:
        out = torch.empty(x.shape, dtype=prod_dtype, device=x.device)
    _check_row_major("out", out, n)
    assert out.shape == x.shape and out.device == x.device
    if x.shape[0] == 0:
        return out
    block, one_pass, num_warps = _launch_config(n)
    _rms_norm_kernel[(x.shape[0],)](
        x, weight, out,
        x.stride(0), out.stride(0),
        n, eps,
        ROUND_TO_X=prod_dtype == x.dtype, BLOCK=block, ONE_PASS=one_pass, num_warps=num_warps,
        **pdl_launch_kwargs(x.device),
    )  # fmt: skip
    return out


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    """In place: residual <- (x + residual) in residual.dtype; x <- rms_norm(residual) * weight."""
    n = x.shape[-1]
    _check_row_major("x", x, n)
    _check_row_major("residual", residual, n)
    _check_weight(weight, x, n)
    assert residual.shape == x.shape and residual.device == x.device
    if x.shape[0] == 0:
        return
    block, one_pass, num_warps = _launch_config(n)
    _fused_add_rms_norm_kernel[(x.shape[0],)](
        x, residual, weight,
        x.stride(0), residual.stride(0),
        n, eps,
        ROUND_TO_RES=torch.promote_types(residual.dtype, weight.dtype) == residual.dtype,
        BLOCK=block, ONE_PASS=one_pass, num_warps=num_warps, **pdl_launch_kwargs(x.device),
    )  # fmt: skip
