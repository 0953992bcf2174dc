"""Causal context attention over a paged KV cache (FlashAttention-2 forward, varlen + paged).

Queries are packed over the batch ([T, Hq, D], `cu_seqlens_q`); sequence i's q_len_i queries are the
*last* q_len_i positions of its context of seq_lens[i] tokens, whose K/V (earlier chunks, reused prefix
blocks and this step's tokens alike) are all in the paged cache already. So chunked prefill, prefix
reuse and decode rows inside a mixed batch need no copies.

A program owns BLOCK_M queries of one sequence and one query head. It walks the context in tiles of
BLOCK_N tokens, gathering each tile's rows through the block table: first the tiles every query of
the block may see (no masks), then the few tiles that cross the causal diagonal (masked). Tiles above
the diagonal are never loaded. Query blocks are scheduled longest-first (reversed program id 0).

An fp8 cache (torch.float8_e4m3fn) holds K / k_scale and V / v_scale: its tiles are converted to q's
dtype as they load (exact), k_scale is folded into the score scale and v_scale multiplies the output
once. Other caches pass v_scale None (constexpr), so their kernel compiles as without fp8.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dist_llm.kernels._attention_common import LOG2E, check_attention_caches, dot_precision


@triton.jit
def _load_tile(ptrs, mask, USE_MASK: tl.constexpr):
    if USE_MASK:
        return tl.load(ptrs, mask=mask, other=0.0)
    else:
        return tl.load(ptrs)


@triton.jit
def _attend_tiles(acc, m_i, l_i, q, q_pos, k_base, v_base, bt_row, lo, hi, seq_len, qk_scale, d_mask,
                  stride_btm, stride_kb, stride_kt, stride_vb, stride_vt,
                  BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
                  EVEN_D: tl.constexpr, PRECISION: tl.constexpr):
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        if MASKED:
            valid = offs_n < seq_len
            phys = tl.load(bt_row + (offs_n // BLOCK_SIZE) * stride_btm, mask=valid, other=0).to(tl.int64)
            kv_mask = valid[:, None] & d_mask[None, :]
        else:
            phys = tl.load(bt_row + (offs_n // BLOCK_SIZE) * stride_btm).to(tl.int64)
            kv_mask = d_mask[None, :]
        slot = offs_n % BLOCK_SIZE
        k_ptrs = k_base + (phys * stride_kb + slot * stride_kt)[:, None]
        k = _load_tile(k_ptrs, kv_mask, MASKED or not EVEN_D).to(q.dtype)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        if MASKED:  # tl.where, not a multiply: 0 * NaN would poison the row
            causal = (offs_n[None, :] <= q_pos[:, None]) & (offs_n < seq_len)[None, :]
            s = tl.where(causal, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s * qk_scale - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v_ptrs = v_base + (phys * stride_vb + slot * stride_vt)[:, None]
        v = _load_tile(v_ptrs, kv_mask, MASKED or not EVEN_D).to(q.dtype)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v, input_precision=PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit(do_not_specialize=["first_row"])  # a value that changes every step: no recompiles for it
def _context_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, cu_seqlens_q_ptr, out_ptr,
    qk_scale, v_scale, first_row,
    stride_qt, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    stride_btb, stride_btm,
    stride_ot, stride_oh, stride_od,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):
    m_block = tl.num_programs(0) - 1 - tl.program_id(0)  # the longest (latest) query blocks first
    h = tl.program_id(1)
    b = tl.program_id(2) + first_row
    q_start = tl.load(cu_seqlens_q_ptr + b)
    q_len = tl.load(cu_seqlens_q_ptr + b + 1) - q_start
    if m_block * BLOCK_M >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + b)
    first = seq_len - q_len + m_block * BLOCK_M  # context position of this block's first query

    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < q_len
    d_mask = offs_d < HEAD_DIM
    q_rows = (q_start + offs_m).to(tl.int64)
    q_ptrs = q_ptr + q_rows[:, None] * stride_qt + h * stride_qh + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=m_mask[:, None] & d_mask[None, :], other=0.0)
    if PRECISION == "ieee":
        q = q.to(tl.float32)
    q_pos = first + tl.arange(0, BLOCK_M)

    kvh = h // GROUP
    bt_row = block_tables_ptr + b * stride_btb
    k_base = k_cache_ptr + kvh * stride_kh + offs_d[None, :] * stride_kd
    v_base = v_cache_ptr + kvh * stride_vh + offs_d[None, :] * stride_vd
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # Tiles [0, full) lie at or below every query's diagonal (and below seq_len): no masks. The first
    # tile processed always holds key 0, so every row's running max is finite from then on.
    full = ((first + 1) // BLOCK_N) * BLOCK_N
    hi = tl.minimum(seq_len, first + BLOCK_M)
    acc, m_i, l_i = _attend_tiles(acc, m_i, l_i, q, q_pos, k_base, v_base, bt_row, 0, full, seq_len,
                                  qk_scale, d_mask, stride_btm, stride_kb, stride_kt, stride_vb, stride_vt,
                                  BLOCK_SIZE, BLOCK_N, False, HEAD_DIM == BLOCK_D, PRECISION)
    acc, m_i, l_i = _attend_tiles(acc, m_i, l_i, q, q_pos, k_base, v_base, bt_row, full, hi, seq_len,
                                  qk_scale, d_mask, stride_btm, stride_kb, stride_kt, stride_vb, stride_vt,
                                  BLOCK_SIZE, BLOCK_N, True, HEAD_DIM == BLOCK_D, PRECISION)
    if k_cache_ptr.dtype.element_ty == tl.float8e4nv:
        acc = acc * v_scale

    o_ptrs = out_ptr + q_rows[:, None] * stride_ot + h * stride_oh + offs_d[None, :] * stride_od
    o_mask = m_mask[:, None] & d_mask[None, :]
    tl.store(o_ptrs, (acc / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=o_mask)


def _launch_config(head_dim: int, dtype: torch.dtype, max_seqlen_q: int):
    """64x64 tiles, 4 warps, 2 stages: on an H200 (Triton 3.6, 2026-11) causal 4k bf16 D=128 prefill
    ran at 312 TFLOP/s with them, 310 with 128x128 / 8 warps / 3 stages, 265 with 128x64 / 8 warps.
    Short chunks (and decode rows) get a query block just large enough; fp32 halves the K/V tile.
    `dtype` is q's; an fp8 cache takes the 16-bit tiles (not timed: its K/V tiles are half the bytes)."""
    block_d = triton.next_power_of_2(head_dim)
    if dtype == torch.float32:
        block_m, block_n, num_warps, num_stages = 64, 32, 4, 2
    else:
        block_m, block_n, num_warps, num_stages = 64, 64, 4, 2
    block_m = min(block_m, max(16, triton.next_power_of_2(max_seqlen_q)))
    return block_d, block_m, block_n, num_warps, num_stages


def context_attention(
    q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, max_seqlen_q, scale, out, k_scale: float = 1.0,
    v_scale: float = 1.0, first_row: int = 0,
):  # fmt: skip
    """q, out [T, Hq, D] packed by `cu_seqlens_q` (int32 [B+1]); caches [num_blocks, block_size, Hk, D] of
    q's dtype, or fp8 holding K / k_scale and V / v_scale; block_tables int32 [B, M]; seq_lens int32 [B];
    `max_seqlen_q` (host int) bounds every q_len of the rows served. Rows below `first_row` are left alone
    (a mixed step's decode rows, which the decode kernel serves): a scalar, not sliced tensors, because Triton
    specialises pointers on their 16-byte alignment and a slice at a row that changes every step would compile
    new variants mid-run."""
    num_tokens, num_heads, head_dim = q.shape
    num_blocks, block_size, num_kv_heads, _ = k_cache.shape
    batch = seq_lens.shape[0]
    assert k_cache.shape == v_cache.shape and k_cache.shape[3] == head_dim, (q.shape, k_cache.shape)
    assert num_heads % num_kv_heads == 0, (num_heads, num_kv_heads)
    assert out.shape == q.shape, (out.shape, q.shape)
    fp8 = check_attention_caches(q, k_cache, v_cache, float(k_scale), float(v_scale))
    assert block_tables.dtype == torch.int32 and block_tables.dim() == 2 and block_tables.shape[0] == batch
    assert seq_lens.dtype == torch.int32 and seq_lens.is_contiguous()
    assert cu_seqlens_q.dtype == torch.int32 and cu_seqlens_q.shape == (batch + 1,)
    assert cu_seqlens_q.is_contiguous()
    for t in (q, k_cache, v_cache, out):
        assert t.stride(-1) == 1, "head_dim must be contiguous"
    if not 0 <= first_row <= batch:
        raise ValueError(f"first_row {first_row} is outside the batch of {batch} rows")
    if num_tokens == 0 or batch == first_row or max_seqlen_q <= 0:
        return out
    block_d, block_m, block_n, num_warps, num_stages = _launch_config(head_dim, q.dtype, int(max_seqlen_q))
    grid = (triton.cdiv(int(max_seqlen_q), block_m), num_heads, batch - first_row)
    _context_attention_kernel[grid](
        q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, out,
        float(scale) * LOG2E * float(k_scale), float(v_scale) if fp8 else None, int(first_row),
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *block_tables.stride(), *out.stride(),
        GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_SIZE=block_size,
        BLOCK_M=block_m, BLOCK_N=block_n, PRECISION=dot_precision(q.dtype),
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return out
