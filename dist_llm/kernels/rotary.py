"""Rotary position embedding, in place on q and k in one launch.

Grid: (token, head block). The first `cdiv(Hq, BLOCK_H)` head blocks of a token rotate q, the rest
rotate k, so one launch covers both even when they are strided views of the fused qkv output. Each
program loads its token's cos/sin row once and rotates a [BLOCK_H, rot_dim] tile in fp32. Only the
first `rot_dim` dims of a head are read or written (partial rotary leaves the rest untouched).

Layouts: neox ("rotate_half") pairs dim i with i + rot_dim/2; GPT-J pairs 2i with 2i + 1. The GPT-J
tile is loaded contiguously and split into even/odd lanes in registers, so both layouts use full-width
vector loads.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dist_llm.kernels._rounding import round_to
from dist_llm.kernels.kv_cache import _to_cache


@triton.jit
def _load_cos_sin(pos_ptr, tok, cache_ptr, stride_cache0, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """Token `tok`'s cos and sin rows, fp32 [BLOCK_HALF] each (zero past HALF)."""
    pos = tl.load(pos_ptr + tok).to(tl.int64)
    d = tl.arange(0, BLOCK_HALF)
    cs_row = cache_ptr + pos * stride_cache0
    cos = tl.load(cs_row + d, mask=d < HALF, other=0.0).to(tl.float32)
    sin = tl.load(cs_row + HALF + d, mask=d < HALF, other=0.0).to(tl.float32)
    return cos, sin


@triton.jit
def _rotate_heads(
    base_ptr, stride_h, head_start, num_heads, cos, sin,
    copy_ptr, stride_copy_h, num_copy_heads, copy_inv_scale,
    HALF: tl.constexpr, IS_NEOX: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
    COPY: tl.constexpr,
):  # fmt: skip
    """Rotates heads [head_start, head_start + BLOCK_H) below num_heads in place. With COPY, the rotated
    dims of the heads below num_copy_heads are also stored at copy_ptr, a KV cache (rounded to base_ptr's
    dtype first, so the copy is bit-identical to copying the rotated heads afterwards; an fp8 cache gets
    them times copy_inv_scale, see `kv_cache._to_cache`)."""
    heads = head_start + tl.arange(0, BLOCK_H)
    rows = base_ptr + heads.to(tl.int64)[:, None] * stride_h
    copy_rows = copy_ptr + heads.to(tl.int64)[:, None] * stride_copy_h
    hmask = (heads < num_heads)[:, None]
    copy_hmask = (heads < num_copy_heads)[:, None]
    if IS_NEOX:
        d = tl.arange(0, BLOCK_HALF)[None, :]
        mask = hmask & (d < HALF)
        x1 = tl.load(rows + d, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(rows + HALF + d, mask=mask, other=0.0).to(tl.float32)
        o1 = round_to(x1 * cos[None, :] - x2 * sin[None, :], base_ptr.dtype.element_ty)
        o2 = round_to(x2 * cos[None, :] + x1 * sin[None, :], base_ptr.dtype.element_ty)
        tl.store(rows + d, o1, mask=mask)
        tl.store(rows + HALF + d, o2, mask=mask)
        if COPY:
            copy_mask = copy_hmask & (d < HALF)
            tl.store(copy_rows + d, _to_cache(o1, copy_ptr, copy_inv_scale), mask=copy_mask)
            tl.store(copy_rows + HALF + d, _to_cache(o2, copy_ptr, copy_inv_scale), mask=copy_mask)
    else:
        d = tl.arange(0, 2 * BLOCK_HALF)[None, :]
        mask = hmask & (d < 2 * HALF)
        x = tl.load(rows + d, mask=mask, other=0.0).to(tl.float32)
        x1, x2 = tl.split(tl.reshape(x, (BLOCK_H, BLOCK_HALF, 2)))
        o1 = x1 * cos[None, :] - x2 * sin[None, :]
        o2 = x2 * cos[None, :] + x1 * sin[None, :]
        o = round_to(tl.reshape(tl.join(o1, o2), (BLOCK_H, 2 * BLOCK_HALF)), base_ptr.dtype.element_ty)
        tl.store(rows + d, o, mask=mask)
        if COPY:
            tl.store(copy_rows + d, _to_cache(o, copy_ptr, copy_inv_scale), mask=copy_hmask & (d < 2 * HALF))


@triton.jit
def _rotary_kernel(
    pos_ptr, q_ptr, k_ptr, cache_ptr,
    stride_q0, stride_q1, stride_k0, stride_k1, stride_cache0,
    num_q_heads, num_k_heads,
    HALF: tl.constexpr,  # rot_dim // 2; constexpr so the compiler sees the alignment of both halves
    IS_NEOX: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
):  # fmt: skip
    tok = tl.program_id(0).to(tl.int64)
    head_block = tl.program_id(1)
    cos, sin = _load_cos_sin(pos_ptr, tok, cache_ptr, stride_cache0, HALF, BLOCK_HALF)
    num_q_blocks = tl.cdiv(num_q_heads, BLOCK_H)
    if head_block < num_q_blocks:
        q_row = q_ptr + tok * stride_q0
        _rotate_heads(
            q_row, stride_q1, head_block * BLOCK_H, num_q_heads, cos, sin, q_row, 0, 0, None,
            HALF, IS_NEOX, BLOCK_H, BLOCK_HALF, COPY=False,
        )  # fmt: skip
    else:
        k_row = k_ptr + tok * stride_k0
        _rotate_heads(
            k_row, stride_k1, (head_block - num_q_blocks) * BLOCK_H, num_k_heads, cos, sin, k_row, 0, 0, None,
            HALF, IS_NEOX, BLOCK_H, BLOCK_HALF, COPY=False,
        )  # fmt: skip


def _launch_config(num_tokens: int, max_heads: int, half: int) -> tuple[int, int, int]:
    """(BLOCK_H, BLOCK_HALF, num_warps): about 2K rotated elements per program, fewer when T is small."""
    block_half = triton.next_power_of_2(half)
    target = 2048 if num_tokens >= 1024 else 512
    block_h = min(triton.next_power_of_2(max_heads), max(1, target // (2 * block_half)))
    num_warps = 4 if block_h * 2 * block_half >= 2048 else 2
    return block_h, block_half, num_warps


def check_rotary_args(positions, q, k, cos_sin_cache) -> None:
    assert q.dim() == 3 and k.dim() == 3, "q and k must be [T, H, D]"
    num_tokens, _, head_dim = q.shape
    assert k.shape[0] == num_tokens and k.shape[2] == head_dim, f"q {tuple(q.shape)} vs k {tuple(k.shape)}"
    assert positions.shape == (num_tokens,) and not positions.dtype.is_floating_point
    assert q.stride(2) == 1 and k.stride(2) == 1, "q and k must be contiguous in head_dim"
    assert cos_sin_cache.dim() == 2 and cos_sin_cache.stride(1) == 1
    rot_dim = cos_sin_cache.shape[1]
    assert rot_dim % 2 == 0 and rot_dim <= head_dim, f"rot_dim {rot_dim} vs head_dim {head_dim}"
    assert q.device == k.device == positions.device == cos_sin_cache.device


def rotary_embedding(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor, is_neox: bool
) -> None:
    """In place on q [T, Hq, D] and k [T, Hk, D] (strided views allowed, last dim contiguous)."""
    check_rotary_args(positions, q, k, cos_sin_cache)
    num_tokens, num_q_heads, _ = q.shape
    num_k_heads, rot_dim = k.shape[1], cos_sin_cache.shape[1]
    if num_tokens == 0:
        return
    half = rot_dim // 2
    block_h, block_half, num_warps = _launch_config(num_tokens, max(num_q_heads, num_k_heads), half)
    grid = (num_tokens, triton.cdiv(num_q_heads, block_h) + triton.cdiv(num_k_heads, block_h))
    _rotary_kernel[grid](
        positions, q, k, cos_sin_cache,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos_sin_cache.stride(0),
        num_q_heads, num_k_heads,
        HALF=half, IS_NEOX=bool(is_neox), BLOCK_H=block_h, BLOCK_HALF=block_half, num_warps=num_warps,
    )  # fmt: skip
