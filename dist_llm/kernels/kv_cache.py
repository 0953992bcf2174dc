"""Scatter this step's K/V into the paged cache: token t goes to slot `slot_mapping[t]`.

Caches are [num_blocks, block_size, Hk, D]; slot = block * block_size + offset; slot -1 is skipped
(its loads and stores are masked off, so padding tokens cost no memory traffic). k and v may be
strided views of the fused qkv output. Grid: (token, head block).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dist_llm.kernels._rounding import round_to


@triton.jit
def _cache_row(cache_ptr, slot, block_size, stride_c0, stride_c1):
    """The address of slot `slot`'s first head in a [num_blocks, block_size, H, D] cache (slot >= 0)."""
    return cache_ptr + (slot // block_size) * stride_c0 + (slot % block_size) * stride_c1


@triton.jit
def _copy_heads(
    src_ptr, stride_src_h, dst_ptr, stride_dst_h, head_start, num_heads, num_d,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """dst[h, :num_d] = src[h, :num_d] for heads [head_start, head_start + BLOCK_H) below num_heads."""
    heads = head_start + tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)[None, :]
    h = heads.to(tl.int64)[:, None]
    mask = (heads < num_heads)[:, None] & (d < num_d)
    x = tl.load(src_ptr + h * stride_src_h + d, mask=mask)
    tl.store(dst_ptr + h * stride_dst_h + d, round_to(x, dst_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _write_kv_cache_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_k0, stride_k1, stride_v0, stride_v1,
    stride_kc0, stride_kc1, stride_kc2, stride_vc0, stride_vc1, stride_vc2,
    num_heads, head_dim, block_size,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    tok = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    slot = tl.load(slot_ptr + tok).to(tl.int64)
    heads_to_write = tl.where(slot >= 0, num_heads, 0)  # padding token (slot -1): everything masked off
    slot = tl.maximum(slot, 0)
    mask = (heads < heads_to_write)[:, None] & (d < head_dim)[None, :]
    h = heads.to(tl.int64)[:, None]
    # both loads before either store: the compiler cannot reorder a load past a store that may alias it
    k = tl.load(k_ptr + tok * stride_k0 + h * stride_k1 + d[None, :], mask=mask)
    v = tl.load(v_ptr + tok * stride_v0 + h * stride_v1 + d[None, :], mask=mask)
    kc = _cache_row(k_cache_ptr, slot, block_size, stride_kc0, stride_kc1) + h * stride_kc2 + d[None, :]
    vc = _cache_row(v_cache_ptr, slot, block_size, stride_vc0, stride_vc1) + h * stride_vc2 + d[None, :]
    tl.store(kc, round_to(k, k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(vc, round_to(v, v_cache_ptr.dtype.element_ty), mask=mask)


def _launch_config(num_heads: int, head_dim: int) -> tuple[int, int, int]:
    """(BLOCK_H, BLOCK_D, num_warps): up to 2K elements of k (and as many of v) per program."""
    block_d = triton.next_power_of_2(head_dim)
    block_h = min(triton.next_power_of_2(num_heads), max(1, 2048 // block_d))
    num_warps = 4 if block_h * block_d >= 1024 else 2
    return block_h, block_d, num_warps


def check_kv_args(k, v, k_cache, v_cache, slot_mapping) -> None:
    assert k.dim() == 3 and k.shape == v.shape, f"k {tuple(k.shape)} vs v {tuple(v.shape)}"
    num_tokens, num_heads, head_dim = k.shape
    assert k_cache.dim() == 4 and k_cache.shape == v_cache.shape
    assert k_cache.shape[2:] == (num_heads, head_dim), f"cache {tuple(k_cache.shape)} vs k {tuple(k.shape)}"
    assert slot_mapping.shape == (num_tokens,) and not slot_mapping.dtype.is_floating_point
    for name, t in (("k", k), ("v", v), ("k_cache", k_cache), ("v_cache", v_cache)):
        assert t.stride(-1) == 1, f"{name} must be contiguous in head_dim, strides {t.stride()}"
        assert t.device == slot_mapping.device, f"{name} on {t.device}, slot_mapping on {slot_mapping.device}"


def write_kv_cache(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """k, v [T, Hk, D] -> k_cache, v_cache [num_blocks, block_size, Hk, D] at `slot_mapping` (int [T])."""
    check_kv_args(k, v, k_cache, v_cache, slot_mapping)
    num_tokens, num_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    block_h, block_d, num_warps = _launch_config(num_heads, head_dim)
    _write_kv_cache_kernel[(num_tokens, triton.cdiv(num_heads, block_h))](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        num_heads, head_dim, k_cache.shape[1],
        BLOCK_H=block_h, BLOCK_D=block_d, num_warps=num_warps,
    )  # fmt: skip
