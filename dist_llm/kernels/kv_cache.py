"""Scatter this step's K/V into the paged cache: token t goes to slot `slot_mapping[t]`.

Caches are [num_blocks, block_size, Hk, D]; slot = block * block_size + offset; slot -1 is skipped
(its loads and stores are masked off, so padding tokens cost no memory traffic). k and v may be
strided views of the fused qkv output. Grid: (token, head block).

A cache may be fp8 (torch.float8_e4m3fn) while k and v keep the model's dtype: it stores
round(x * (1 / scale)) with the reciprocal in fp32, saturated to +-448 (`k_scale`, `v_scale`: per tensor).
The kernels get the reciprocals only then; for any other cache they get None (constexpr), so those
compile exactly as without fp8 support.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dist_llm.kernels._rounding import round_to
from dist_llm.kernels.reference import FP8_KV_DTYPE, check_kv_scales

KV_LAYOUTS = ("nhd", "hnd")


def empty_kv_cache(num_blocks: int, block_size: int, num_heads: int, head_dim: int, dtype: torch.dtype,
                   device, layout: str = "nhd") -> torch.Tensor:  # fmt: skip
    """A zeroed cache, always seen as [num_blocks, block_size, Hk, D]; `layout` is its order in memory.
    "nhd": tokens then heads (a token's heads are adjacent: one decode step's write is one run). "hnd": heads
    then tokens within each block (a [Hk, block_size, D] slab per block, as vLLM and TensorRT-LLM keep it): a
    head's tile of a block's tokens is one contiguous run, what attention reads. Every kernel here takes the
    cache's strides, so both work everywhere; "hnd" is the transposed view of the second."""
    if layout not in KV_LAYOUTS:
        raise ValueError(f"KV cache layout must be one of {KV_LAYOUTS}, got {layout!r}")
    if layout == "nhd":
        return torch.zeros(num_blocks, block_size, num_heads, head_dim, dtype=dtype, device=device)
    return torch.zeros(num_blocks, num_heads, block_size, head_dim, dtype=dtype, device=device).transpose(1, 2)


@triton.jit
def _cache_row(cache_ptr, slot, block_size, stride_c0, stride_c1):
    """The address of slot `slot`'s first head in a [num_blocks, block_size, H, D] cache (slot >= 0)."""
    return cache_ptr + (slot // block_size) * stride_c0 + (slot % block_size) * stride_c1


@triton.jit
def _to_cache(x, cache_ptr, inv_scale):
    """x as `cache_ptr`'s cache stores it: rounded to its dtype; an fp8 cache holds x * inv_scale (fp32)."""
    if cache_ptr.dtype.element_ty == tl.float8e4nv:
        return round_to(x.to(tl.float32) * inv_scale, tl.float8e4nv)
    else:
        return round_to(x, cache_ptr.dtype.element_ty)


@triton.jit
def _copy_heads(
    src_ptr, stride_src_h, dst_ptr, stride_dst_h, head_start, num_heads, num_d, inv_scale,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """dst[h, :num_d] = src[h, :num_d] for heads [head_start, head_start + BLOCK_H) below num_heads (dst a
    cache: `_to_cache(..., inv_scale)`)."""
    heads = head_start + tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)[None, :]
    h = heads.to(tl.int64)[:, None]
    mask = (heads < num_heads)[:, None] & (d < num_d)
    x = tl.load(src_ptr + h * stride_src_h + d, mask=mask)
    tl.store(dst_ptr + h * stride_dst_h + d, _to_cache(x, dst_ptr, inv_scale), mask=mask)


@triton.jit
def _write_kv_cache_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_k0, stride_k1, stride_v0, stride_v1,
    stride_kc0, stride_kc1, stride_kc2, stride_vc0, stride_vc1, stride_vc2,
    num_heads, head_dim, block_size, inv_k_scale, inv_v_scale,
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
    tl.store(kc, _to_cache(k, k_cache_ptr, inv_k_scale), mask=mask)
    tl.store(vc, _to_cache(v, v_cache_ptr, inv_v_scale), mask=mask)


def _launch_config(num_heads: int, head_dim: int) -> tuple[int, int, int]:
    """(BLOCK_H, BLOCK_D, num_warps): up to 2K elements of k (and as many of v) per program. An fp8 cache
    takes the same tiles: the loads of k and v (16-bit) are the larger half of the traffic."""
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


def inv_cache_scales(k_cache, v_cache, k_scale: float, v_scale: float) -> tuple[float | None, float | None]:
    """The kernels' (1 / k_scale, 1 / v_scale) for an fp8 cache; (None, None) for any other (scales 1)."""
    assert k_cache.dtype == v_cache.dtype, f"k_cache {k_cache.dtype} vs v_cache {v_cache.dtype}"
    check_kv_scales(k_cache.dtype, k_scale, v_scale)
    if k_cache.dtype != FP8_KV_DTYPE:
        return None, None
    return 1.0 / k_scale, 1.0 / v_scale


def write_kv_cache(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
    k_scale: float = 1.0, v_scale: float = 1.0,
) -> None:  # fmt: skip
    """k, v [T, Hk, D] -> k_cache, v_cache [num_blocks, block_size, Hk, D] at `slot_mapping` (int [T]).
    An fp8 cache stores k / k_scale and v / v_scale (other caches: scales 1)."""
    check_kv_args(k, v, k_cache, v_cache, slot_mapping)
    inv_k_scale, inv_v_scale = inv_cache_scales(k_cache, v_cache, k_scale, v_scale)
    num_tokens, num_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    block_h, block_d, num_warps = _launch_config(num_heads, head_dim)
    _write_kv_cache_kernel[(num_tokens, triton.cdiv(num_heads, block_h))](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        num_heads, head_dim, k_cache.shape[1], inv_k_scale, inv_v_scale,
        BLOCK_H=block_h, BLOCK_D=block_d, num_warps=num_warps,
    )  # fmt: skip
