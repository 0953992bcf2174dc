"""Elementwise Triton kernels (RMSNorm, rotary, SiLU-and-mul, KV-cache write, sampling) against reference.py.

On a machine without CUDA the kernels run through Triton's interpreter (TRITON_INTERPRET=1 is set
here before anything imports triton), at small shapes; with CUDA the same tests run on the GPU at
larger shapes. Outputs are poisoned with NaN / a sentinel before every call so an unwritten element
fails the comparison.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from dist_llm.kernels import reference as ref  # noqa: E402
from dist_llm.kernels import rmsnorm  # noqa: E402
from dist_llm.kernels.activation import silu_and_mul  # noqa: E402
from dist_llm.kernels.kv_cache import write_kv_cache  # noqa: E402
from dist_llm.kernels.rotary import rotary_embedding  # noqa: E402
from dist_llm.kernels.sampling import greedy_argmax, sample  # noqa: E402

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}
TOKENS = [1, 7, 300] if GPU else [1, 3, 7]
HIDDEN = [80, 100, 256, 4096, 5120] if GPU else [80, 100, 256]


def close(actual, expected, dtype):
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, equal_nan=False)
    if dtype != torch.float32:
        # The kernels round where the reference rounds, so fp16/bf16 results are bit-identical except
        # where an fp32 last-bit difference (rsqrt, exp, fma) tips a rounding: a misplaced rounding
        # step would instead differ by an ulp on a large fraction of elements.
        same = (actual == expected).float().mean().item()
        assert same >= 0.98, f"only {same:.1%} of elements bit-identical to the reference"


def randn(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, device=DEVICE) * scale).to(dtype)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ---- RMSNorm --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens", TOKENS)
@pytest.mark.parametrize("hidden", HIDDEN)
def test_rms_norm(dtype, num_tokens, hidden):
    x = randn(num_tokens, hidden + 16, dtype=dtype, scale=3.0)[:, 8 : 8 + hidden]  # row stride > N
    weight = randn(hidden, dtype=dtype).abs() + 0.5
    out = torch.full((num_tokens, hidden), float("nan"), dtype=dtype, device=DEVICE)
    got = rmsnorm.rms_norm(x, weight, 1e-6, out=out)
    assert got is out
    close(out, ref.rms_norm_ref(x, weight, 1e-6), dtype)
    close(rmsnorm.rms_norm(x, weight, 1e-6), ref.rms_norm_ref(x, weight, 1e-6), dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rms_norm_fp32_weight_promotes(dtype):
    x = randn(3, 100, dtype=dtype)
    weight = randn(100) + 1.0
    expected = ref.rms_norm_ref(x, weight, 1e-5)
    got = rmsnorm.rms_norm(x, weight, 1e-5)
    assert got.dtype == expected.dtype == torch.float32
    close(got, expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens", TOKENS)
@pytest.mark.parametrize("hidden", HIDDEN)
def test_fused_add_rms_norm(dtype, num_tokens, hidden):
    x = randn(num_tokens, 2 * hidden, dtype=dtype)[:, :hidden]  # strided, like a slice of a wider output
    residual = randn(num_tokens, hidden, dtype=dtype, scale=4.0)
    weight = randn(hidden, dtype=dtype).abs() + 0.5
    x_ref, res_ref = x.clone(), residual.clone()
    ref.fused_add_rms_norm_ref(x_ref, res_ref, weight, 1e-6)
    assert rmsnorm.fused_add_rms_norm(x, residual, weight, 1e-6) is None
    # the residual is an exact rounding of x + residual: no tolerance
    torch.testing.assert_close(residual, res_ref, atol=0, rtol=0)
    close(x, x_ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_long_rows_loop(monkeypatch, dtype):
    """Rows wider than _MAX_FUSED_BLOCK take the two-pass loop; force it at a small width."""
    monkeypatch.setattr(rmsnorm, "_MAX_FUSED_BLOCK", 64)
    monkeypatch.setattr(rmsnorm, "_LOOP_BLOCK", 32)
    x = randn(3, 100, dtype=dtype, scale=2.0)
    residual = randn(3, 100, dtype=dtype)
    weight = randn(100, dtype=dtype) + 1.0
    out = torch.full_like(x, float("nan"))
    close(rmsnorm.rms_norm(x, weight, 1e-6, out=out), ref.rms_norm_ref(x, weight, 1e-6), dtype)
    x_ref, res_ref = x.clone(), residual.clone()
    ref.fused_add_rms_norm_ref(x_ref, res_ref, weight, 1e-6)
    rmsnorm.fused_add_rms_norm(x, residual, weight, 1e-6)
    torch.testing.assert_close(residual, res_ref, atol=0, rtol=0)
    close(x, x_ref, dtype)


# ---- rotary ---------------------------------------------------------------------------------------


def make_qkv(num_tokens, hq, hk, head_dim, dtype):
    """q, k, v as strided views of one fused qkv output, the way the attention layer sees them."""
    qkv = randn(num_tokens, (hq + 2 * hk) * head_dim, dtype=dtype)
    q = qkv[:, : hq * head_dim].view(num_tokens, hq, head_dim)
    k = qkv[:, hq * head_dim : (hq + hk) * head_dim].view(num_tokens, hk, head_dim)
    v = qkv[:, (hq + hk) * head_dim :].view(num_tokens, hk, head_dim)
    return qkv, q, k, v


def cos_sin_cache(max_pos, rot_dim):
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rot_dim, 2, dtype=torch.float32) / rot_dim))
    freqs = torch.outer(torch.arange(max_pos, dtype=torch.float32), inv_freq)
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(DEVICE)


ROTARY_CASES = [  # (head_dim, rot_dim, hq, hk)
    (64, 64, 4, 4),
    (80, 80, 3, 1),
    (96, 96, 2, 2),
    (128, 128, 8, 2),
    (128, 64, 4, 2),  # partial rotary
    (80, 32, 2, 1),  # partial rotary, head_dim not a power of 2
]
if GPU:
    ROTARY_CASES += [(128, 128, 32, 8), (128, 128, 64, 8), (64, 16, 40, 40)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("case", ROTARY_CASES, ids=lambda c: "d{}-r{}-q{}-k{}".format(*c))
@pytest.mark.parametrize("num_tokens", [3, 1500] if GPU else [5])  # both launch configs on GPU
def test_rotary_embedding(dtype, is_neox, case, num_tokens):
    head_dim, rot_dim, hq, hk = case
    cache = cos_sin_cache(4096, rot_dim)
    positions = torch.randint(0, 4096, (num_tokens,), device=DEVICE)
    qkv, q, k, v = make_qkv(num_tokens, hq, hk, head_dim, dtype)
    qkv_ref = qkv.clone()
    split = [hq * head_dim, hk * head_dim, hk * head_dim]
    q_ref, k_ref, v_ref = (t.view(num_tokens, -1, head_dim) for t in qkv_ref.split(split, dim=1))
    ref.rotary_embedding_ref(positions, q_ref, k_ref, cache, is_neox)
    rotary_embedding(positions, q, k, cache, is_neox)
    close(qkv, qkv_ref, dtype)
    # the unrotated tail and v are untouched, bit for bit
    assert torch.equal(q[..., rot_dim:], q_ref[..., rot_dim:])
    assert torch.equal(k[..., rot_dim:], k_ref[..., rot_dim:])
    assert torch.equal(v, v_ref)


def test_rotary_embedding_changes_values():
    """Guard against a no-op kernel passing the comparison: positions > 0 must move q."""
    cache = cos_sin_cache(64, 64)
    _, q, k, _ = make_qkv(3, 2, 1, 64, torch.float32)
    before = q.clone()
    rotary_embedding(torch.tensor([5, 9, 33], device=DEVICE), q, k, cache, True)
    assert (q - before).abs().max() > 0.1


# ---- SiLU-and-mul ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens", TOKENS)
@pytest.mark.parametrize("inter", [80, 100, 256] + ([14336, 3000] if GPU else []))
def test_silu_and_mul(dtype, num_tokens, inter):
    x = randn(num_tokens, 2 * inter + 8, dtype=dtype, scale=3.0)[:, : 2 * inter]  # row stride > 2I
    out = torch.full((num_tokens, inter), float("nan"), dtype=dtype, device=DEVICE)
    assert silu_and_mul(x, out=out) is out
    expected = ref.silu_and_mul_ref(x)
    close(out, expected, dtype)
    close(silu_and_mul(x), expected, dtype)


# ---- KV-cache write -------------------------------------------------------------------------------

SENTINEL = -777.0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim,hk", [(64, 2), (80, 1), (128, 4)] + ([(128, 8)] if GPU else []))
def test_write_kv_cache(dtype, head_dim, hk):
    num_blocks, block_size, hq = 6, 4, 2 * hk
    num_tokens = 7
    _, _, k, v = make_qkv(num_tokens, hq, hk, head_dim, dtype)  # strided views
    perm = torch.randperm(num_blocks * block_size, device=DEVICE)[:num_tokens]
    slots = perm.clone()
    slots[[1, 4]] = -1  # padding tokens
    k_cache = torch.full((num_blocks, block_size, hk, head_dim), SENTINEL, dtype=dtype, device=DEVICE)
    v_cache = torch.full_like(k_cache, SENTINEL)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    ref.write_kv_cache_ref(k, v, k_ref, v_ref, slots)
    write_kv_cache(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)
    written = torch.zeros(num_blocks * block_size, dtype=torch.bool, device=DEVICE)
    written[slots[slots >= 0]] = True
    flat_k = k_cache.flatten(0, 1)
    assert (flat_k[~written] == SENTINEL).all(), "a slot that nobody maps to was written"
    assert (flat_k[perm[[1, 4]]] == SENTINEL).all(), "a slot -1 token was written"
    assert torch.equal(flat_k[slots[slots >= 0]], k[slots >= 0])


def test_write_kv_cache_strided_cache():
    """Caches that are views into one [2, ...] allocation (k and v interleaved per block)."""
    kv = torch.full((5, 2, 4, 2, 64), SENTINEL, device=DEVICE)
    k_cache, v_cache = kv[:, 0], kv[:, 1]
    _, _, k, v = make_qkv(3, 2, 2, 64, torch.float32)
    slots = torch.tensor([3, -1, 17], device=DEVICE)
    expected = kv.clone()
    ref.write_kv_cache_ref(k, v, expected[:, 0], expected[:, 1], slots)
    write_kv_cache(k, v, k_cache, v_cache, slots)
    assert torch.equal(kv, expected)


# ---- sampling -------------------------------------------------------------------------------------


def sampling_batch(bsz, vocab):
    logits = randn(bsz, vocab, scale=3.0)
    logits[0, 5] = logits[0, 9] = logits[0].max() + 1.0  # a greedy tie: the first max must win
    kinds = torch.arange(bsz, device=DEVICE) % 5  # greedy, temp, top-k, top-p, top-k + top-p
    temperature = torch.where(kinds == 0, 0.0, 0.5 + 0.25 * (torch.arange(bsz, device=DEVICE) % 4))
    top_k = torch.where((kinds == 2) | (kinds == 4), 1 + torch.arange(bsz, device=DEVICE) % 7, 0).int()
    top_p = torch.where((kinds == 3) | (kinds == 4), 0.3 + 0.1 * (torch.arange(bsz, device=DEVICE) % 6), 1.0)
    seeds = torch.randint(0, 2**62, (bsz,), device=DEVICE)
    offsets = torch.randint(0, 10_000, (bsz,), device=DEVICE)
    return logits, temperature.float(), top_k, top_p.float(), seeds, offsets


@pytest.mark.parametrize("bsz,vocab", [(10, 50), (7, 1000)] + ([(64, 151_936)] if GPU else []))
def test_sample_matches_reference_mixed_batch(bsz, vocab):
    args = sampling_batch(bsz, vocab)
    for offset_shift in range(3):
        shifted = (*args[:5], args[5] + offset_shift)
        got = sample(*shifted)
        assert got.dtype == torch.int64 and got.shape == (bsz,)
        assert torch.equal(got, ref.sample_ref(*shifted))
    assert sample(*args)[0].item() == 5


def test_sample_batch_composition_independent():
    bsz, vocab = 10, 64
    logits, temperature, top_k, top_p, seeds, offsets = sampling_batch(bsz, vocab)
    batched = sample(logits, temperature, top_k, top_p, seeds, offsets)
    for i in range(bsz):
        one = slice(i, i + 1)
        alone = sample(logits[one], temperature[one], top_k[one], top_p[one], seeds[one], offsets[one])
        assert alone.item() == batched[i].item()
    # reordering the batch permutes the tokens
    perm = torch.randperm(bsz, device=DEVICE)
    shuffled = sample(logits[perm], temperature[perm], top_k[perm], top_p[perm], seeds[perm], offsets[perm])
    assert torch.equal(shuffled, batched[perm])


def test_sample_temperature_follows_softmax():
    """One request over many (seed, offset) draws: frequencies match softmax(logits / T) (chi-square)."""
    draws, temp = 20_000 if GPU else 600, 0.7
    logits_row = torch.tensor([1.0, 0.0, -0.5, 2.0, 0.5], device=DEVICE)
    tokens = sample(
        logits_row.expand(draws, -1).contiguous(),
        torch.full((draws,), temp, device=DEVICE),
        torch.zeros(draws, dtype=torch.int32, device=DEVICE),
        torch.ones(draws, device=DEVICE),
        torch.full((draws,), 1234, device=DEVICE),
        torch.arange(draws, device=DEVICE),
    )
    observed = torch.bincount(tokens, minlength=5).double()
    expected = torch.softmax(logits_row / temp, dim=-1).double() * draws
    chi2 = ((observed - expected) ** 2 / expected).sum().item()
    # chi-square with 4 degrees of freedom: P(chi2 > 18.47) = 0.001. The noise is deterministic, so this
    # is not flaky; T = 1 instead of 0.7 would give chi2 ~ 74 at 600 draws.
    assert chi2 < 18.47, (observed, expected)


def test_sample_top_k_one_is_greedy():
    logits, temperature, _, top_p, seeds, offsets = sampling_batch(6, 40)
    top_k = torch.ones(6, dtype=torch.int32, device=DEVICE)
    temperature = torch.full_like(temperature, 1.3)
    assert torch.equal(sample(logits, temperature, top_k, top_p, seeds, offsets), logits.argmax(-1))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_sampling_modes_agree_with_full(backend):
    """"greedy" and "plain" are host-side shortcuts: on batches that qualify they give the "full" tokens."""
    from dist_llm.kernels import get_ops

    sample = get_ops(backend).sample
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(5, 300, generator=gen).to(DEVICE) * 3
    seeds = torch.arange(5, dtype=torch.int64, device=DEVICE) + 11
    offsets = torch.full((5,), 4, dtype=torch.int64, device=DEVICE)
    no_k = torch.zeros(5, dtype=torch.int32, device=DEVICE)
    no_p = torch.ones(5, device=DEVICE)
    temp = torch.tensor([0.0, 0.7, 1.0, 1.3, 0.0], device=DEVICE)
    full = sample(logits, temp, no_k, no_p, seeds, offsets, mode="full")
    assert torch.equal(sample(logits, temp, no_k, no_p, seeds, offsets, mode="plain"), full)
    zero = torch.zeros(5, device=DEVICE)
    assert torch.equal(sample(logits, zero, no_k, no_p, seeds, offsets, mode="greedy"), logits.argmax(-1))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bsz,vocab", [(11, 53), (6, 1001)] + ([(64, 128_256)] if GPU else []))
def test_sample_min_p_matches_reference(backend, dtype, bsz, vocab):
    """min_p beside greedy, temperature, top-k and top-p rows (and rows with min_p 0) against the reference,
    and against the same batch without min_p: the rows that use it must have moved somewhere."""
    from dist_llm.kernels import get_ops

    sample = get_ops(backend).sample
    logits, temperature, top_k, top_p, seeds, offsets = sampling_batch(bsz, vocab)
    logits = (logits * 0.3).to(dtype)  # flatter than sampling_batch's, so that min_p has tokens to drop
    min_p = torch.where(torch.arange(bsz, device=DEVICE) % 3 == 0, 0.0, 0.05 + 0.2 * (torch.arange(bsz) % 4).to(DEVICE))
    changed = 0
    for shift in range(8):
        args = (logits, temperature, top_k, top_p, seeds, offsets + shift)
        got = sample(*args, min_p=min_p.float())
        assert torch.equal(got, ref.sample_ref(*args, min_p=min_p.float()))
        without = sample(*args)
        off = (min_p == 0) | (temperature == 0)
        assert torch.equal(got[off], without[off]), "a row with min_p 0 (or greedy) changed"
        changed += int((got != without).sum())
    assert changed > 0, "min_p changed no token"


def test_sample_min_p_keeps_what_it_should_and_comes_before_top_p():
    """Over many draws: min_p 0.2 at T = 1 keeps exactly the tokens at >= 0.2 x the top probability, in
    proportion (chi-square); and with probabilities (0.5, 0.3, 0.2), min_p 0.5 then top_p 0.6 (vLLM's order)
    leaves the first token only (top-p first would have kept two)."""
    draws = 20_000 if GPU else 600
    logits_row = torch.tensor([1.0, 0.0, -0.5, 2.0, 0.5], device=DEVICE)  # p / p_max: .37 .14 .08 1 .22

    def draw(row, top_p=1.0, min_p=0.2):
        n = len(row)
        return sample(
            row.expand(draws, -1).contiguous(),
            torch.ones(draws, device=DEVICE), torch.zeros(draws, dtype=torch.int32, device=DEVICE),
            torch.full((draws,), top_p, device=DEVICE), torch.full((draws,), 99, device=DEVICE),
            torch.arange(draws, device=DEVICE), min_p=torch.full((draws,), min_p, device=DEVICE),
        ), n

    tokens, n = draw(logits_row)
    observed = torch.bincount(tokens, minlength=n).double()
    assert observed[1] == observed[2] == 0, observed
    kept = torch.tensor([0, 3, 4], device=DEVICE)
    expected = torch.softmax(logits_row[kept], dim=-1).double() * draws
    chi2 = ((observed[kept] - expected) ** 2 / expected).sum().item()
    assert chi2 < 13.82, (observed, expected)  # 2 degrees of freedom, P = 0.001
    order, _ = draw(torch.tensor([0.5, 0.3, 0.2], device=DEVICE).log(), top_p=0.6, min_p=0.5)
    assert (order == 0).all(), torch.bincount(order)
    top_p_only, _ = draw(torch.tensor([0.5, 0.3, 0.2], device=DEVICE).log(), top_p=0.6, min_p=0.0)
    assert set(top_p_only.tolist()) == {0, 1}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bsz,vocab", [(1, 1), (3, 37), (2, 16385), (5, 40_000)] + ([(64, 128_256)] if GPU else []))
def test_greedy_argmax(monkeypatch, dtype, bsz, vocab):
    """Against torch's argmax, with ties inside one block and across blocks (the first index must win)
    and a row of one repeated value; small blocks make the loop run on the interpreter's shapes too."""
    from dist_llm.kernels import sampling

    monkeypatch.setattr(sampling, "_ARGMAX_BLOCK", 16384 if GPU else 1024)
    logits = randn(bsz, vocab + 3, dtype=dtype, scale=3.0)[:, 2 : vocab + 2]  # a row stride that is not vocab
    top = logits.float().max() + 1
    logits[0, vocab // 2] = logits[0, vocab - 1] = top.to(dtype)  # the earlier one wins
    if bsz > 1:
        logits[1] = -7.0  # all equal: index 0
    if bsz > 2:
        logits[2, vocab - 1] = top.to(dtype)  # the maximum in the last, partial block
    got = greedy_argmax(logits)
    assert got.dtype == torch.int64 and got.shape == (bsz,)
    assert torch.equal(got, logits.float().argmax(-1)), (got, logits.float().argmax(-1))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("mode", ["greedy", "full"])
def test_sample_writes_out(backend, mode):
    """`out=` (the CUDA graph's static token buffer) receives the same tokens that are returned."""
    from dist_llm.kernels import get_ops

    sample = get_ops(backend).sample
    logits = randn(3, 301, dtype=torch.bfloat16, scale=3.0)
    temp = torch.tensor([0.0, 0.8, 0.0] if mode == "full" else [0.0] * 3, device=DEVICE)
    top_k = torch.tensor([0, 5, 0], dtype=torch.int32, device=DEVICE)
    seeds = torch.arange(3, dtype=torch.int64, device=DEVICE)
    args = (temp, top_k, torch.full((3,), 0.9, device=DEVICE), seeds, torch.zeros(3, dtype=torch.int64, device=DEVICE))
    buf = torch.full((5,), -9, dtype=torch.int64, device=DEVICE)
    got = sample(logits, *args, mode=mode, out=buf[1:4])
    assert torch.equal(buf[1:4], got) and torch.equal(got, ref.sample_ref(logits, *args, mode=mode))
    assert buf[0].item() == buf[4].item() == -9


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("ids_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("num_tokens", [1, 5, 1030])
def test_fill_pending(backend, ids_dtype, num_tokens):
    """PENDING ids (prev_index >= 0) come from the previous step's tokens, the rest stay, across blocks."""
    from dist_llm.kernels import get_ops

    gen = torch.Generator().manual_seed(num_tokens)
    ids = torch.randint(0, 32000, (num_tokens,), generator=gen, dtype=ids_dtype)
    sampled = torch.randint(0, 32000, (7,), generator=gen, dtype=torch.int64)
    prev = torch.randint(-1, 7, (num_tokens,), generator=gen, dtype=torch.int64)
    prev[0] = 6  # the last valid index
    want = torch.tensor([sampled[p].item() if p >= 0 else ids[t].item() for t, p in enumerate(prev.tolist())],
                        dtype=ids_dtype)  # fmt: skip
    got = get_ops(backend).fill_pending(ids.to(DEVICE), prev.to(DEVICE), sampled.to(DEVICE))
    assert got.dtype == ids_dtype and torch.equal(got.cpu(), want)
    empty = torch.empty(0, dtype=ids_dtype, device=DEVICE)
    assert get_ops(backend).fill_pending(empty, empty.long(), sampled.to(DEVICE)).numel() == 0
