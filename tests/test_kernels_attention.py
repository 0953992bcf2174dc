"""Paged decode attention and paged causal context attention against reference.py.

Without CUDA the kernels run through Triton's interpreter (TRITON_INTERPRET=1 is set here before
anything imports triton) at small shapes; with CUDA the same cases run on the GPU, plus a few at
serving shapes. Every run starts from poison: outputs and workspaces are NaN, and so is every cache
slot no sequence owns (unused blocks, the tail of each last block, and the block-table entries past
a sequence's end point at NaN blocks), so an unwritten output or a read past seq_len fails.

The cases are a covering set, not a cross product: every head_dim, batch size, length, block size,
GQA ratio and dtype appears, in a few combinations.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from conftest import paged_layout  # noqa: E402

from dist_llm.kernels.decode_attention import DecodeWorkspace, paged_decode_attention  # noqa: E402
from dist_llm.kernels.prefill_attention import context_attention  # noqa: E402
from dist_llm.kernels.reference import context_attention_ref, paged_decode_attention_ref  # noqa: E402

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
TOL = {F32: (1e-4, 1e-4), F16: (4e-3, 4e-3), BF16: (2e-2, 2e-2)}
NAN = float("nan")


def close(actual, expected, dtype):
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol, equal_nan=False)


def paged_cache(seq_lens, block_size, num_kv_heads, head_dim, dtype, gen, extra_cols=2, poison_blocks=3):
    """K/V caches holding len_i random tokens per sequence in shuffled physical blocks, NaN elsewhere.

    Returns (k_cache, v_cache, block_tables int32 [B, M]) with M = max blocks needed + extra_cols; the
    table entries past a sequence's blocks point at NaN-only blocks."""
    num_blocks, table, slots = paged_layout(seq_lens, block_size, gen, extra_cols, poison_blocks)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(shape, NAN, dtype=dtype)
    v_cache = torch.full(shape, NAN, dtype=dtype)
    for s in slots:
        for cache in (k_cache, v_cache):
            x = torch.randn(len(s), num_kv_heads, head_dim, generator=gen)
            cache.view(-1, num_kv_heads, head_dim)[s] = x.to(dtype)
    return k_cache.to(DEVICE), v_cache.to(DEVICE), table.to(torch.int32).to(DEVICE)


def randn(*shape, dtype, gen):
    return torch.randn(*shape, generator=gen).to(dtype).to(DEVICE)


def strided(x, gen):
    """The same values as a view with a padded head stride (like q inside a fused qkv output)."""
    t, h, d = x.shape
    big = torch.full((t, h + 3, d), NAN, dtype=x.dtype, device=x.device)
    big[:, 1 : h + 1] = x
    return big[:, 1 : h + 1]


# ---- decode -----------------------------------------------------------------------------------------

MIXED7 = [1, 300, 17, 45, 2, 129, 64]
# (head_dim, seq_lens, block_size, (Hq, Hk), dtype, partition_size or None for workspace=None)
DECODE_CASES = [
    (64, [1, 17, 300], 16, (2, 2), F32, 64),
    (80, MIXED7, 64, (4, 1), F16, 128),
    (128, [300], 16, (8, 1), BF16, None),
    (128, [1, 17, 300], 64, (2, 2), BF16, 64),
    (64, MIXED7, 16, (8, 1), F16, None),
    (80, [1], 16, (3, 3), F32, 64),
    (80, [17, 300, 1], 64, (8, 2), F32, 128),
    (128, MIXED7, 32, (4, 4), F16, 256),
    (96, [300], 64, (4, 1), BF16, 64),
    (64, [17], 16, (8, 1), F32, None),
    (64, [1, 17, 40] * 11, 16, (2, 1), BF16, 64),  # batch >= 32: the 16-bit large-batch config
    (80, [3, 70] * 17, 64, (4, 4), F16, None),
]


def _decode_case(head_dim, seq_lens, block_size, heads, dtype, workspace, gen, extra_cols=2, scale=None,
                 strided_q=False, poison_ws=True):
    num_heads, num_kv_heads = heads
    k_cache, v_cache, table = paged_cache(seq_lens, block_size, num_kv_heads, head_dim, dtype, gen,
                                          extra_cols)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    q = randn(len(seq_lens), num_heads, head_dim, dtype=dtype, gen=gen)
    if strided_q:
        q = strided(q, gen)
    scale = head_dim**-0.5 if scale is None else scale
    expected = paged_decode_attention_ref(q, k_cache, v_cache, table, lens, scale, torch.empty_like(q))
    out = torch.full_like(q, NAN)
    if workspace is not None and poison_ws:
        workspace.out.fill_(NAN)
        workspace.lse.fill_(NAN)
    res = paged_decode_attention(q, k_cache, v_cache, table, lens, scale, out, workspace)
    assert res is out
    close(out, expected, dtype)


@pytest.mark.parametrize("head_dim,seq_lens,block_size,heads,dtype,partition", DECODE_CASES)
def test_paged_decode_attention(head_dim, seq_lens, block_size, heads, dtype, partition):
    gen = torch.Generator().manual_seed(hash((head_dim, block_size, heads)) % 2**31)
    ws = None
    if partition is not None:
        max_len = (max(seq_lens) // block_size + 3) * block_size
        ws = DecodeWorkspace.allocate(len(seq_lens), heads[0], head_dim, max_len, DEVICE, partition)
    _decode_case(head_dim, seq_lens, block_size, heads, dtype, ws, gen)


def test_decode_default_workspace_splits():
    """workspace=None with a block table longer than one default partition: the split path allocates."""
    gen = torch.Generator().manual_seed(1)
    _decode_case(64, [1100, 3, 1030], 64, (2, 1), F32, None, gen)


def test_decode_large_scores_strided_q():
    """Peaked softmax (scale 1: |scores| ~ 10) through the split path, q a strided view."""
    gen = torch.Generator().manual_seed(2)
    ws = DecodeWorkspace.allocate(3, 4, 64, 400, DEVICE, partition_size=64)
    _decode_case(64, [1, 17, 300], 16, (4, 2), F32, ws, gen, scale=1.0, strided_q=True)
    _decode_case(64, [1, 17, 300], 16, (4, 4), F16, ws, gen, scale=1.0, strided_q=True)


def test_decode_workspace_reuse():
    """One workspace (NaN-poisoned once), three calls with different batch sizes and lengths: the later
    calls run over the earlier calls' stale partials and the poison in partitions they do not fill."""
    gen = torch.Generator().manual_seed(3)
    ws = DecodeWorkspace.allocate(7, 4, 80, 400, DEVICE, partition_size=64)
    assert ws.out.shape == (7, 4, 7, 80) and ws.lse.shape == (7, 4, 7) and ws.max_splits == 7
    assert ws.out.dtype == ws.lse.dtype == torch.float32
    _decode_case(80, MIXED7, 16, (4, 1), BF16, ws, gen, extra_cols=1)
    _decode_case(80, [300, 1, 17], 16, (4, 1), BF16, ws, gen, extra_cols=0, poison_ws=False)
    # the block table may span fewer partitions than the workspace holds
    _decode_case(80, [17, 5], 16, (4, 1), BF16, ws, gen, extra_cols=0, poison_ws=False)


def test_decode_workspace_smaller_than_table():
    """A block table longer than the workspace's partitions cover: partitions grow, nothing is skipped."""
    gen = torch.Generator().manual_seed(4)
    ws = DecodeWorkspace.allocate(2, 2, 64, 128, DEVICE, partition_size=64)  # 2 splits
    _decode_case(64, [300, 17], 16, (2, 2), F32, ws, gen, extra_cols=4)


def test_decode_early_exit_both_ways(monkeypatch):
    """Pass-1 programs past the context read seq_lens before the PDL wait (DIST_LLM_DECODE_ATTN_EARLY_EXIT=1, the
    default) or after it (0): the same bits either way, and the switch takes 0 or 1 only."""
    import dist_llm.kernels.decode_attention as dec

    outs = []
    for switch in ("0", "1"):
        monkeypatch.setattr(dec, "_EARLY_EXIT", switch)
        gen = torch.Generator().manual_seed(5)
        k_cache, v_cache, table = paged_cache(MIXED7, 16, 2, 64, BF16, gen, extra_cols=6)
        q = randn(len(MIXED7), 4, 64, dtype=BF16, gen=gen)
        ws = DecodeWorkspace.allocate(len(MIXED7), 4, 64, table.shape[1] * 16, DEVICE, partition_size=32)
        lens = torch.tensor(MIXED7, dtype=torch.int32, device=DEVICE)
        outs.append(paged_decode_attention(q, k_cache, v_cache, table, lens, 0.125, torch.empty_like(q), ws))
    assert torch.equal(outs[0], outs[1])
    monkeypatch.setattr(dec, "_EARLY_EXIT", "yes")
    with pytest.raises(ValueError, match="DIST_LLM_DECODE_ATTN_EARLY_EXIT must be 0 or 1"):
        paged_decode_attention(q, k_cache, v_cache, table, lens, 0.125, torch.empty_like(q), ws)


@pytest.mark.parametrize("kv_dtype", [BF16, torch.float8_e4m3fn])
def test_decode_tile_gather_both_ways(monkeypatch, kv_dtype):
    """A tile inside one KV block takes one block-table entry (DIST_LLM_DECODE_ATTN_GATHER=tile, the default) or
    one per token (token): the same bits either way, with 64-token blocks (tiles inside) and 16-token ones (tiles
    spanning blocks take the per-token path whatever the switch); the switch takes tile or token only."""
    import dist_llm.kernels.decode_attention as dec

    for block_size in (64, 16):
        outs = []
        for switch in ("token", "tile"):
            monkeypatch.setattr(dec, "_GATHER", switch)
            gen = torch.Generator().manual_seed(7)
            k_cache, v_cache, table = paged_cache(MIXED7, block_size, 2, 64, BF16, gen, extra_cols=3)
            k_cache, v_cache = k_cache.to(kv_dtype), v_cache.to(kv_dtype)
            q = randn(len(MIXED7), 4, 64, dtype=BF16, gen=gen)
            ws = DecodeWorkspace.allocate(len(MIXED7), 4, 64, table.shape[1] * block_size, DEVICE,
                                          partition_size=64)
            lens = torch.tensor(MIXED7, dtype=torch.int32, device=DEVICE)
            outs.append(paged_decode_attention(q, k_cache, v_cache, table, lens, 0.125, torch.empty_like(q), ws))
        assert torch.equal(outs[0], outs[1]), block_size
        ref = paged_decode_attention_ref(q, k_cache, v_cache, table, lens, 0.125, torch.empty_like(q))
        torch.testing.assert_close(outs[1].float(), ref.float(), atol=2e-2, rtol=2e-2)
    monkeypatch.setattr(dec, "_GATHER", "rows")
    with pytest.raises(ValueError, match="DIST_LLM_DECODE_ATTN_GATHER must be tile or token"):
        paged_decode_attention(q, k_cache, v_cache, table, lens, 0.125, torch.empty_like(q), ws)


@pytest.mark.parametrize("bad", ["32,2", "32,2,2,0", "a,2,2", "32,0,2"])
def test_decode_config_override_rejects_bad_text(monkeypatch, bad):
    import dist_llm.kernels.decode_attention as dec

    monkeypatch.setattr(dec, "_CONFIG_OVERRIDE", bad)
    q = torch.zeros(1, 2, 64, dtype=BF16, device=DEVICE)
    cache = torch.zeros(1, 16, 2, 64, dtype=BF16, device=DEVICE)
    table = torch.zeros(1, 1, dtype=torch.int32, device=DEVICE)
    lens = torch.ones(1, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="DIST_LLM_DECODE_ATTN_CONFIG must be 'BLOCK_N,warps,stages'"):
        paged_decode_attention(q, cache, cache, table, lens, 0.125, torch.empty_like(q))


@pytest.mark.parametrize("kv_dtype", [BF16, torch.float8_e4m3fn])
def test_mixed_step_serves_one_token_rows_with_the_decode_kernel(kv_dtype):
    """Attention in a mixed step: the leading rows of one query token (metadata.num_decode_rows) take the decode
    kernel, the prompt chunks after them the context kernel, into one output; the same as the context kernel
    over every row, and as the reference."""
    from dist_llm.kernels import get_ops
    from dist_llm.layers.attention import Attention
    from dist_llm.layers.context import AttentionMetadata, set_metadata

    gen = torch.Generator().manual_seed(5)
    seq_lens, q_lens = [5, 40, 17, 70, 33], [1, 1, 1, 9, 33]
    k_cache, v_cache, table = paged_cache(seq_lens, 16, 2, 64, BF16, gen)
    k_cache, v_cache = k_cache.to(kv_dtype), v_cache.to(kv_dtype)
    cu = torch.tensor([0, 1, 2, 3, 12, 45], dtype=torch.int32, device=DEVICE)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    q = randn(45, 4, 64, dtype=BF16, gen=gen)
    attn = Attention(4, 2, 64, 0.125, None, get_ops("triton"))
    attn.k_cache, attn.v_cache = k_cache, v_cache
    ws = DecodeWorkspace.allocate(8, 4, 64, table.shape[1] * 16, DEVICE, partition_size=64)
    outs = []
    for nd in (3, 0):
        set_metadata(AttentionMetadata(slot_mapping=torch.empty(0), block_tables=table, seq_lens=lens,
                                       cu_seqlens_q=cu, max_seqlen_q=max(q_lens), is_decode=False,
                                       decode_workspace=ws, num_decode_rows=nd))
        try:
            outs.append(attn(None, q, None, None, rotated_and_cached=True).view(45, 4, 64))
        finally:
            set_metadata(None)
    expected = context_attention_ref(q, k_cache, v_cache, table, lens, cu, max(q_lens), 0.125, torch.empty_like(q))
    close(outs[0], expected, BF16)
    close(outs[1], expected, BF16)


# ---- context (prefill) --------------------------------------------------------------------------------

# (head_dim, [(seq_len, q_len)], block_size, (Hq, Hk), dtype)
CONTEXT_CASES = [
    (64, [(17, 17), (300, 17), (5, 0)], 16, (2, 2), F32),  # prefill, chunk after a cached prefix, q_len 0
    (80, [(300, 300)], 64, (4, 1), F16),  # one long prefill: several query blocks
    (128, [(1, 1), (17, 1), (300, 17), (9, 0), (17, 17), (40, 23), (2, 1)], 16, (8, 1), BF16),  # mixed
    (128, [(1, 1), (17, 17), (300, 64)], 64, (2, 2), F32),
    (96, [(300, 130), (17, 16)], 16, (8, 2), F16),
    (64, [(300, 1), (1, 1), (17, 1)], 64, (4, 4), BF16),  # decode rows only (q_len 1)
    (80, [(33, 33), (300, 200), (64, 0)], 16, (3, 1), BF16),
]


def _context_case(head_dim, seqs, block_size, heads, dtype, gen, strided_q=False, scale=None):
    num_heads, num_kv_heads = heads
    seq_lens = [s for s, _ in seqs]
    q_lens = [n for _, n in seqs]
    k_cache, v_cache, table = paged_cache(seq_lens, block_size, num_kv_heads, head_dim, dtype, gen)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    cu = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0).to(torch.int32).to(DEVICE)
    q = randn(sum(q_lens), num_heads, head_dim, dtype=dtype, gen=gen)
    if strided_q:
        q = strided(q, gen)
    scale = head_dim**-0.5 if scale is None else scale
    args = (k_cache, v_cache, table, lens, cu, max(q_lens), scale)
    expected = context_attention_ref(q, *args, torch.empty_like(q))
    out = torch.full_like(q, NAN)
    assert context_attention(q, *args, out) is out
    close(out, expected, dtype)


@pytest.mark.parametrize("head_dim,seqs,block_size,heads,dtype", CONTEXT_CASES)
def test_context_attention(head_dim, seqs, block_size, heads, dtype):
    gen = torch.Generator().manual_seed(hash((head_dim, block_size, heads)) % 2**31)
    _context_case(head_dim, seqs, block_size, heads, dtype, gen)


@pytest.mark.parametrize("first_row", [0, 1, 3, 4])
def test_context_attention_from_first_row_leaves_earlier_rows(first_row):
    """first_row: the rows before it are another kernel's (a mixed step's decode rows); their output stays as
    it was (NaN here), the rest match the reference over the whole batch."""
    gen = torch.Generator().manual_seed(11)
    seqs = [(9, 1), (40, 1), (17, 1), (70, 9), (33, 33)]
    k_cache, v_cache, table = paged_cache([s for s, _ in seqs], 16, 2, 64, BF16, gen)
    lens = torch.tensor([s for s, _ in seqs], dtype=torch.int32, device=DEVICE)
    cu = torch.tensor([0, 1, 2, 3, 12, 45], dtype=torch.int32, device=DEVICE)
    q = randn(45, 4, 64, dtype=BF16, gen=gen)
    args = (k_cache, v_cache, table, lens, cu, 33, 0.125)
    expected = context_attention_ref(q, *args, torch.full_like(q, NAN), first_row=first_row)
    out = torch.full_like(q, NAN)
    context_attention(q, *args, out, first_row=first_row)
    skipped = int(cu[first_row])
    assert out[:skipped].isnan().all() and expected[:skipped].isnan().all()
    close(out[skipped:], expected[skipped:], BF16)
    close(out[skipped:], context_attention_ref(q, *args, torch.empty_like(q))[skipped:], BF16)
    with pytest.raises(ValueError, match="first_row 6 is outside the batch of 5 rows"):
        context_attention(q, *args, out, first_row=6)


@pytest.mark.skipif(not GPU, reason="the interpreter compiles nothing")
def test_context_attention_first_row_compiles_once():
    """first_row changes every mixed step: it is a scalar Triton does not specialise, so no value of it compiles
    a new variant (sliced tensors would, by their pointers' alignment)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from common import triton_compiles

    gen = torch.Generator().manual_seed(12)
    seqs = [(9, 1)] * 5 + [(70, 9), (33, 33)]
    k_cache, v_cache, table = paged_cache([s for s, _ in seqs], 16, 2, 64, BF16, gen)
    lens = torch.tensor([s for s, _ in seqs], dtype=torch.int32, device=DEVICE)
    cu = torch.tensor([0, 1, 2, 3, 4, 5, 14, 47], dtype=torch.int32, device=DEVICE)
    q = randn(47, 4, 64, dtype=BF16, gen=gen)
    args = (k_cache, v_cache, table, lens, cu, 33, 0.125)
    context_attention(q, *args, torch.empty_like(q), first_row=0)
    with triton_compiles() as compiled:
        for first_row in (1, 2, 3, 5):
            context_attention(q, *args, torch.empty_like(q), first_row=first_row)
        torch.cuda.synchronize()
    assert compiled == []


def test_context_attention_large_scores_strided_q():
    gen = torch.Generator().manual_seed(5)
    _context_case(64, [(90, 70), (20, 3)], 16, (4, 2), F32, gen, strided_q=True, scale=1.0)


# ---- serving shapes (GPU only) ------------------------------------------------------------------------


@pytest.mark.skipif(not GPU, reason="serving shapes: too slow for the interpreter")
@pytest.mark.parametrize("block_size", [16, 64])
@pytest.mark.parametrize("heads", [(32, 32), (32, 8)])
def test_decode_serving_shapes(block_size, heads):
    gen = torch.Generator().manual_seed(6)
    lens = [2048] * 30 + [1, 4000]
    ws = DecodeWorkspace.allocate(32, heads[0], 128, 4096, DEVICE)
    _decode_case(128, lens, block_size, heads, BF16, ws, gen)
    _decode_case(128, lens[:7], block_size, heads, F16, ws, gen)


@pytest.mark.skipif(not GPU, reason="serving shapes: too slow for the interpreter")
@pytest.mark.parametrize("dtype", [BF16, F16, F32])
def test_context_serving_shapes(dtype):
    gen = torch.Generator().manual_seed(7)
    _context_case(128, [(4096, 4096)], 16, (32, 8), dtype, gen)
    _context_case(128, [(3000, 1000), (1, 1), (2048, 1), (700, 700), (64, 0)], 64, (32, 32), dtype, gen)


@pytest.mark.skipif(not GPU, reason="CUDA graphs need a GPU")
def test_decode_cuda_graph_replay():
    """Captured once, replayed with new lengths and queries written in place: no host sync inside."""
    gen = torch.Generator().manual_seed(8)
    k_cache, v_cache, table = paged_cache([1000, 300, 17], 16, 2, 128, BF16, gen)
    ws = DecodeWorkspace.allocate(3, 8, 128, table.shape[1] * 16, DEVICE)
    lens = torch.tensor([1000, 300, 17], dtype=torch.int32, device=DEVICE)
    q = randn(3, 8, 128, dtype=BF16, gen=gen)
    out = torch.empty_like(q)
    run = lambda: paged_decode_attention(q, k_cache, v_cache, table, lens, 128**-0.5, out, ws)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()  # compile outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    for new_lens in ([1, 299, 17], [999, 1, 5]):
        lens.copy_(torch.tensor(new_lens, dtype=torch.int32))
        q.copy_(randn(3, 8, 128, dtype=BF16, gen=gen))
        out.fill_(NAN)
        ws.out.fill_(NAN)
        graph.replay()
        expected = paged_decode_attention_ref(q, k_cache, v_cache, table, lens, 128**-0.5, torch.empty_like(q))
        close(out, expected, BF16)
