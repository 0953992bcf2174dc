"""Rotary embedding and the paged KV-cache write in one launch: `rotary_embedding` then `write_kv_cache`.

Grid: (token, head block), three kinds of head block per token:
  q blocks  rotate BLOCK_H q heads in place (as `_rotary_kernel` does);
  k blocks  rotate BLOCK_H k heads in place and store the rotated tile to the k cache from registers;
            with partial rotary they also copy the unrotated tail dims [rot_dim, D) to the cache;
  v blocks  copy BLOCK_HV v heads to the v cache (as `_write_kv_cache_kernel` does).
Same jit helpers and the same rounding as the two kernels, so q, k and both caches are bit-identical to
the unfused pair. A padding token (slot -1) still rotates its q and k; only its cache stores are masked
off. At decode the pair is launch-bound (about 1.5 us each on an H100), so one launch saves one per layer.

An fp8 cache (see `kv_cache`) stores x / scale: `_rotate_heads` and `_copy_heads` store to the cache through
`kv_cache._to_cache` with the reciprocal of the scale, so k itself is as without fp8.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dist_llm.kernels._pdl import pdl_launch_kwargs, pdl_wait
from dist_llm.kernels.kv_cache import _cache_row, _copy_heads, check_kv_args, inv_cache_scales
from dist_llm.kernels.kv_cache import _launch_config as _kv_launch_config
from dist_llm.kernels.rotary import _launch_config as _rotary_launch_config
from dist_llm.kernels.rotary import _load_cos_sin, _rotate_heads, check_rotary_args


@triton.jit
def _rotary_kv_kernel(
    pos_ptr, slot_ptr, q_ptr, k_ptr, v_ptr, cos_sin_ptr, k_cache_ptr, v_cache_ptr,
    stride_q0, stride_q1, stride_k0, stride_k1, stride_v0, stride_v1, stride_cs0,
    stride_kc0, stride_kc1, stride_kc2, stride_vc0, stride_vc1, stride_vc2,
    num_q_heads, num_kv_heads, block_size, inv_k_scale, inv_v_scale,
    HEAD_DIM: tl.constexpr, HALF: tl.constexpr, IS_NEOX: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_TAIL: tl.constexpr,
    BLOCK_HV: tl.constexpr, BLOCK_D: tl.constexpr, USE_PDL: tl.constexpr,
):  # fmt: skip
    pdl_wait(USE_PDL)
    tok = tl.program_id(0).to(tl.int64)
    head_block = tl.program_id(1)
    num_q_blocks = tl.cdiv(num_q_heads, BLOCK_H)
    num_rot_blocks = num_q_blocks + tl.cdiv(num_kv_heads, BLOCK_H)
    slot = tl.load(slot_ptr + tok).to(tl.int64)
    heads_to_write = tl.where(slot >= 0, num_kv_heads, 0)  # padding token (slot -1): no cache stores
    slot = tl.maximum(slot, 0)
    if head_block < num_rot_blocks:
        cos, sin = _load_cos_sin(pos_ptr, tok, cos_sin_ptr, stride_cs0, HALF, BLOCK_HALF)
        if head_block < num_q_blocks:
            q_row = q_ptr + tok * stride_q0
            _rotate_heads(
                q_row, stride_q1, head_block * BLOCK_H, num_q_heads, cos, sin, q_row, 0, 0, None,
                HALF, IS_NEOX, BLOCK_H, BLOCK_HALF, COPY=False,
            )  # fmt: skip
        else:
            head_start = (head_block - num_q_blocks) * BLOCK_H
            k_row = k_ptr + tok * stride_k0
            kc_row = _cache_row(k_cache_ptr, slot, block_size, stride_kc0, stride_kc1)
            _rotate_heads(
                k_row, stride_k1, head_start, num_kv_heads, cos, sin, kc_row, stride_kc2, heads_to_write,
                inv_k_scale, HALF, IS_NEOX, BLOCK_H, BLOCK_HALF, COPY=True,
            )  # fmt: skip
            if 2 * HALF < HEAD_DIM:  # partial rotary: the tail goes to the cache as it is
                _copy_heads(
                    k_row + 2 * HALF, stride_k1, kc_row + 2 * HALF, stride_kc2, head_start, heads_to_write,
                    HEAD_DIM - 2 * HALF, inv_k_scale, BLOCK_H, BLOCK_TAIL,
                )  # fmt: skip
    else:
        vc_row = _cache_row(v_cache_ptr, slot, block_size, stride_vc0, stride_vc1)
        _copy_heads(
            v_ptr + tok * stride_v0, stride_v1, vc_row, stride_vc2, (head_block - num_rot_blocks) * BLOCK_HV,
            heads_to_write, HEAD_DIM, inv_v_scale, BLOCK_HV, BLOCK_D,
        )  # fmt: skip


def rotary_and_write_kv(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos_sin_cache: torch.Tensor,
    is_neox: bool, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
    k_scale: float = 1.0, v_scale: float = 1.0,
) -> None:  # fmt: skip
    """Rotates q [T, Hq, D] and k [T, Hk, D] in place, then writes k and v [T, Hk, D] to the caches
    [num_blocks, block_size, Hk, D] at `slot_mapping` (-1: skip); all three may be strided views. An fp8
    cache stores k / k_scale and v / v_scale (other caches: scales 1)."""
    check_rotary_args(positions, q, k, cos_sin_cache)
    check_kv_args(k, v, k_cache, v_cache, slot_mapping)
    inv_k_scale, inv_v_scale = inv_cache_scales(k_cache, v_cache, k_scale, v_scale)
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads, rot_dim = k.shape[1], cos_sin_cache.shape[1]
    if num_tokens == 0:
        return
    half = rot_dim // 2
    block_h, block_half, rot_warps = _rotary_launch_config(num_tokens, max(num_q_heads, num_kv_heads), half)
    block_hv, block_d, kv_warps = _kv_launch_config(num_kv_heads, head_dim)
    num_blocks = triton.cdiv(num_q_heads, block_h) + triton.cdiv(num_kv_heads, block_h)
    num_blocks += triton.cdiv(num_kv_heads, block_hv)
    _rotary_kv_kernel[(num_tokens, num_blocks)](
        positions, slot_mapping, q, k, v, cos_sin_cache, k_cache, v_cache,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos_sin_cache.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        num_q_heads, num_kv_heads, k_cache.shape[1], inv_k_scale, inv_v_scale,
        HEAD_DIM=head_dim, HALF=half, IS_NEOX=bool(is_neox), BLOCK_H=block_h, BLOCK_HALF=block_half,
        BLOCK_TAIL=triton.next_power_of_2(max(1, head_dim - rot_dim)), BLOCK_HV=block_hv, BLOCK_D=block_d,
        num_warps=max(rot_warps, kv_warps), **pdl_launch_kwargs(q.device),
    )  # fmt: skip
