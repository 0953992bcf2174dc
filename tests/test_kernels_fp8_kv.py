"""The fp8 (e4m3fn) paged KV cache, kernel side: the rounding, the cache writes and attention reading it.

Without CUDA the kernels run through Triton's interpreter (TRITON_INTERPRET=1 is set here before anything
imports triton), whose own fp32 -> fp8 cast is wrong; `round_to` rounds there itself and must give torch's
`x.clamp(-448, 448).to(torch.float8_e4m3fn)` bit for bit, which is checked against a table of the 254
finite codes first. The writes must match reference.py bit for bit (scales applied as the fp32 reciprocal);
attention reads the same fp8 cache as its reference, within the 16-bit tolerances of
test_kernels_attention.py. q, k and v stay in the model's dtype throughout.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from conftest import paged_layout  # noqa: E402

from dist_llm.kernels import decode_attention as dec  # noqa: E402
from dist_llm.kernels import reference as ref  # noqa: E402
from dist_llm.kernels._rounding import round_to  # noqa: E402
from dist_llm.kernels.decode_attention import DecodeWorkspace, paged_decode_attention  # noqa: E402
from dist_llm.kernels.gemv_rotary_kv import gemv_rotary_kv_supported  # noqa: E402
from dist_llm.kernels.kv_cache import write_kv_cache  # noqa: E402
from dist_llm.kernels.prefill_attention import context_attention  # noqa: E402
from dist_llm.kernels.rotary import rotary_embedding  # noqa: E402
from dist_llm.kernels.rotary_kv import rotary_and_write_kv  # noqa: E402

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
FP8 = torch.float8_e4m3fn
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
ATTN_TOL = {F32: (1e-4, 1e-4), F16: (4e-3, 4e-3), BF16: (2e-2, 2e-2)}  # as test_kernels_attention.py
ROT_TOL = {F32: (1e-5, 1e-5), F16: (2e-3, 2e-3), BF16: (2e-2, 2e-2)}  # as test_kernels_rotary_kv.py
SENTINEL_CODE = 0xC4  # -3.0 in e4m3fn: no write stores it (the inputs below are never exactly -3 * scale)
NAN_CODE = 0x7F  # the interpreter loads it as 480, the GPU as NaN: either way it spoils what reads it


def bits(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.uint8)


def fp8_full(shape, code: int) -> torch.Tensor:
    return torch.full(shape, code, dtype=torch.uint8, device=DEVICE).view(FP8)


# ---- round_to --------------------------------------------------------------------------------------------


def fp8_table_round(x: torch.Tensor) -> torch.Tensor:
    """An independent oracle: x (fp32) to the nearest of the 254 finite e4m3fn values, ties to the even
    code, |x| saturated to 448. Returns the fp8 codes (uint8)."""
    table = torch.arange(127, dtype=torch.uint8).view(FP8).double()  # codes 0..126: 0 .. 448, increasing
    a = x.double().abs().clamp(max=448.0)
    hi = torch.searchsorted(table, a).clamp(max=126)
    lo = (hi - 1).clamp(min=0)
    d_lo, d_hi = a - table[lo], table[hi] - a
    code = torch.where((d_lo < d_hi) | ((d_lo == d_hi) & (lo % 2 == 0)), lo, hi)
    return (code | (torch.signbit(x).long() << 7)).to(torch.uint8)


def round_to_inputs(gen) -> torch.Tensor:
    """Every finite code's value, the ties between neighbours, both sides of each (a few fp32 ulps off),
    log-uniform random magnitudes from 2^-14 (below the subnormals) to 2^11 (past 448), overflow, zeros;
    all in both signs (fp32)."""
    values = torch.arange(127, dtype=torch.uint8).view(FP8).float()
    ties = (values[1:] + values[:-1]) / 2
    points = torch.cat((values, ties, torch.tensor([464.0, 480.0])))
    near = torch.cat([(points.view(torch.int32) + ulps).view(F32) for ulps in (0, 1, -1, 3, -3)])
    near = near[near > 0]
    rand = torch.exp2(torch.rand(4000, generator=gen) * 25 - 14)
    big = torch.tensor([449.0, 463.99, 1e4, 1e30, float("inf")])
    pos = torch.cat((near, rand, big, torch.zeros(1)))
    return torch.cat((pos, -pos))


@triton.jit
def _round_to_fp8_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(y_ptr + offs, round_to(tl.load(x_ptr + offs, mask=mask), tl.float8e4nv), mask=mask)


def test_torch_fp8_reference_is_nearest_even():
    """The torch expression the kernels are held to is round-to-nearest-even with saturation."""
    x = round_to_inputs(torch.Generator().manual_seed(0))
    expected = fp8_table_round(x)
    got = bits(x.clamp(-448, 448).to(FP8))
    assert torch.equal(got, expected), (x[got != expected][:8], got[got != expected][:8])


@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=["fp32", "bf16", "fp16"])
def test_round_to_fp8(dtype):
    x = round_to_inputs(torch.Generator().manual_seed(1))
    x = torch.cat((x, ref.quantize_kv_ref(x, FP8, 1.0).float()))  # every representable value as an input
    x = x.to(dtype)
    if dtype != F32:  # one ulp of the input dtype to either side
        step = torch.tensor(1, dtype=torch.int16)
        x = torch.cat((x, (x.view(torch.int16) + step).view(dtype), (x.view(torch.int16) - step).view(dtype)))
        x = x[~x.isnan()]
    x = x.to(DEVICE)
    y = torch.empty(x.shape, dtype=FP8, device=DEVICE)
    _round_to_fp8_kernel[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), BLOCK=1024)
    expected = bits(x.float().clamp(-448, 448).to(FP8))
    bad = bits(y) != expected
    assert not bad.any(), f"{bad.sum()} values differ, e.g. {x[bad][:6].tolist()} -> {y[bad][:6].float().tolist()}"


# ---- cache writes ----------------------------------------------------------------------------------------

NUM_SLOTS, BLOCK_SIZE, MAX_POS = 36, 4, 512
SCALES = [(1.0, 1.0), (0.5, 2.0), (0.37, 3.1)]  # 0.37, 3.1: the reciprocal is not exact
WRITE_DTYPES = [F32, BF16, F16]


def qkv_inputs(num_tokens, hq, hk, head_dim, rot_dim, dtype, gen, spread=1.0):
    """qkv [T, (hq + 2 hk) D] (values up to ~spread * 4, so large spreads saturate), cos/sin, positions,
    slots with padding rows (-1), and a sentinel fp8 cache."""
    qkv = (torch.randn(num_tokens, (hq + 2 * hk) * head_dim, generator=gen) * spread).to(dtype).to(DEVICE)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rot_dim, 2, dtype=F32) / rot_dim))
    freqs = torch.outer(torch.arange(MAX_POS, dtype=F32), inv_freq)
    cos_sin = torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(DEVICE)
    positions = torch.randint(1, MAX_POS, (num_tokens,), generator=gen).to(DEVICE)
    slots = torch.randperm(NUM_SLOTS, generator=gen)[:num_tokens]
    if num_tokens > 1:
        slots[[1, -1]] = -1
    cache = fp8_full((NUM_SLOTS // BLOCK_SIZE, BLOCK_SIZE, hk, head_dim), SENTINEL_CODE)
    return qkv, positions, cos_sin, slots.to(DEVICE), cache


def views(qkv, hq, hk, head_dim):
    q, k, v = qkv.split((hq * head_dim, hk * head_dim, hk * head_dim), dim=1)
    return q.unflatten(1, (hq, head_dim)), k.unflatten(1, (hk, head_dim)), v.unflatten(1, (hk, head_dim))


def check_cache(cache, x, slots, scale):
    """cache holds quantize_kv_ref(x) at the valid slots, bit for bit, and the sentinel everywhere else."""
    valid = slots >= 0
    flat = bits(cache.flatten(0, 1))
    expected = bits(ref.quantize_kv_ref(x[valid], FP8, scale))
    assert torch.equal(flat[slots[valid]], expected), "cache differs from quantize_kv_ref"
    untouched = torch.ones(flat.shape[0], dtype=torch.bool, device=DEVICE)
    untouched[slots[valid]] = False
    assert (flat[untouched] == SENTINEL_CODE).all(), "stray cache store"


@pytest.mark.parametrize("dtype", WRITE_DTYPES, ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("scales", SCALES, ids=lambda s: "k{}-v{}".format(*s))
def test_write_kv_cache_fp8(dtype, scales):
    gen = torch.Generator().manual_seed(2)
    hq, hk, d = 2, 3, 80
    qkv, _, _, slots, cache = qkv_inputs(9, hq, hk, d, d, dtype, gen, spread=300.0)  # ~10% saturate
    _, k, v = views(qkv, hq, hk, d)
    k_cache, v_cache = cache.clone(), cache.clone()
    write_kv_cache(k, v, k_cache, v_cache, slots, k_scale=scales[0], v_scale=scales[1])
    check_cache(k_cache, k, slots, scales[0])
    check_cache(v_cache, v, slots, scales[1])
    assert (k_cache.float().abs() == 448).any(), "no value saturated"
    k_ref, v_ref = cache.clone(), cache.clone()
    ref.write_kv_cache_ref(k, v, k_ref, v_ref, slots, k_scale=scales[0], v_scale=scales[1])
    assert torch.equal(bits(k_cache), bits(k_ref)) and torch.equal(bits(v_cache), bits(v_ref))


ROTARY_CASES = [  # (tokens, hq, hk, head_dim, rot_dim, dtype)
    (5, 4, 1, 64, 64, BF16),
    (3, 4, 4, 80, 80, F16),
    (3, 4, 2, 80, 48, BF16),  # partial rotary, head_dim and rot_dim not powers of 2
    (4, 2, 2, 96, 32, F32),  # partial rotary
]


def run_rotary(fn, inputs, hq, hk, is_neox, cache=None, **scales):
    qkv, positions, cos_sin, slots, fp8_cache = inputs
    cache = fp8_cache if cache is None else cache
    qkv, k_cache, v_cache = qkv.clone(), cache.clone(), cache.clone()
    q, k, v = views(qkv, hq, hk, cache.shape[-1])
    fn(positions, q, k, v, cos_sin, is_neox, k_cache, v_cache, slots, **scales)
    return qkv, k_cache, v_cache


def unfused(positions, q, k, v, cos_sin, is_neox, k_cache, v_cache, slots, **scales):
    rotary_embedding(positions, q, k, cos_sin, is_neox)
    write_kv_cache(k, v, k_cache, v_cache, slots, **scales)


@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("case", ROTARY_CASES, ids=lambda c: "t{}-q{}-k{}-d{}-r{}-{}".format(*c[:5], str(c[5])[6:]))
def test_rotary_and_write_kv_fp8(case, is_neox):
    num_tokens, hq, hk, d, rot_dim, dtype = case
    gen = torch.Generator().manual_seed(3)
    inputs = qkv_inputs(num_tokens, hq, hk, d, rot_dim, dtype, gen, spread=3.0)
    slots = inputs[3]
    scales = dict(k_scale=0.5, v_scale=0.021)
    qkv, k_cache, v_cache = run_rotary(rotary_and_write_kv, inputs, hq, hk, is_neox, **scales)
    _, k, v = views(qkv, hq, hk, d)
    check_cache(k_cache, k, slots, scales["k_scale"])  # the rotated k as returned, quantised
    check_cache(v_cache, v, slots, scales["v_scale"])

    # q and k as a cache of their own dtype leaves them (bit for bit in the interpreter; on the GPU the
    # fp8 specialization may contract the rotary's multiply-adds differently)
    plain_cache = torch.zeros(inputs[4].shape, dtype=dtype, device=DEVICE)
    qkv_plain = run_rotary(rotary_and_write_kv, inputs, hq, hk, is_neox, cache=plain_cache)[0]
    atol, rtol = (0, 0) if DEVICE == "cpu" else ROT_TOL[dtype]
    torch.testing.assert_close(qkv, qkv_plain, atol=atol, rtol=rtol, msg="q/k differ from the 16-bit-cache call")
    if DEVICE == "cpu":
        for a, b in zip((qkv, k_cache, v_cache), run_rotary(unfused, inputs, hq, hk, is_neox, **scales)):
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), "differs from rotary + write_kv_cache"
    expected = run_rotary(ref.rotary_and_write_kv_ref, inputs, hq, hk, is_neox, **scales)
    torch.testing.assert_close(qkv, expected[0], atol=ROT_TOL[dtype][0], rtol=ROT_TOL[dtype][1])
    for got, want in zip((k_cache, v_cache), expected[1:]):  # an fp8 ulp where the rotated k rounds apart
        torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=0.13)


# ---- attention -------------------------------------------------------------------------------------------


def fp8_paged_cache(seq_lens, block_size, num_kv_heads, head_dim, k_scale, v_scale, gen, extra_cols=2):
    """fp8 caches of len_i tokens per sequence (K ~ N(0, 1), V ~ N(0, 2) before scaling) in shuffled
    blocks, NaN codes elsewhere; the block table entries past a sequence's blocks point at NaN blocks."""
    num_blocks, table, slots = paged_layout(seq_lens, block_size, gen, extra_cols)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache, v_cache = fp8_full(shape, NAN_CODE).cpu(), fp8_full(shape, NAN_CODE).cpu()
    for s in slots:
        for cache, sd, scale in ((k_cache, 1.0, k_scale), (v_cache, 2.0, v_scale)):
            x = torch.randn(len(s), num_kv_heads, head_dim, generator=gen) * sd
            bits(cache.view(-1, num_kv_heads, head_dim))[s] = bits(ref.quantize_kv_ref(x, FP8, scale))
    return k_cache.to(DEVICE), v_cache.to(DEVICE), table.to(torch.int32).to(DEVICE)


def close(actual, expected, dtype):
    atol, rtol = ATTN_TOL[dtype]
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol, equal_nan=False)


# (head_dim, seq_lens, block_size, (Hq, Hk), q dtype, (k_scale, v_scale), workspace rows or None, path)
# path: how many partitions `_split_plan` must pick, "split" (> 1) or "single"
DECODE_CASES = [
    (64, [1, 17, 300], 16, (4, 1), BF16, (0.05, 0.02), "part64", "split"),
    (80, [1, 300, 17, 45, 2, 129, 64], 32, (2, 2), F32, (1.0, 1.0), None, "split"),
    (96, [1, 17, 40], 16, (4, 1), F16, (0.1, 0.03), None, "single"),  # the table spans 48 tokens: one tile
    (64, [1, 17, 40, 5] * 9, 16, (8, 2), BF16, (0.05, 0.02), "one_split", "single"),  # batch 36, 32-token tiles
]


@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: f"d{c[0]}-b{len(c[1])}-bs{c[2]}-{c[7]}")
def test_paged_decode_attention_fp8(case):
    head_dim, seq_lens, block_size, (hq, hk), dtype, (k_scale, v_scale), ws_kind, path = case
    gen = torch.Generator().manual_seed(4)
    extra_cols = 0 if path == "single" and ws_kind is None else 2
    k_cache, v_cache, table = fp8_paged_cache(seq_lens, block_size, hk, head_dim, k_scale, v_scale, gen,
                                              extra_cols)  # fmt: skip
    batch, max_ctx = len(seq_lens), table.shape[1] * block_size
    ws = None
    if ws_kind == "part64":
        ws = DecodeWorkspace.allocate(batch, hq, head_dim, max_ctx, DEVICE, partition_size=64)
    elif ws_kind == "one_split":  # rows for the batch only, each one partition long
        ws = DecodeWorkspace.allocate(batch, hq, head_dim, max_ctx, DEVICE, partition_size=1024)
    block_n = dec._launch_config(head_dim, block_size, hq // hk, dtype, batch)[1]
    num_splits = dec._split_plan(batch, hk, max_ctx, block_n, ws)[0]
    assert (num_splits == 1) == (path == "single"), num_splits
    if ws is not None:
        ws.out.fill_(float("nan"))
        ws.lse.fill_(float("nan"))

    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    q = torch.randn(batch, hq, head_dim, generator=gen).to(dtype).to(DEVICE)
    scale = head_dim**-0.5
    args = (q, k_cache, v_cache, table, lens, scale)
    expected = ref.paged_decode_attention_ref(*args, torch.empty_like(q), k_scale=k_scale, v_scale=v_scale)
    out = torch.full_like(q, float("nan"))
    assert paged_decode_attention(*args, out, ws, k_scale=k_scale, v_scale=v_scale) is out
    close(out, expected, dtype)
    if (k_scale, v_scale) != (1.0, 1.0):  # the scales are applied, not ignored
        unscaled = ref.paged_decode_attention_ref(*args, torch.empty_like(q))
        assert not torch.allclose(out.float(), unscaled.float(), atol=0.1, rtol=0.1)


# (head_dim, [(seq_len, q_len)], block_size, (Hq, Hk), q dtype, (k_scale, v_scale))
CONTEXT_CASES = [
    (64, [(17, 17), (300, 17), (5, 0)], 16, (4, 1), BF16, (0.05, 0.02)),
    (80, [(40, 23), (1, 1), (33, 33)], 32, (2, 2), F16, (0.1, 0.5)),
    (96, [(70, 70), (9, 1)], 16, (4, 4), F32, (1.0, 1.0)),
]


@pytest.mark.parametrize("case", CONTEXT_CASES, ids=lambda c: f"d{c[0]}-bs{c[2]}-q{c[3][0]}-k{c[3][1]}")
def test_context_attention_fp8(case):
    head_dim, seqs, block_size, (hq, hk), dtype, (k_scale, v_scale) = case
    gen = torch.Generator().manual_seed(5)
    seq_lens, q_lens = [s for s, _ in seqs], [n for _, n in seqs]
    k_cache, v_cache, table = fp8_paged_cache(seq_lens, block_size, hk, head_dim, k_scale, v_scale, gen)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    cu = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0).to(torch.int32).to(DEVICE)
    q = torch.randn(sum(q_lens), hq, head_dim, generator=gen).to(dtype).to(DEVICE)
    args = (q, k_cache, v_cache, table, lens, cu, max(q_lens), head_dim**-0.5)
    expected = ref.context_attention_ref(*args, torch.empty_like(q), k_scale=k_scale, v_scale=v_scale)
    out = torch.full_like(q, float("nan"))
    assert context_attention(*args, out, k_scale=k_scale, v_scale=v_scale) is out
    close(out, expected, dtype)


# ---- what is refused -------------------------------------------------------------------------------------


def test_scales_need_an_fp8_cache():
    """Scales other than 1 with a 16-bit cache are an error in every kernel and its reference."""
    gen = torch.Generator().manual_seed(6)
    qkv, positions, cos_sin, slots, _ = qkv_inputs(3, 2, 1, 64, 64, BF16, gen)
    q, k, v = views(qkv, 2, 1, 64)
    cache = torch.zeros(NUM_SLOTS // BLOCK_SIZE, BLOCK_SIZE, 1, 64, dtype=BF16, device=DEVICE)
    table = torch.zeros(3, 2, dtype=torch.int32, device=DEVICE)
    lens = torch.ones(3, dtype=torch.int32, device=DEVICE)
    cu = torch.arange(4, dtype=torch.int32, device=DEVICE)
    q = q.contiguous()
    calls = {
        "write_kv_cache": (write_kv_cache, ref.write_kv_cache_ref, (k, v, cache, cache, slots)),
        "rotary_and_write_kv": (rotary_and_write_kv, ref.rotary_and_write_kv_ref,
                                (positions, q, k, v, cos_sin, True, cache, cache, slots)),
        "paged_decode_attention": (paged_decode_attention, ref.paged_decode_attention_ref,
                                   (q, cache, cache, table, lens, 0.1, torch.empty_like(q), None)),
        "context_attention": (context_attention, ref.context_attention_ref,
                              (q, cache, cache, table, lens, cu, 1, 0.1, torch.empty_like(q))),
    }  # fmt: skip
    for fn, fn_ref, args in calls.values():
        for f in (fn, fn_ref):
            with pytest.raises(AssertionError, match="scales apply to"):
                f(*args, k_scale=2.0)
            with pytest.raises(AssertionError, match="scales apply to"):
                f(*args, v_scale=0.5)
            f(*args, k_scale=1.0, v_scale=1.0)  # unit scales are fine
    fp8_cache = fp8_full(cache.shape, 0)
    with pytest.raises(AssertionError, match="positive and finite"):
        write_kv_cache(k, v, fp8_cache, fp8_cache, slots, k_scale=0.0)
    with pytest.raises(AssertionError, match="caches must be q's dtype"):  # a 16-bit cache must be q's dtype
        paged_decode_attention(q.float(), cache, cache, table, lens, 0.1, torch.empty_like(q.float()))


def test_gemv_rotary_kv_not_with_fp8_cache():
    """The fused qkv GEMV has no scales: it declines an fp8 cache, so callers run the two kernels."""
    hq, hk, d, k_dim = 2, 1, 64, 32
    x = torch.randn(1, k_dim).to(BF16).to(DEVICE)
    weight = torch.randn((hq + 2 * hk) * d, k_dim).to(BF16).to(DEVICE)
    positions = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    slots = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    cos_sin = torch.zeros(8, d, device=DEVICE)
    args = (x, weight, positions, cos_sin, True)
    cache = torch.zeros(2, 4, hk, d, dtype=BF16, device=DEVICE)
    assert gemv_rotary_kv_supported(*args, cache, cache, slots, hq, hk, d)
    fp8_cache = fp8_full(cache.shape, 0)
    assert not gemv_rotary_kv_supported(*args, fp8_cache, fp8_cache, slots, hq, hk, d)
