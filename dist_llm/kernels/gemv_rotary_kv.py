"""The fused qkv projection at batch 1: the one-row GEMV with rotary and the paged KV-cache write in its
epilogue, one launch where `gemv` then `rotary_and_write_kv` take two.

At decode a launch costs about 1.5-2 us of fixed latency even with PDL, as much as the rotary kernel's
work, so folding it into the GEMV saves one launch per layer. The GEMV (`gemv._gemv_kernel` with
ROPE_KV) keeps the plain call's launch config (`gemv.launch_config`), K loop and weight prefetch; only the
rows each program owns and its epilogue change:

  rows      q and k heads (neox layout: dim i pairs with i + D/2) are split into rotary pairs, and a
            program owns BLOCK_N/2 consecutive pairs, both rows of each, so the epilogue holds both
            members of every pair in registers. Pairs run on across head boundaries and from q into k,
            so any even head_dim works with any BLOCK_N. The v heads keep BLOCK_N consecutive rows. Each
            row is still K contiguous weights read once, so the weight streams as in the plain GEMV.
  epilogue  y = round(sum + bias) as `_store_row` stores it; the q/k rows are rotated in fp32 with cos/sin
            at positions[0] and rounded (`_rotate_heads`' arithmetic), stored to `out`, and the k rows also
            to the k cache at slot_mapping[0]; v rows go to `out` and the v cache. Slot -1: no cache store.
            positions, slot_mapping and cos/sin are loaded after `pdl_wait` but before the K loop, so their
            latency hides under the weight stream; only the weight prefetch precedes the wait.

The outputs are bit-identical to the two-kernel path: each row's dot product has the same tile, layout and
summation order (which program a row lands in does not change how it is reduced; the layouts were checked
equal in the compiled IR), and the rotary starts from exactly the rounded value the plain GEMV stores. One
caveat, compiled only: LLVM contracts one product of each rotary pair into an FMA and picks which one per
specialization of the rotary kernel. `gemv._rotate_pair` fuses explicitly the ones Triton 3.6 picks there
for 16-bit q/k (bit for bit in every tested shape), but rotated fp32 values may be an ulp apart. The
torch reference agrees within the dtype's tolerance, as for `gemv`.

`FUSE_ROPE_KV` (env DIST_LLM_GEMV_ROPE: "1" on, off by default) is the switch for callers; the function
itself always fuses. Callers check `gemv_rotary_kv_supported` and otherwise run the two kernels.

Off by default until it has been timed in the model. In isolation (H200, bf16, 64 calls in a CUDA graph with
PDL, 2026-11-28), an earlier version, with the position/slot/cos/sin loads in the epilogue, took 13.2 us
against 14.3 for the two kernels at Llama-2-7B's tp=2 shard (6144 rows) and saved 0.6-1.3 us at three more
shapes, but lost at two: 28.5 against 25.5 us at Llama-2-7B tp=1 (12288 rows) and 11.0 against 9.2 at
Llama-3-8B tp=2 (3072 rows). This version loads those operands before the K loop, the suspected cause; it
has not been timed.
"""

from __future__ import annotations

import os

import torch
import triton

from dist_llm.kernels import gemv as _gemv
from dist_llm.kernels._pdl import pdl_launch_kwargs

FUSE_ROPE_KV = os.environ.get("DIST_LLM_GEMV_ROPE", "0") == "1"


def gemv_rotary_kv_supported(
    x: torch.Tensor, weight: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor, is_neox: bool,
    k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
    num_q_heads: int, num_kv_heads: int, head_dim: int,
) -> bool:  # fmt: skip
    """Whether `gemv_rotary_kv` can stand in for `gemv` then `rotary_and_write_kv(..., is_neox, ...)`: one
    token (x [1, K]), `gemv_supported(x, weight)`, weight rows [q heads | k heads | v heads] of head_dim
    each, the neox layout with full rotary (rot_dim == head_dim, even), and caches
    [num_blocks, block_size, Hk, D] of x's dtype, contiguous in head_dim, on x's device. An fp8 cache is not
    supported (the epilogue has no scales): callers run the two kernels, which take one."""
    d = head_dim
    return (
        _gemv.gemv_supported(x, weight)
        and x.shape[0] == 1
        and bool(is_neox)
        and num_q_heads >= 1
        and num_kv_heads >= 1
        and d >= 2
        and d % 2 == 0
        and weight.shape[0] == (num_q_heads + 2 * num_kv_heads) * d
        and cos_sin_cache.dim() == 2
        and cos_sin_cache.shape[1] == d
        and cos_sin_cache.stride(1) == 1
        and cos_sin_cache.dtype.is_floating_point
        and positions.shape == (1,)
        and slot_mapping.shape == (1,)
        and not positions.dtype.is_floating_point
        and not slot_mapping.dtype.is_floating_point
        and k_cache.dim() == 4
        and k_cache.shape == v_cache.shape
        and k_cache.shape[2:] == (num_kv_heads, d)
        and k_cache.dtype == v_cache.dtype == x.dtype  # so never an fp8 cache
        and k_cache.stride(3) == 1
        and v_cache.stride(3) == 1
        and all(t.device == x.device for t in (positions, cos_sin_cache, k_cache, v_cache, slot_mapping))
    )


def gemv_rotary_kv(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor | None,
    positions: torch.Tensor, cos_sin_cache: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    slot_mapping: torch.Tensor, num_q_heads: int, num_kv_heads: int, head_dim: int,
    norm: tuple[torch.Tensor, float] | None = None,
) -> torch.Tensor:  # fmt: skip
    """out [1, (Hq + 2 Hk) D] = [rotated q | rotated k | v] of x [1, K] @ weightᵀ + bias, and k, v written to
    k_cache, v_cache [num_blocks, block_size, Hk, D] at slot_mapping[0] (-1: no store); cos/sin rows
    [cos | sin] of cos_sin_cache at positions[0], neox layout. Bit for bit what `gemv(x, weight, bias, out)`
    then `rotary_and_write_kv` on out's q/k/v views give. Needs `gemv_rotary_kv_supported(..., True, ...)`;
    with `out` given (a [1, N] view, last dim contiguous) nothing is allocated, so the call can be captured
    in a CUDA graph. norm=(partials, eps): x is a residual times an RMSNorm weight and the sums are scaled
    first, as `gemv(..., norm=)` does (`gemv_norm.py`)."""
    assert gemv_rotary_kv_supported(
        x, weight, positions, cos_sin_cache, True, k_cache, v_cache, slot_mapping, num_q_heads, num_kv_heads,
        head_dim,
    ), (
        f"gemv_rotary_kv cannot take x {tuple(x.shape)} {x.dtype}, weight {tuple(weight.shape)} {weight.dtype}, "
        f"heads {num_q_heads}/{num_kv_heads} x {head_dim}, cos_sin_cache {tuple(cos_sin_cache.shape)}, caches "
        f"{tuple(k_cache.shape)} {k_cache.dtype}, positions {tuple(positions.shape)} (see gemv_rotary_kv_supported)"
    )  # fmt: skip
    n, k = weight.shape
    if bias is not None:
        assert bias.shape == (n,) and bias.stride(0) == 1, f"bias must be contiguous [{n}], got {tuple(bias.shape)}"
        assert bias.device == x.device and bias.dtype.is_floating_point
    if out is None:
        out = torch.empty(1, n, dtype=x.dtype, device=x.device)
    assert out.shape == (1, n) and out.dtype == x.dtype and out.device == x.device, "out must be [1, N] in x.dtype"
    assert out.stride(1) == 1, f"out must be contiguous in its last dim, strides {out.stride()}"
    block_n, block_k, num_warps = _gemv.launch_config(x, n, k)  # the plain call's: same sums
    num_pairs = (num_q_heads + num_kv_heads) * (head_dim // 2)
    grid = (triton.cdiv(num_pairs, block_n // 2) + triton.cdiv(num_kv_heads * head_dim, block_n),)
    _gemv._gemv_kernel[grid](
        x, weight, weight if bias is None else bias, out,
        n, k,
        x.stride(0), weight.stride(0), out.stride(0),
        M=1, BLOCK_N=block_n, BLOCK_K=block_k, EVEN_K=k % block_k == 0, HAS_BIAS=bias is not None,
        PREFETCH=_gemv.prefetch_chunks(k, block_k), SILU_MUL=False, **pdl_launch_kwargs(x.device),
        ROPE_KV=True, HEAD_DIM=head_dim, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads,
        pos_ptr=positions, cos_sin_ptr=cos_sin_cache, stride_cs0=cos_sin_cache.stride(0), slot_ptr=slot_mapping,
        k_cache_ptr=k_cache, v_cache_ptr=v_cache,
        stride_kc0=k_cache.stride(0), stride_kc1=k_cache.stride(1), stride_kc2=k_cache.stride(2),
        stride_vc0=v_cache.stride(0), stride_vc1=v_cache.stride(1), stride_vc2=v_cache.stride(2),
        block_size=k_cache.shape[1],
        num_warps=num_warps, num_stages=_gemv._NUM_STAGES, **_gemv.norm_in_kwargs(norm, x.device),
    )  # fmt: skip
    return out
