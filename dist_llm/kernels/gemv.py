"""Skinny GEMM for decode: y = x @ weightᵀ (+ bias) for x [M, K] with M <= MAX_M token rows.

A decode step reads every weight once for a handful of tokens, so the product is bound by how fast the
weight streams from HBM, not by FLOPs. One program owns BLOCK_N output features (rows of the [N, K]
weight) for all M tokens and walks K in BLOCK_K chunks. Each thread keeps fp32 partial products for the
weight elements it loads, one [BLOCK_N, BLOCK_K] accumulator per token, and the reduction over K runs
once, after the loop: a chunk costs its load plus M FMAs per weight element, with no shuffles or barriers
(the first prototype reduced every chunk for every token and, at M = 8, ran at half cuBLAS's speed).

Masks cost bandwidth, so the main K loop has none: rows of the N tail past N re-read row N - 1 (the
masked store drops them), and the K tail is one peeled, masked chunk, compiled only when
K % BLOCK_K != 0 (EVEN_K false).

MAX_M = 4 follows from the accumulators: they take M * BLOCK_N * BLOCK_K / (32 * num_warps) fp32
registers per thread, 16 * M at the narrowest tile that still moves 8 KiB of bf16 per chunk
(BLOCK_N = 8, BLOCK_K = 512, 8 warps). M = 4 is 64 of them; M = 8 would need 128 (or a tile half as
big, with half the bytes in flight) and 8 FMAs per streamed element. Beyond MAX_M, callers use F.linear.

The output dtype is x's; the bias (any float dtype) is added in fp32 before the one rounding, as in
`reference.linear_ref`. The launch config is a fixed function of (M, N, K), never autotuned, so results
are deterministic (no split-K, no atomics) and the call can be captured in a CUDA graph once `out` is
preallocated.

With programmatic dependent launch (`_pdl.py`) each program loads its first weight chunk (or first
PREFETCH_CHUNKS chunks) before waiting for the previous kernel: the weights are no kernel's output, so their
stream starts while that kernel drains. The prefetched chunks are peeled off the loop also without PDL, so
one code path is tested everywhere, and they are summed in the loop's order, so the count changes no bit.

ROPE_KV (one row, the qkv projection; `gemv_rotary_kv.py`) changes only which rows a program owns and
its epilogue: rotary pairs of q/k rows, rotated and written to the paged KV cache from registers. The
dot products are the plain call's, bit for bit; without it the plain kernel compiles exactly as before.

ADD_NORM and NORM_IN (one row; `gemv_norm.py`) fold the residual add + RMSNorm between two GEMVs into their
epilogues: the producer adds the residual and writes h * w and its programs' sums of squares, the consumer
scales its sums by 1/rms. Their operands are loaded after `pdl_wait` and before the K loop, and used after it,
so the loop is the plain one (the same SASS, checked with `benchmarks/sass_gemv.py`); without them the plain
kernel compiles to the same SASS as before they existed.
"""

from __future__ import annotations

import functools
import json
import os

import torch
import triton
import triton.language as tl

from dist_llm.kernels._pdl import pdl_launch_kwargs, pdl_wait
from dist_llm.kernels._rounding import _INTERPRET as _INTERPRETED
from dist_llm.kernels._rounding import round_to
from dist_llm.kernels.kv_cache import _cache_row

MAX_M = 4
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

_MAX_BLOCK_K = 1024
_WIDE_N = 16384  # above this, M = 2 takes BLOCK_N = 16: enough programs remain to fill the GPU
_NUM_STAGES = 3  # 2, 3 and 4 were within 1% of each other in the H200 sweep (see _config)


@triton.jit
def _load_x(x_row, kk, K, MASK_K: tl.constexpr):
    if MASK_K:
        return tl.load(x_row + kk, mask=kk < K, other=0.0)
    return tl.load(x_row + kk)


@triton.jit
def _fma(acc, w, x_row, kk, K, MASK_K: tl.constexpr, SILU_MUL: tl.constexpr):
    """acc + w * x_row[kk], elementwise in fp32: one token's x chunk broadcast over the BLOCK_N rows.
    With SILU_MUL the row is [gate | up] (2K wide) and x = silu(gate) * up, rounded as `silu_and_mul`."""
    if SILU_MUL:
        dtype = x_row.dtype.element_ty
        gate = _load_x(x_row, kk, K, MASK_K).to(tl.float32)
        up = _load_x(x_row + K, kk, K, MASK_K).to(tl.float32)
        act = round_to(gate / (1.0 + tl.exp(-gate)), dtype).to(tl.float32)
        x = round_to(act * up, dtype).to(tl.float32)
    else:
        x = _load_x(x_row, kk, K, MASK_K).to(tl.float32)
    return acc + w * x[None, :]


@triton.jit
def _load_w(w_ptrs, kk, K, MASK_K: tl.constexpr):
    if MASK_K:
        return tl.load(w_ptrs, mask=kk[None, :] < K, other=0.0, eviction_policy="evict_first")
    return tl.load(w_ptrs, eviction_policy="evict_first")  # read once: keep L2 for the activations


@triton.jit
def _accumulate(
    acc0, acc1, acc2, acc3, w_ptrs, x_ptr, stride_xm, kk, K,
    M: tl.constexpr, MASK_K: tl.constexpr, SILU_MUL: tl.constexpr,
):  # fmt: skip
    """One K chunk for the M token rows; accumulators of rows >= M are passed through untouched."""
    w = _load_w(w_ptrs, kk, K, MASK_K)
    return _accumulate_w(acc0, acc1, acc2, acc3, w, x_ptr, stride_xm, kk, K, M, MASK_K, SILU_MUL)


@triton.jit
def _accumulate_w(
    acc0, acc1, acc2, acc3, w, x_ptr, stride_xm, kk, K,
    M: tl.constexpr, MASK_K: tl.constexpr, SILU_MUL: tl.constexpr,
):  # fmt: skip
    """`_accumulate` with the chunk's weights already loaded."""
    w = w.to(tl.float32)
    acc0 = _fma(acc0, w, x_ptr, kk, K, MASK_K, SILU_MUL)
    if M > 1:
        acc1 = _fma(acc1, w, x_ptr + stride_xm, kk, K, MASK_K, SILU_MUL)
    if M > 2:
        acc2 = _fma(acc2, w, x_ptr + 2 * stride_xm, kk, K, MASK_K, SILU_MUL)
    if M > 3:
        acc3 = _fma(acc3, w, x_ptr + 3 * stride_xm, kk, K, MASK_K, SILU_MUL)
    return acc0, acc1, acc2, acc3


@triton.jit
def _dot_rows(acc, scale=None, NORM_IN: tl.constexpr = False):
    """The tile rows' dot products: acc summed over K; with NORM_IN times the RMSNorm's 1 / rms (`scale`),
    applied to the dot products of the unscaled (residual * weight) row."""
    y = tl.sum(acc, axis=1)
    if NORM_IN:
        y = y * scale
    return y


@triton.jit
def _store_row(acc, bias, y_row, rn, N, scale=None, NORM_IN: tl.constexpr = False):
    y = _dot_rows(acc, scale, NORM_IN) + bias
    tl.store(y_row + rn, round_to(y, y_row.dtype.element_ty), mask=rn < N)


@triton.jit
def _load_norm_operands(part_ptr, num_parts, res_ptr, nw_ptr, rn, N,
                        NORM_IN: tl.constexpr, ADD_NORM: tl.constexpr, PARTS_BLOCK: tl.constexpr):  # fmt: skip
    """Activations of the norm fold (`gemv_norm.py`), loaded after `pdl_wait` but before the K loop, whose
    weight stream hides their latency, and used after it: NORM_IN's partial sums of squares; ADD_NORM's
    residual rows and norm weights. Stand-ins (never read) for the one not compiled."""
    parts = 0.0
    res = 0.0
    nw = 0.0
    if NORM_IN:  # summed after the loop: the first chunk need not wait for this load and its tree
        offs = tl.arange(0, PARTS_BLOCK)
        parts = tl.load(part_ptr + offs, mask=offs < num_parts, other=0.0)
    if ADD_NORM:
        res = tl.load(res_ptr + rn, mask=rn < N, other=0.0)
        nw = tl.load(nw_ptr + rn, mask=rn < N, other=0.0)
    return parts, res, nw


@triton.jit
def _norm_scale(parts, K, eps):
    """1 / rms from the producer's partial sums of squares: a fixed-order tree, the same bits every step."""
    return tl.rsqrt(tl.sum(parts, axis=0) / K + eps)


@triton.jit
def _store_add_norm(acc, bias, res, nw, res_ptr, hw_ptr, part_ptr, rn, N):
    """The ADD_NORM epilogue (one token row): h = round(round(sum + bias) + residual), the residual add of
    `fused_add_rms_norm`, back to the residual rows; h * norm weight rounded to hw's dtype; and this
    program's sum of squares of h (fp32, its rows in tile order) to part_ptr[program]."""
    mask = rn < N
    y = round_to(tl.sum(acc, axis=1) + bias, hw_ptr.dtype.element_ty).to(tl.float32)  # what `_store_row` stores
    h = round_to(y + res.to(tl.float32), res_ptr.dtype.element_ty)
    tl.store(res_ptr + rn, h, mask=mask)
    h = tl.where(mask, h.to(tl.float32), 0.0)
    tl.store(part_ptr + tl.program_id(0), tl.sum(h * h, axis=0))
    tl.store(hw_ptr + rn, round_to(h * nw.to(tl.float32), hw_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kv_rows(pid, num_q_heads, num_kv_heads, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr):
    """The weight rows of program `pid` with ROPE_KV: in the q/k region, rotary pairs pid * BLOCK_N/2 + i // 2
    (pair p: dim p % HALF of head p // HALF), tile row i taking the pair's first-half dim for even i and
    its second-half dim (+ HALF) for odd i; in the v region, BLOCK_N consecutive rows. Pairs and rows past
    their region re-read its last one (the epilogue's stores drop them)."""
    HALF: tl.constexpr = HEAD_DIM // 2
    PAIRS: tl.constexpr = BLOCK_N // 2
    num_pairs = (num_q_heads + num_kv_heads) * HALF
    num_rot_programs = (num_pairs + PAIRS - 1) // PAIRS
    i = tl.arange(0, BLOCK_N)
    if pid < num_rot_programs:
        pair = tl.minimum(pid * PAIRS + i // 2, num_pairs - 1)
        rows = (pair // HALF) * HEAD_DIM + (i % 2) * HALF + pair % HALF
    else:
        v_rows = (pid - num_rot_programs) * BLOCK_N + i
        rows = 2 * num_pairs + tl.minimum(v_rows, num_kv_heads * HEAD_DIM - 1)
    return rows


@triton.jit
def _rotate_pair(x1, x2, cos, sin):
    """(x1 cos - x2 sin, x2 cos + x1 sin) in fp32, as `rotary._rotate_heads` computes them. Compiled, LLVM
    fuses one product of each pair into an FMA, and which one depends on the code around it; here the ones
    that Triton 3.6 fuses in `_rotate_heads` for 16-bit q/k (x1 cos, x1 sin) are fused explicitly. The
    interpreter fuses nothing, there or here."""
    if _INTERPRETED:
        o1 = x1 * cos - x2 * sin
        o2 = x2 * cos + x1 * sin
    else:
        o1 = tl.fma(x1, cos, -(x2 * sin))
        o2 = tl.fma(x1, sin, x2 * cos)
    return o1, o2


@triton.jit
def _load_rope_kv_operands(
    pid, pos_ptr, cos_sin_ptr, stride_cs0, slot_ptr, num_q_heads, num_kv_heads,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """(cos, sin, slot) for program `pid` with ROPE_KV: fp32 cos/sin [BLOCK_N/2] of its rotary pairs at
    positions[0] (as `rotary._load_cos_sin` reads them; zero past the pairs, so v programs read nothing),
    and slot_mapping[0]. Activations, so loaded after `pdl_wait`, but before the K loop, whose weight stream
    then hides the latency of the dependent position -> cos/sin loads."""
    HALF: tl.constexpr = HEAD_DIM // 2
    PAIRS: tl.constexpr = BLOCK_N // 2
    pair = pid * PAIRS + tl.arange(0, PAIRS)
    mask = pair < (num_q_heads + num_kv_heads) * HALF
    d = pair % HALF
    cs_row = cos_sin_ptr + tl.load(pos_ptr).to(tl.int64) * stride_cs0
    cos = tl.load(cs_row + d, mask=mask, other=0.0).to(tl.float32)
    sin = tl.load(cs_row + HALF + d, mask=mask, other=0.0).to(tl.float32)
    slot = tl.load(slot_ptr).to(tl.int64)
    return cos, sin, slot


@triton.jit
def _store_rope_kv(
    acc, bias, y_row, pid, cos, sin, slot, k_cache_ptr, v_cache_ptr,
    stride_kc0, stride_kc1, stride_kc2, stride_vc0, stride_vc1, stride_vc2, block_size, num_q_heads, num_kv_heads,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, scale=None, NORM_IN: tl.constexpr = False,
):  # fmt: skip
    """The ROPE_KV epilogue of one token row: `_store_row`'s rounding, then what `rotary_and_write_kv` does
    to these rows (`_rotate_heads`' arithmetic, `_cache_row`'s slot addressing), from registers."""
    HALF: tl.constexpr = HEAD_DIM // 2
    PAIRS: tl.constexpr = BLOCK_N // 2
    dtype = y_row.dtype.element_ty
    y = round_to(_dot_rows(acc, scale, NORM_IN) + bias, dtype)  # the value `_store_row` stores, which the rotary reads
    num_pairs = (num_q_heads + num_kv_heads) * HALF
    num_rot_programs = (num_pairs + PAIRS - 1) // PAIRS
    heads_to_write = tl.where(slot >= 0, num_kv_heads, 0)  # slot -1: no cache store
    slot = tl.maximum(slot, 0)
    if pid < num_rot_programs:
        pair = pid * PAIRS + tl.arange(0, PAIRS)
        pair_mask = pair < num_pairs
        pair = tl.minimum(pair, num_pairs - 1)
        head = pair // HALF
        d = pair % HALF
        x1, x2 = tl.split(tl.reshape(y.to(tl.float32), (PAIRS, 2)))  # tile rows (2j, 2j + 1): pair j
        o1, o2 = _rotate_pair(x1, x2, cos, sin)
        o1 = round_to(o1, dtype)
        o2 = round_to(o2, dtype)
        first = y_row + head * HEAD_DIM + d
        tl.store(first, o1, mask=pair_mask)
        tl.store(first + HALF, o2, mask=pair_mask)
        kv_head = head - num_q_heads  # k heads: also to the k cache
        kc = _cache_row(k_cache_ptr, slot, block_size, stride_kc0, stride_kc1)
        kc += tl.maximum(kv_head, 0).to(tl.int64) * stride_kc2 + d
        k_mask = pair_mask & (kv_head >= 0) & (kv_head < heads_to_write)
        tl.store(kc, o1, mask=k_mask)  # the caches are in out's dtype
        tl.store(kc + HALF, o2, mask=k_mask)
    else:
        v_idx = (pid - num_rot_programs) * BLOCK_N + tl.arange(0, BLOCK_N)  # within the v region
        tl.store(y_row + 2 * num_pairs + v_idx, y, mask=v_idx < num_kv_heads * HEAD_DIM)
        vc = _cache_row(v_cache_ptr, slot, block_size, stride_vc0, stride_vc1)
        vc += (v_idx // HEAD_DIM).to(tl.int64) * stride_vc2 + v_idx % HEAD_DIM
        tl.store(vc, y, mask=v_idx < heads_to_write * HEAD_DIM)


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr,
    N, K,
    stride_xm, stride_wn, stride_ym,
    M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, HAS_BIAS: tl.constexpr,
    USE_PDL: tl.constexpr, PREFETCH: tl.constexpr, SILU_MUL: tl.constexpr,
    # ROPE_KV (M = 1, `gemv_rotary_kv`): the epilogue rotates q/k and writes k/v to the paged caches; the
    # arguments below stay None (constexpr) without it, so the plain GEMV compiles as it did before
    ROPE_KV: tl.constexpr = False, HEAD_DIM: tl.constexpr = None, num_q_heads=None, num_kv_heads=None,
    pos_ptr=None, cos_sin_ptr=None, stride_cs0=None, slot_ptr=None, k_cache_ptr=None, v_cache_ptr=None,
    stride_kc0=None, stride_kc1=None, stride_kc2=None, stride_vc0=None, stride_vc1=None, stride_vc2=None,
    block_size=None,
    # the RMSNorm fold (M = 1, `gemv_norm.py`). ADD_NORM: the epilogue adds the output to the residual (in
    # place), writes the new residual times the norm weight to hw_ptr and its per-program sums of squares to
    # part_out_ptr (y_ptr is not written). NORM_IN: x is such an hw row; the sums are scaled by
    # rsqrt(sum(part_in_ptr[:num_parts]) / K + eps) before the bias
    ADD_NORM: tl.constexpr = False, res_ptr=None, nw_ptr=None, hw_ptr=None, part_out_ptr=None,
    NORM_IN: tl.constexpr = False, part_in_ptr=None, num_parts=None, eps=None, PARTS_BLOCK: tl.constexpr = 1,
):  # fmt: skip
    if ROPE_KV:  # rows are independent, so any row set gives the same sums: this one holds whole rotary pairs
        rn = _rope_kv_rows(tl.program_id(0), num_q_heads, num_kv_heads, HEAD_DIM, BLOCK_N)
    else:
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    # rows past N re-read row N - 1, so no load needs an N mask; the store drops them
    w_ptrs = w_ptr + tl.minimum(rn, N - 1).to(tl.int64)[:, None] * stride_wn + rk[None, :]
    acc0 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)  # rows >= M: never updated, compiled away
    acc2 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    k_main = (K // BLOCK_K) * BLOCK_K  # written as a product: the tail stays 16-byte aligned for the compiler
    k_start = 0
    if PREFETCH > 0:  # the weights are no kernel's output: they stream in while the previous kernel ends
        w_first = _load_w(w_ptrs, rk, K, MASK_K=False)
        w_second = w_first  # stand-ins, compiled away unless prefetched below
        w_third = w_first
        if PREFETCH > 1:
            w_second = _load_w(w_ptrs + BLOCK_K, BLOCK_K + rk, K, MASK_K=False)
        if PREFETCH > 2:
            w_third = _load_w(w_ptrs + 2 * BLOCK_K, 2 * BLOCK_K + rk, K, MASK_K=False)
        pdl_wait(USE_PDL)
        acc0, acc1, acc2, acc3 = _accumulate_w(
            acc0, acc1, acc2, acc3, w_first, x_ptr, stride_xm, rk, K, M, MASK_K=False, SILU_MUL=SILU_MUL
        )
        if PREFETCH > 1:
            acc0, acc1, acc2, acc3 = _accumulate_w(
                acc0, acc1, acc2, acc3, w_second, x_ptr, stride_xm, BLOCK_K + rk, K, M, MASK_K=False,
                SILU_MUL=SILU_MUL,
            )  # fmt: skip
        if PREFETCH > 2:
            acc0, acc1, acc2, acc3 = _accumulate_w(
                acc0, acc1, acc2, acc3, w_third, x_ptr, stride_xm, 2 * BLOCK_K + rk, K, M, MASK_K=False,
                SILU_MUL=SILU_MUL,
            )  # fmt: skip
        k_start = PREFETCH * BLOCK_K
    else:
        pdl_wait(USE_PDL)
    parts, res, nw = _load_norm_operands(
        part_in_ptr, num_parts, res_ptr, nw_ptr, rn, N, NORM_IN, ADD_NORM, PARTS_BLOCK
    )
    if ROPE_KV:
        cos, sin, slot = _load_rope_kv_operands(
            tl.program_id(0), pos_ptr, cos_sin_ptr, stride_cs0, slot_ptr, num_q_heads, num_kv_heads, HEAD_DIM, BLOCK_N
        )
    for k0 in range(k_start, k_main, BLOCK_K):
        acc0, acc1, acc2, acc3 = _accumulate(
            acc0, acc1, acc2, acc3, w_ptrs + k0, x_ptr, stride_xm, k0 + rk, K, M, MASK_K=False, SILU_MUL=SILU_MUL
        )
    if not EVEN_K:
        acc0, acc1, acc2, acc3 = _accumulate(
            acc0, acc1, acc2, acc3, w_ptrs + k_main, x_ptr, stride_xm, k_main + rk, K, M, MASK_K=True, SILU_MUL=SILU_MUL
        )
    if HAS_BIAS:
        bias = tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
    else:
        bias = 0.0
    scale = 1.0
    if NORM_IN:
        scale = _norm_scale(parts, K, eps)
    if ADD_NORM:
        _store_add_norm(acc0, bias, res, nw, res_ptr, hw_ptr, part_out_ptr, rn, N)
    elif ROPE_KV:
        _store_rope_kv(
            acc0, bias, y_ptr, tl.program_id(0), cos, sin, slot, k_cache_ptr, v_cache_ptr,
            stride_kc0, stride_kc1, stride_kc2, stride_vc0, stride_vc1, stride_vc2, block_size,
            num_q_heads, num_kv_heads, HEAD_DIM, BLOCK_N, scale, NORM_IN,
        )  # fmt: skip
    else:
        _store_row(acc0, bias, y_ptr, rn, N, scale, NORM_IN)
    if M > 1:
        _store_row(acc1, bias, y_ptr + stride_ym, rn, N)
    if M > 2:
        _store_row(acc2, bias, y_ptr + 2 * stride_ym, rn, N)
    if M > 3:
        _store_row(acc3, bias, y_ptr + 3 * stride_ym, rn, N)


# One row of 16-bit weights, shapes where the aspect rule of `_config` is far from the best config:
# (N, K) -> (BLOCK_N, BLOCK_K, num_warps), each the best of `benchmarks/sweep_gemv.py --tp N` on an H200
# (2026-11-28, table in docs/performance.md), with the rule's figure beside it. Keyed by shape alone, so
# that the down projection with SiLU-and-mul fused sums in the same order as the plain call.
_TUNED_ONE_ROW = {
    # Llama-2-7B at tp=2, 10:50: the shards halve N or K, and the rule tuned at tp=1 misjudges them
    (6144, 4096): (16, 512, 8),  # qkv: 3,971 GB/s (rule 3,163)
    (4096, 2048): (4, 1024, 4),  # o: 3,560 (2,291)
    (4096, 5504): (8, 512, 8),  # down, SiLU-and-mul fused: 3,766 (2,834)
    (16000, 4096): (16, 512, 4),  # LM head: 4,287 (3,567)
}


# One row of 16-bit weights on an H100 (80 GB HBM3): where its sweep (`sweep_gemv.py`, 2026-12-06 06:42) beat the
# rule below, which was tuned on an H200; same SMs, less bandwidth, so fewer bytes in flight pay. GB/s there:
_TUNED_ONE_ROW_BY_CARD = {
    "H100": {
        (12288, 4096): (8, 1024, 8),  # qkv: 3,067 (rule's 32 x 256 x 4: 2,961)
        (22016, 4096): (8, 1024, 8),  # gate_up: 3,133 (8 x 512 x 4: 3,094)
        (32000, 4096): (4, 1024, 4),  # LM head: 3,167 (8 x 512 x 4: 3,111)
    },
}
_BY_CARD = os.environ.get("DIST_LLM_GEMV_CARD", "1")  # "0": the rule on every card (A/B runs)
_POW2 = (4, 8, 16, 32, 64, 128, 256, 512, 1024)


def load_card_table(path: str) -> dict[str, dict[tuple[int, int], tuple[int, int, int]]]:
    """A card's one-row configs from a JSON file that `benchmarks/sweep_gemv.py --write_table` wrote on that card:
    {"card": "<device name, less 'NVIDIA '>", "one_row": [[N, K, BLOCK_N, BLOCK_K, num_warps], ...]}. Given as
    DIST_LLM_GEMV_TABLE, it takes precedence over the built-in table on every GPU whose name contains its card."""
    hint = "write one on the GPU with: python benchmarks/sweep_gemv.py --output_dir DIR --write_table FILE"
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"DIST_LLM_GEMV_TABLE={path}: cannot read it ({type(e).__name__}: {e}); {hint}") from None
    card_name, rows = (data.get("card"), data.get("one_row")) if isinstance(data, dict) else (None, None)
    if not isinstance(card_name, str) or not card_name or not isinstance(rows, list):
        raise ValueError(
            f'DIST_LLM_GEMV_TABLE={path}: expected {{"card": str, "one_row": [[N, K, BLOCK_N, '
            f"BLOCK_K, num_warps], ...]}}; {hint}"
        )
    table = {}
    for row in rows:
        ok = isinstance(row, list) and len(row) == 5 and all(isinstance(v, int) and v > 0 for v in row)
        if not ok or row[2] not in _POW2 or row[3] not in _POW2 or row[4] not in (1, 2, 4, 8, 16):
            raise ValueError(
                f"DIST_LLM_GEMV_TABLE={path}: bad entry {row!r}: want [N, K, BLOCK_N, BLOCK_K, "
                "num_warps], BLOCK_N and BLOCK_K powers of two (4-1024), num_warps 1-16; " + hint
            )
        table[row[0], row[1]] = tuple(row[2:])
    return {card_name: table}


def _with_file_table(builtin: dict, path: str | None) -> dict:
    """The built-in tables, with DIST_LLM_GEMV_TABLE's card first (matched first, see `_card_of`)."""
    if not path:
        return builtin
    table = load_card_table(path)
    return {**table, **{k: v for k, v in builtin.items() if k not in table}}


_TUNED_ONE_ROW_BY_CARD = _with_file_table(_TUNED_ONE_ROW_BY_CARD, os.environ.get("DIST_LLM_GEMV_TABLE"))


@functools.cache
def _card_of(index: int) -> str:
    name = torch.cuda.get_device_name(index)
    return next((card for card in _TUNED_ONE_ROW_BY_CARD if card in name), "")


def card(device: torch.device) -> str:
    """The key of `_TUNED_ONE_ROW_BY_CARD` that names this GPU ("" for others, the CPU, and DIST_LLM_GEMV_CARD=0)."""
    if device.type != "cuda" or _BY_CARD == "0":
        return ""
    return _card_of(device.index if device.index is not None else torch.cuda.current_device())


def launch_config(x: torch.Tensor, n: int, k: int) -> tuple[int, int, int]:
    """`_config` for x [M, K] against an [n, k] weight on x's device (its card's table, if it has one): what every
    launch of `_gemv_kernel` takes, and what sizes the norm fold's per-program partials."""
    return _config(x.shape[0], n, k, x.element_size(), card(x.device))


def _config(m: int, n: int, k: int, elem_bytes: int = 2, card: str = "") -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps), a fixed function of the shape.

    One row of 16-bit weights (decode at batch 1), by the aspect of the weight; each is the best of a sweep
    of BLOCK_N 4-32, BLOCK_K 256-1024, 4/8 warps and 2-4 stages in CUDA graphs with PDL, on an H200 at the
    Llama-2-7B shapes (2026-11-28, `benchmarks/sweep_gemv.py`, table in docs/performance.md). There it
    reads 3.8-4.35 TB/s against 3.3-4.1 for the earlier single rule:
      K >= 2N       (down: 4096 x 11008)   8 rows x 1024, 4 warps: 512 programs with 16 KiB chunks
      N <= K        (o: 4096 x 4096)       16 rows x 1024, 8 warps: 256 fat programs
      K < N <= 4K   (qkv: 12288 x 4096)    32 rows x 256, 4 warps
      N > 4K        (gate_up, LM head)     8 rows x 512, 4 warps: thousands of programs
    Each keeps BLOCK_N * BLOCK_K / (32 * num_warps) = 64 fp32 accumulator registers per thread or fewer.
    Shapes in `_TUNED_ONE_ROW` (other layouts' shards, where the rule is far off) take their measured best, and
    on a card of `_TUNED_ONE_ROW_BY_CARD` (`card`; launches pass theirs through `launch_config`) so do the shapes it
    lists.
    More rows, or fp32: BLOCK_K = 512 at 8 warps, BLOCK_N = 8 (16 for wide N at M <= 2), so that
    M * BLOCK_N * 2 accumulator registers per thread stay <= 64."""
    if m == 1 and elem_bytes == 2 and (n, k) in _TUNED_ONE_ROW_BY_CARD.get(card, {}):
        block_n, block_k, num_warps = _TUNED_ONE_ROW_BY_CARD[card][n, k]
    elif m == 1 and elem_bytes == 2 and (n, k) in _TUNED_ONE_ROW:
        block_n, block_k, num_warps = _TUNED_ONE_ROW[n, k]
    elif m == 1 and elem_bytes == 2:
        if k >= 2 * n:
            block_n, block_k, num_warps = 8, 1024, 4
        elif n <= k:
            block_n, block_k, num_warps = 16, 1024, 8
        elif n <= 4 * k:
            block_n, block_k, num_warps = 32, 256, 4
        else:
            block_n, block_k, num_warps = 8, 512, 4
    else:
        block_n, block_k, num_warps = (16 if n > _WIDE_N and m <= 2 else 8), 512, 8
    return block_n, min(block_k, _MAX_BLOCK_K, triton.next_power_of_2(k)), num_warps


# Full weight chunks a program loads before `pdl_wait` (at most 3; DIST_LLM_GEMV_PREFETCH, default 1). More
# keeps HBM busy for longer under the previous kernel's tail (decode attention and the all-reduces are latency
# bound), at the cost of registers; the sums are the same bits whatever the count. Not timed above 1 yet.
def _prefetch_setting() -> int:
    value = os.environ.get("DIST_LLM_GEMV_PREFETCH", "1")
    if value not in ("0", "1", "2", "3"):
        raise ValueError(f"DIST_LLM_GEMV_PREFETCH={value!r}: give 0, 1, 2 or 3 (weight chunks loaded before the wait)")
    return int(value)


PREFETCH_CHUNKS = _prefetch_setting()


def prefetch_chunks(k: int, block_k: int) -> int:
    """The PREFETCH of a launch: PREFETCH_CHUNKS, or fewer where K holds fewer full chunks."""
    return min(PREFETCH_CHUNKS, k // block_k)


ACTIVATIONS = (None, "silu_and_mul")


def gemv_supported(x: torch.Tensor, weight: torch.Tensor, act: str | None = None) -> bool:
    """Whether `gemv(x, weight, ..., act=act)` can stand in for F.linear: x [1..MAX_M, K] (with
    act="silu_and_mul", [gate | up] of [1..MAX_M, 2K]) and weight [N, K] of one float dtype (fp32/fp16/bf16),
    both contiguous along K (x's row stride is free), on a CUDA device (or on the CPU under
    TRITON_INTERPRET=1)."""
    return (
        x.dim() == 2
        and weight.dim() == 2
        and act in ACTIVATIONS
        and 1 <= x.shape[0] <= MAX_M
        and x.shape[1] == weight.shape[1] * (2 if act else 1)
        and weight.shape[1] >= 1
        and weight.shape[0] >= 1
        and x.dtype == weight.dtype
        and x.dtype in _DTYPES
        and x.stride(1) == 1
        and weight.stride(1) == 1
        and x.device == weight.device
        and (x.device.type == "cuda" or (_INTERPRET and x.device.type == "cpu"))
    )


def gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    act: str | None = None,
    norm: tuple[torch.Tensor, float] | None = None,
):
    """out [M, N] = x [M, K] @ weight [N, K]ᵀ + bias [N], fp32 accumulation, in x.dtype.

    act="silu_and_mul": x is [M, 2K] = [gate | up] and the product is taken with silu(gate) * up, computed
    and rounded exactly as `activation.silu_and_mul` does (the down projection without its input pass).
    norm=(partials, eps), one row: x is a residual times an RMSNorm weight, as `gemv_norm.gemv_add_norm`
    leaves it, and the sums are scaled by rsqrt(partials.sum() / K + eps) before the bias (the norm folded in).
    Needs `gemv_supported(x, weight, act)`; `out` may be a view with any row stride (last dim contiguous).
    With `out` given nothing is allocated, so the call can be captured in a CUDA graph.
    """
    assert norm is None or (x.shape[0] == 1 and act is None), "norm= takes one row and no act"
    return launch(x, weight, bias, out, act, **norm_in_kwargs(norm, x.device))


# The norm fold's epilogues (`gemv_norm.py`) need more registers than the plain kernel at two 4-warp configs, which
# would cost a program an SM: 8 x 1024 (7B's down projection) 128 -> 168, so 3 programs an SM instead of 4 and 512
# programs in two waves on 132 SMs; 8 x 512 (gate_up, LM head) 79 -> 91, 5 instead of 6. Capped at the plain
# kernel's count (rounded up to 8), ptxas fits them without spilling (`python benchmarks/sass_gemv.py`, sm_90).
# DIST_LLM_GEMV_NORM_CAP=0 lifts the caps, for A/B timing.
_FOLD_MAX_REGISTERS = {(8, 1024, 4): 128, (8, 512, 4): 80}
_FOLD_CAP = os.environ.get("DIST_LLM_GEMV_NORM_CAP", "1") != "0"


def norm_in_kwargs(norm: tuple[torch.Tensor, float] | None, device: torch.device) -> dict:
    """The `_gemv_kernel` keywords of NORM_IN for norm=(partials, eps) (none for None)."""
    if norm is None:
        return {}
    partials, eps = norm
    assert partials.dim() == 1 and partials.dtype == torch.float32 and partials.stride(0) == 1, "partials: fp32 [P]"
    assert partials.device == device and partials.numel() >= 1
    return dict(
        NORM_IN=True, part_in_ptr=partials, num_parts=partials.numel(), eps=float(eps),
        PARTS_BLOCK=triton.next_power_of_2(partials.numel()),
    )  # fmt: skip


def launch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor | None,
           act: str | None = None, **epilogue) -> torch.Tensor:  # fmt: skip
    """`gemv` with extra `_gemv_kernel` keywords (`gemv_norm.py`'s epilogue), grid one program per BLOCK_N
    rows: checks the operands, allocates `out` if None, launches, returns `out`."""
    assert gemv_supported(x, weight, act), (
        f"gemv cannot take act={act!r}, x {tuple(x.shape)} {x.dtype} strides {x.stride()} on {x.device} with weight "
        f"{tuple(weight.shape)} {weight.dtype} strides {weight.stride()} on {weight.device} (see gemv_supported)"
    )
    m, k = x.shape[0], weight.shape[1]
    n = weight.shape[0]
    if bias is not None:
        assert bias.shape == (n,) and bias.stride(0) == 1, f"bias must be contiguous [{n}], got {tuple(bias.shape)}"
        assert bias.device == x.device and bias.dtype.is_floating_point
    if out is None:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    assert out.shape == (m, n) and out.dtype == x.dtype and out.device == x.device, "out must be [M, N] in x.dtype"
    assert out.stride(1) == 1 or n == 1, f"out must be contiguous in its last dim, strides {out.stride()}"
    block_n, block_k, num_warps = launch_config(x, n, k)
    cap = _FOLD_MAX_REGISTERS.get((block_n, block_k, num_warps)) if x.is_cuda and _FOLD_CAP else None
    if cap and (epilogue.get("ADD_NORM") or epilogue.get("NORM_IN")):
        epilogue = {**epilogue, "maxnreg": cap}
    pdl = pdl_launch_kwargs(x.device)
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x, weight, weight if bias is None else bias, out,  # the bias pointer is not read without a bias
        n, k,
        x.stride(0), weight.stride(0), out.stride(0),
        M=m, BLOCK_N=block_n, BLOCK_K=block_k, EVEN_K=k % block_k == 0, HAS_BIAS=bias is not None,
        # PREFETCH also without PDL, so that the CPU tests run the peeled path
        PREFETCH=prefetch_chunks(k, block_k), SILU_MUL=act == "silu_and_mul", **pdl,
        num_warps=num_warps, num_stages=_NUM_STAGES, **epilogue,
    )  # fmt: skip
    return out
