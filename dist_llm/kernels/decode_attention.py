"""Paged decode attention: one query token per sequence against its paged K/V cache (flash-decoding).

Pass 1 runs a program per (sequence, KV head, partition). A partition is `partition_size` consecutive
tokens of the context; the program streams its K/V through the block table in tiles of BLOCK_N tokens
and keeps an online softmax for *all* query heads of the KV group at once (the rows of a tl.dot tile,
padded to 16), so each K/V tile is loaded once per group. It writes the partition's normalised
output and its log-sum-exp (base 2) to the workspace. Pass 2 runs a program per (sequence, query
head) and merges the partitions by their lse.

The number of partitions comes from static shapes only (the batch size, block_tables.shape[1] *
block_size and the workspace), never from `seq_lens`, so the call can be captured in a CUDA graph: a
large batch gets one partition per sequence (and no pass 2), a small one up to max_ctx / 64 of them, so
that a batch-1 step still spreads over the SMs. Partitions that start
at or past a sequence's length write lse = -inf and no output; the reduction only reads partitions
below the sequence's length. When the block table spans a single partition, pass 1 writes `out`
directly and pass 2 is skipped.

An fp8 cache (torch.float8_e4m3fn; q stays 16-bit or fp32) holds K / k_scale and V / v_scale. Its tiles
are converted to q's dtype as they load (exact), k_scale is folded into the score scale and v_scale
multiplies each partition's output once (the merge is linear), so the inner loop only adds the
conversion. Other caches pass v_scale None (constexpr): their kernel compiles as without fp8.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from dist_llm.kernels._attention_common import LOG2E, check_attention_caches, dot_precision
from dist_llm.kernels._pdl import pdl_launch_kwargs, pdl_wait

DEFAULT_PARTITION_SIZE = 1024
# "BLOCK_N,num_warps,num_stages" for the 16-bit launches, for sweeps (benchmarks/sweep_decode_attention.py)
_CONFIG_OVERRIDE = os.environ.get("DIST_LLM_DECODE_ATTN_CONFIG", "")
# an fp8 cache with 16-bit q: both products in fp16 ("f16": e4m3 -> f16 is one packed cvt, and q, p in [0, 1]
# fit fp16), or in q's dtype ("q": bf16 costs a second cvt per element); for A/B runs
_FP8_DOT = os.environ.get("DIST_LLM_FP8_ATTN_DOT", "f16")
# "1" (default): pass-1 programs of partitions past the context exit before the PDL wait; "0": after it (A/B runs)
_EARLY_EXIT = os.environ.get("DIST_LLM_DECODE_ATTN_EARLY_EXIT", "1")
# "tile" (default): a K/V tile inside one block takes one block-table entry; "token": every token looks up its own
# block, as a tile spanning blocks must (A/B runs)
_GATHER = os.environ.get("DIST_LLM_DECODE_ATTN_GATHER", "tile")


@triton.jit
def _decode_partition_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, out_ptr, part_out_ptr, part_lse_ptr,
    qk_scale, partition_size, v_scale,
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    stride_btb, stride_btm,
    stride_ob, stride_oh, stride_od,
    stride_pob, stride_poh, stride_pos, stride_pod,
    stride_plb, stride_plh, stride_pls,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, SINGLE: tl.constexpr, PRECISION: tl.constexpr,
    USE_PDL: tl.constexpr, DOT_F16: tl.constexpr, EARLY_EXIT: tl.constexpr, TILE_IN_BLOCK: tl.constexpr,
):
    kvh = tl.program_id(0)  # heads fastest: programs running together read whole token rows
    b = tl.program_id(1)
    split = tl.program_id(2)
    if EARLY_EXIT:
        # seq_lens is an input of the step that none of its kernels writes (PDL's contract allows such loads
        # before the wait): the programs of partitions past the context exit at once, while the previous kernel
        # still runs, instead of holding a slot until it is done
        seq_len = tl.load(seq_lens_ptr + b)
        if split * partition_size < seq_len:
            pdl_wait(USE_PDL)
    else:
        pdl_wait(USE_PDL)
        seq_len = tl.load(seq_lens_ptr + b)
    start = split * partition_size
    end = tl.minimum(start + partition_size, seq_len)

    if start < seq_len:  # partitions past the context write nothing: the reduction reads only the live ones
        # The query heads of this KV group are the rows of a [BLOCK_G >= 16, D] tile, padded with zeros,
        # so both products run on the tensor cores and each K/V tile is loaded once for the whole group.
        offs_g = tl.arange(0, BLOCK_G)
        offs_d = tl.arange(0, BLOCK_D)
        heads = kvh * GROUP + offs_g
        g_mask = offs_g < GROUP
        d_mask = offs_d < HEAD_DIM
        q_ptrs = q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd
        q = tl.load(q_ptrs, mask=g_mask[:, None] & d_mask[None, :], other=0.0)
        if PRECISION == "ieee":
            q = q.to(tl.float32)
        if DOT_F16:  # fp8 cache: the products in fp16
            q = q.to(tl.float16)
        bt_row = block_tables_ptr + b * stride_btb
        k_base = k_cache_ptr + kvh * stride_kh + offs_d[None, :] * stride_kd
        v_base = v_cache_ptr + kvh * stride_vh + offs_d[None, :] * stride_vd

        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        for n0 in range(start, end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            valid = offs_n < end
            kv_mask = valid[:, None] & d_mask[None, :]
            if TILE_IN_BLOCK:  # BLOCK_N divides the block size and tiles start at multiples of BLOCK_N, so the
                # tile lies in one block: one block-table entry and affine row offsets, not a gather per token
                phys = tl.load(bt_row + (n0 // BLOCK_SIZE) * stride_btm).to(tl.int64)
                slot = n0 % BLOCK_SIZE + tl.arange(0, BLOCK_N)
            else:  # a tile spans blocks: each token finds its own
                phys = tl.load(bt_row + (offs_n // BLOCK_SIZE) * stride_btm, mask=valid, other=0).to(tl.int64)
                slot = offs_n % BLOCK_SIZE
            k = tl.load(k_base + (phys * stride_kb + slot * stride_kt)[:, None], mask=kv_mask, other=0.0)
            s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=PRECISION)
            s = tl.where(valid[None, :], s, float("-inf"))  # not a multiply: 0 * NaN would poison the row
            m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s * qk_scale - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_base + (phys * stride_vb + slot * stride_vt)[:, None], mask=kv_mask, other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=PRECISION)
            m_i = m_new
        if k_cache_ptr.dtype.element_ty == tl.float8e4nv:
            acc = acc * v_scale

        o_mask = g_mask[:, None] & d_mask[None, :]
        if SINGLE:
            o_ptrs = out_ptr + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :] * stride_od
            tl.store(o_ptrs, (acc / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=o_mask)
        else:
            # (l_i = 0 cannot happen here, as the partition holds a token; kept as the safe fallback)
            l_safe = tl.where(l_i > 0.0, l_i, 1.0)
            lse = tl.where(l_i > 0.0, m_i + tl.log2(l_safe), float("-inf"))
            tl.store(part_lse_ptr + b * stride_plb + heads * stride_plh + split * stride_pls, lse, mask=g_mask)
            po_ptrs = (part_out_ptr + b * stride_pob + heads[:, None] * stride_poh + split * stride_pos
                       + offs_d[None, :] * stride_pod)
            live = g_mask & (l_i > 0.0)
            tl.store(po_ptrs, acc / l_safe[:, None], mask=live[:, None] & d_mask[None, :])


@triton.jit
def _decode_reduce_kernel(
    part_out_ptr, part_lse_ptr, seq_lens_ptr, out_ptr, partition_size,
    stride_pob, stride_poh, stride_pos, stride_pod,
    stride_plb, stride_plh, stride_pls,
    stride_ob, stride_oh, stride_od,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, USE_PDL: tl.constexpr,
):
    pdl_wait(USE_PDL)
    h = tl.program_id(0)
    b = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + b)
    n_active = tl.cdiv(seq_len, partition_size)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    lse_row = part_lse_ptr + b * stride_plb + h * stride_plh
    lse = tl.load(lse_row + offs_s * stride_pls, mask=offs_s < n_active, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)  # every partial empty: weights 0, output 0 (never NaN)
    denom = tl.sum(tl.exp2(lse - m), 0)
    acc = tl.zeros([BLOCK_D], tl.float32)
    po_row = part_out_ptr + b * stride_pob + h * stride_poh + offs_d * stride_pod
    for s in range(0, n_active):
        lse_s = tl.load(lse_row + s * stride_pls)
        # o is not loaded under a mask that depends on lse_s, so the two loads of a step do not wait on each
        # other (an unwritten partition's words are dropped after); H200: up to 1 us a call at long contexts
        o = tl.load(po_row + s * stride_pos, mask=d_mask, other=0.0)
        o = tl.where(lse_s > float("-inf"), o, 0.0)
        acc += tl.exp2(lse_s - m) * o
    acc = acc / tl.where(denom > 0.0, denom, 1.0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_d * stride_od,
             acc.to(out_ptr.dtype.element_ty), mask=d_mask)


@dataclass
class DecodeWorkspace:
    """Partial results of the split-KV pass: `out` fp32 [max_batch, Hq, max_splits, D] (each partition's
    normalised output) and `lse` fp32 [max_batch, Hq, max_splits] (its log2-sum-exp2 of the scaled
    scores, i.e. the running max plus log2 of the running sum). A launch with a smaller batch views the
    same memory as [batch, Hq, more splits, D] (`views`): small batches get more partitions."""

    out: torch.Tensor
    lse: torch.Tensor
    partition_size: int

    @classmethod
    def allocate(cls, max_batch: int, num_heads: int, head_dim: int, max_seq_len: int, device,
                 partition_size: int = DEFAULT_PARTITION_SIZE) -> DecodeWorkspace:
        assert partition_size >= 16 and partition_size & (partition_size - 1) == 0, partition_size
        max_splits = max(1, math.ceil(max_seq_len / partition_size))
        # rows enough for one sequence to split its longest context into 64-token partitions
        rows = max(max_batch, math.ceil(math.ceil(max_seq_len / 64) / max_splits))
        out = torch.empty(rows, num_heads, max_splits, head_dim, dtype=torch.float32, device=device)
        lse = torch.empty(rows, num_heads, max_splits, dtype=torch.float32, device=device)
        return cls(out, lse, partition_size)

    @property
    def max_splits(self) -> int:
        return self.lse.shape[2]

    @property
    def capacity(self) -> int:
        """(sequence, partition) rows it holds: a batch of B can use capacity // B partitions each."""
        return self.lse.shape[0] * self.lse.shape[2]

    def views(self, batch: int, num_splits: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The buffers as [batch, Hq, num_splits, D] and [batch, Hq, num_splits] (contiguous prefixes)."""
        assert batch * num_splits <= self.capacity, (batch, num_splits, self.capacity)
        _, heads, _, dim = self.out.shape
        out = self.out.view(-1)[: batch * heads * num_splits * dim].view(batch, heads, num_splits, dim)
        lse = self.lse.view(-1)[: batch * heads * num_splits].view(batch, heads, num_splits)
        return out, lse


def parse_config(text: str) -> tuple[int, int, int]:
    """'BLOCK_N,warps,stages' (DIST_LLM_DECODE_ATTN_CONFIG) as integers, or a ValueError that says the form."""
    fields = text.split(",")
    if len(fields) != 3 or not all(f.strip().isdigit() and int(f) > 0 for f in fields):
        raise ValueError(f"DIST_LLM_DECODE_ATTN_CONFIG must be 'BLOCK_N,warps,stages', e.g. '32,2,2', got {text!r}")
    block_n, num_warps, num_stages = (int(f) for f in fields)
    return block_n, num_warps, num_stages


def _launch_config(head_dim: int, block_size: int, group: int, dtype: torch.dtype, batch: int):
    """Tiles of 64 tokens, 4 warps, 3 stages, 1024-token partitions: on an H200 (Triton 3.6, 2026-11)
    the B=32, 2k-context, D=128 bf16 decode read K+V at 97-98% (MHA) and 58-77% (GQA 4:1, noisy run
    to run) of the copy bandwidth with them; 256/512-token partitions were no faster anywhere.
    Padding an MHA head to 16 rows for tl.dot beat elementwise mul+sum (at best 70% there): loads
    that feed a dot get software-pipelined.

    From batch 32 on, 16-bit launches take 32-token tiles, 2 warps and 2 stages: more programs per SM
    where every sequence is one program (`benchmarks/sweep_decode_attention.py`, H200, 2026-11-28 09:08:
    1.05x at batch 64 and at batch 256 with GQA, 0.98x at batch 32 x 2k; in the model at batch 256 the
    decode step's kernels took 9.9 ms instead of 11.3, and batch 64 decoded 161 tok/s instead of 153).

    `dtype` is q's (the dot operands' dtype). An fp8 cache takes the 16-bit tiles as they are (not timed):
    its K/V tiles are half the bytes, so they fit wherever the 16-bit ones do.

    Returns (BLOCK_D, BLOCK_N, BLOCK_G, num_warps, num_stages)."""
    block_d = triton.next_power_of_2(head_dim)
    block_g = max(16, triton.next_power_of_2(group))
    if _CONFIG_OVERRIDE and dtype != torch.float32:  # sweeps and A/B runs only
        block_n, num_warps, num_stages = parse_config(_CONFIG_OVERRIDE)
        return block_d, block_n, block_g, num_warps, num_stages
    if dtype == torch.float32:  # keep the pipelined fp32 tiles within shared memory
        block_n, num_warps, num_stages = 32, 4, 2
    elif batch >= 32:  # a tile may span blocks: each token finds its own block
        return block_d, 32, block_g, 2, 2
    else:
        block_n, num_warps, num_stages = 64, 4, 3
    return block_d, max(block_n, block_size), block_g, num_warps, num_stages


def _target_programs() -> int:
    """Pass-1 programs to aim for: several per SM, so a small batch still fills the GPU (1024).
    DIST_LLM_DECODE_ATTN_PROGRAMS overrides it, for A/B runs: at or below the KV heads of a batch-1 step it
    asks for one partition, i.e. a single pass with no reduction."""
    raw = os.environ.get("DIST_LLM_DECODE_ATTN_PROGRAMS", "1024")
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"DIST_LLM_DECODE_ATTN_PROGRAMS must be a positive integer, got {raw!r}")
    return int(raw)


TARGET_PROGRAMS = _target_programs()


def _split_plan(batch: int, num_kv_heads: int, max_ctx: int, block_n: int, workspace) -> tuple[int, int]:
    """(number of partitions, partition size in tokens). A large batch already gives every SM work: one
    partition per sequence, and no reduction pass. A small one splits each context into up to
    max_ctx / block_n partitions, as many as the workspace holds (its rows are shared out by batch)."""
    want = max(1, triton.cdiv(TARGET_PROGRAMS, batch * num_kv_heads))
    splits = min(want, triton.cdiv(max_ctx, block_n))
    if workspace is not None:
        splits = max(1, min(splits, workspace.capacity // batch))
    partition = triton.cdiv(triton.cdiv(max_ctx, splits), block_n) * block_n  # whole tiles
    return triton.cdiv(max_ctx, partition), partition


def _env_choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    """An A/B knob's value, checked: a typo must fail loudly, not fall back to a default."""
    if value not in choices:
        raise ValueError(f"{name} must be {' or '.join(choices)}, got {value!r}")
    return value


def _early_exit() -> bool:
    return _env_choice("DIST_LLM_DECODE_ATTN_EARLY_EXIT", _EARLY_EXIT, ("0", "1")) == "1"


def _tile_gather() -> bool:
    return _env_choice("DIST_LLM_DECODE_ATTN_GATHER", _GATHER, ("tile", "token")) == "tile"


def _fp8_dot() -> str:
    return _env_choice("DIST_LLM_FP8_ATTN_DOT", _FP8_DOT, ("f16", "q"))


def _launch(q, k_cache, v_cache, block_tables, seq_lens, scale, out, workspace, k_scale, v_scale):
    batch, num_heads, head_dim = q.shape
    num_blocks, block_size, num_kv_heads, _ = k_cache.shape
    assert k_cache.shape == v_cache.shape and k_cache.shape[3] == head_dim, (q.shape, k_cache.shape)
    assert num_heads % num_kv_heads == 0, (num_heads, num_kv_heads)
    assert out.shape == q.shape, (out.shape, q.shape)
    fp8 = check_attention_caches(q, k_cache, v_cache, k_scale, v_scale)
    assert block_tables.dtype == torch.int32 and block_tables.dim() == 2 and block_tables.shape[0] == batch
    assert seq_lens.dtype == torch.int32 and seq_lens.shape == (batch,) and seq_lens.is_contiguous()
    for t in (q, k_cache, v_cache, out):
        assert t.stride(-1) == 1, "head_dim must be contiguous"
    if batch == 0:
        return out
    group = num_heads // num_kv_heads
    block_d, block_n, block_g, num_warps, num_stages = _launch_config(head_dim, block_size, group, q.dtype, batch)

    # Partitions cover the whole block table; their count is a function of shapes only (graph-safe).
    max_ctx = block_tables.shape[1] * block_size
    num_splits, partition = _split_plan(batch, num_kv_heads, max_ctx, block_n, workspace)
    single = num_splits == 1
    if not single and workspace is None:
        workspace = DecodeWorkspace.allocate(batch, num_heads, head_dim, max_ctx, q.device, partition)
    if single:
        part_out, part_lse = out, seq_lens  # unused placeholders
        po_strides, pl_strides = (0, 0, 0, 0), (0, 0, 0)
    else:
        part_out, part_lse = workspace.views(batch, num_splits)
        assert part_out.shape[1] == num_heads and part_out.shape[3] == head_dim, (part_out.shape, q.shape)
        assert part_out.device == q.device and part_out.dtype == part_lse.dtype == torch.float32
        po_strides, pl_strides = part_out.stride(), part_lse.stride()

    qk_scale = scale * LOG2E * k_scale  # k_scale is 1.0 unless the cache is fp8
    pdl = pdl_launch_kwargs(q.device)
    precision = dot_precision(q.dtype)
    _decode_partition_kernel[(num_kv_heads, batch, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, out, part_out, part_lse,
        qk_scale, partition, float(v_scale) if fp8 else None,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *block_tables.stride(), *out.stride(),
        *po_strides, *pl_strides,
        GROUP=group, BLOCK_G=block_g, HEAD_DIM=head_dim, BLOCK_D=block_d,
        BLOCK_SIZE=block_size, BLOCK_N=block_n, SINGLE=single, PRECISION=precision,
        DOT_F16=fp8 and q.dtype == torch.bfloat16 and _fp8_dot() == "f16", EARLY_EXIT=_early_exit(),
        TILE_IN_BLOCK=_tile_gather() and block_size % block_n == 0, num_warps=num_warps, num_stages=num_stages, **pdl,
    )  # fmt: skip
    if not single:
        _decode_reduce_kernel[(num_heads, batch)](
            part_out, part_lse, seq_lens, out, partition,
            *po_strides, *pl_strides, *out.stride(),
            # one BLOCK_S (the lse vector's width) for every count up to 64: eager steps, whose partition counts
            # vary with their block tables, then reuse the variant the graphs compiled instead of compiling more
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_S=max(64, triton.next_power_of_2(num_splits)),
            num_warps=4 if block_d >= 128 else 2, **pdl,
        )  # fmt: skip
    return out


def paged_decode_attention(
    q, k_cache, v_cache, block_tables, seq_lens, scale, out, workspace=None, k_scale: float = 1.0,
    v_scale: float = 1.0,
):  # fmt: skip
    """q, out [B, Hq, D]; caches [num_blocks, block_size, Hk, D] of q's dtype, or fp8 holding K / k_scale and
    V / v_scale; block_tables int32 [B, M]; seq_lens int32 [B] (>= 1). With `workspace` (DecodeWorkspace)
    nothing is allocated. seq_lens is read before the PDL wait (DIST_LLM_DECODE_ATTN_EARLY_EXIT): it must be an
    input of the step, not the output of a kernel launched just before this call."""
    return _launch(q, k_cache, v_cache, block_tables, seq_lens, float(scale), out, workspace, float(k_scale),
                   float(v_scale))  # fmt: skip
