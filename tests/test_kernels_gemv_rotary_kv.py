"""The qkv GEMV with rotary and the KV-cache write in its epilogue (`kernels/gemv_rotary_kv.py`) against
the two kernels it replaces (`gemv` then `rotary_and_write_kv`) and against reference.py.

Without CUDA the kernels run through Triton's interpreter (TRITON_INTERPRET=1 is set here before anything
imports triton), at small shapes chosen to hit every path of the row mapping: rotary pairs that run across
head boundaries and from q into k (head_dim 80 and 18 at BLOCK_N 32 and 8), a partial last rotary program
and a partial v tile, K that is only a masked tail, a full chunk plus a tail, several chunks. `out` is a
view with sentinel columns around it, and the caches start as a sentinel, so stray stores show. The fused
kernel must match the unfused pair bit for bit (out and both caches; on the GPU, rotated fp32 values to
an ulp, see `check`), and the reference within tolerance.
"""

from __future__ import annotations

import importlib
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from dist_llm.kernels import gemv as gemv_mod  # noqa: E402
from dist_llm.kernels import gemv_rotary_kv as fused_mod  # noqa: E402
from dist_llm.kernels import reference as ref  # noqa: E402
from dist_llm.kernels.gemv import gemv  # noqa: E402
from dist_llm.kernels.gemv_rotary_kv import gemv_rotary_kv, gemv_rotary_kv_supported  # noqa: E402
from dist_llm.kernels.rotary_kv import rotary_and_write_kv  # noqa: E402

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]
TOL = {torch.float32: (2e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}
SENTINEL = -777.0
NUM_BLOCKS, BLOCK_SIZE, MAX_POS = 5, 4, 512
MID_BLOCK_SLOT = 6  # block 1, offset 2

# (hq, hk, head_dim, K), with the one-row 16-bit (BLOCK_N, BLOCK_K) of `gemv._config`; fp32 takes BLOCK_N 8
# and BLOCK_K next_power_of_2(K) up to 512. A covering set, each case run in every dtype.
CASES = [
    (5, 1, 64, 120),  # GQA 5:1; (32, 128): K only a masked tail
    (2, 1, 80, 260),  # (32, 256) over head_dim 80: pairs straddle heads, last rotary and v programs partial
    (2, 1, 128, 300),  # (32, 256): the prefetched chunk, then a tail of 44
    (3, 3, 64, 256),  # MHA; (32, 256): K one even chunk, no tail
    (3, 2, 96, 200),  # (32, 256): head_dim 96, three programs a head
    (3, 2, 18, 30),  # (8, 32): N = 126 > 4K; an odd half (9), N not a multiple of BLOCK_N
]
if GPU:  # Llama-2-7B, Llama-3-8B and Qwen2-7B attention at tp=1 and tp=2
    CASES += [(32, 32, 128, 4096), (16, 16, 128, 4096), (32, 8, 128, 4096), (16, 4, 128, 4096), (28, 4, 128, 3584)]


def case_id(case):
    return "q{}-k{}-d{}-K{}".format(*case)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def randn(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, device=DEVICE) * scale).to(dtype)


def make_inputs(hq, hk, head_dim, k, dtype, bias, slot, cos_sin_dtype=torch.float32):
    """x [1, K] (a strided view), weight, bias, positions, cos_sin_cache, slot_mapping and a sentinel cache."""
    n = (hq + 2 * hk) * head_dim
    x = randn(1, k + 16, dtype=dtype)[:, 8 : 8 + k]
    weight = randn(n, k, dtype=dtype, scale=k**-0.5)
    b = randn(n, dtype=dtype) if bias else None
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = torch.outer(torch.arange(MAX_POS, dtype=torch.float32), inv_freq)
    cos_sin = torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(device=DEVICE, dtype=cos_sin_dtype)
    positions = torch.tensor([301], device=DEVICE)
    slots = torch.tensor([slot], device=DEVICE, dtype=torch.int32)
    cache = torch.full((NUM_BLOCKS, BLOCK_SIZE, hk, head_dim), SENTINEL, dtype=dtype, device=DEVICE)
    return x, weight, b, positions, cos_sin, slots, cache


def sentinel_out(n, dtype):
    """A NaN-filled [1, n] view with sentinel columns on both sides."""
    buf = torch.full((1, n + 6), SENTINEL, dtype=dtype, device=DEVICE)
    buf[:, 3 : 3 + n] = float("nan")
    return buf, buf[:, 3 : 3 + n]


def views(out, hq, hk, head_dim):
    q, k, v = out.split((hq * head_dim, hk * head_dim, hk * head_dim), dim=1)
    return q.unflatten(1, (hq, head_dim)), k.unflatten(1, (hk, head_dim)), v.unflatten(1, (hk, head_dim))


def run_fused(inputs, hq, hk, head_dim):
    x, weight, b, positions, cos_sin, slots, cache = inputs
    buf, out = sentinel_out(weight.shape[0], x.dtype)
    k_cache, v_cache = cache.clone(), cache.clone()
    assert gemv_rotary_kv_supported(x, weight, positions, cos_sin, True, k_cache, v_cache, slots, hq, hk, head_dim)
    got = gemv_rotary_kv(x, weight, b, out, positions, cos_sin, k_cache, v_cache, slots, hq, hk, head_dim)
    assert got is out
    n = weight.shape[0]
    assert (buf[:, :3] == SENTINEL).all() and (buf[:, 3 + n :] == SENTINEL).all(), "wrote outside out"
    return out, k_cache, v_cache


def run_unfused(inputs, hq, hk, head_dim, linear=gemv, rotary_kv=rotary_and_write_kv):
    x, weight, b, positions, cos_sin, slots, cache = inputs
    out = torch.empty(1, weight.shape[0], dtype=x.dtype, device=DEVICE)
    k_cache, v_cache = cache.clone(), cache.clone()
    linear(x, weight, b, out=out)
    rotary_kv(positions, *views(out, hq, hk, head_dim), cos_sin, True, k_cache, v_cache, slots)
    return out, k_cache, v_cache


def check(case, dtype, bias, slot, cos_sin_dtype=torch.float32):
    hq, hk, head_dim, k = case
    inputs = make_inputs(hq, hk, head_dim, k, dtype, bias, slot, cos_sin_dtype)
    got = run_fused(inputs, hq, hk, head_dim)
    unfused = run_unfused(inputs, hq, hk, head_dim)
    # bit for bit, except rotated values in compiled fp32: LLVM picks which product of each rotary pair to
    # fuse into an FMA anew for each specialization of the rotary kernel, so they may be an ulp apart; for
    # 16-bit q/k, `gemv._rotate_pair` fuses the ones Triton 3.6 picks there (seen bit for bit on an H200)
    exact = DEVICE == "cpu" or dtype != torch.float32
    for name, a, b in zip(("out", "k_cache", "v_cache"), got, unfused):
        if exact or name == "v_cache":
            assert torch.equal(a, b), f"{name} differs from gemv + rotary_and_write_kv"
        else:
            torch.testing.assert_close(a, b, atol=1e-6, rtol=2.5e-7, msg=f"{name}: over an ulp from the two kernels")
    assert torch.equal(views(got[0], hq, hk, head_dim)[2], views(unfused[0], hq, hk, head_dim)[2]), "v differs"
    expected = run_unfused(inputs, hq, hk, head_dim, ref.linear_ref, ref.rotary_and_write_kv_ref)
    atol, rtol = TOL[dtype]
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol, equal_nan=False)

    out, k_cache, v_cache = got
    q, k_rot, v = views(out, hq, hk, head_dim)
    q0 = views(ref.linear_ref(*inputs[:3]), hq, hk, head_dim)[0]
    assert (q.float() - q0.float()).abs().max() > 0.1, "q was not rotated"
    flat_k, flat_v = k_cache.flatten(0, 1), v_cache.flatten(0, 1)
    untouched = torch.ones(flat_k.shape[0], dtype=torch.bool, device=DEVICE)
    if slot >= 0:
        assert torch.equal(flat_k[slot], k_rot[0]) and torch.equal(flat_v[slot], v[0])
        untouched[slot] = False
    assert (flat_k[untouched] == SENTINEL).all() and (flat_v[untouched] == SENTINEL).all(), "stray cache store"


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_gemv_rotary_kv_equals_the_two_kernels(case, dtype):
    """Bias, and a cache store or a padding slot, alternate over the cases and dtypes (each pair is covered)."""
    i = CASES.index(case) + DTYPES.index(dtype)
    check(case, dtype, bias=i % 2 == 0, slot=MID_BLOCK_SLOT if i % 3 else -1)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", CASES[:3], ids=case_id)
def test_gemv_rotary_kv_with_the_norm_folded_in(case, dtype):
    """norm=(partials, eps) (`gemv_norm.py`): the sums scaled before the rotary, bit for bit what the plain GEMV
    with the same norm= then `rotary_and_write_kv` give."""
    hq, hk, head_dim, k = case
    x, weight, b, positions, cos_sin, slots, cache = make_inputs(hq, hk, head_dim, k, dtype, True, MID_BLOCK_SLOT)
    norm = (torch.rand(11, device=DEVICE) * k, 1e-5)
    outs = []
    for fused in (True, False):
        out = torch.empty(1, weight.shape[0], dtype=dtype, device=DEVICE)
        k_cache, v_cache = cache.clone(), cache.clone()
        if fused:
            gemv_rotary_kv(x, weight, b, out, positions, cos_sin, k_cache, v_cache, slots, hq, hk, head_dim, norm=norm)
        else:
            gemv(x, weight, b, out=out, norm=norm)
            rotary_and_write_kv(positions, *views(out, hq, hk, head_dim), cos_sin, True, k_cache, v_cache, slots)
        outs.append((out, k_cache, v_cache))
    exact = DEVICE == "cpu" or dtype != torch.float32  # as in `check`
    for name, a, c in zip(("out", "k_cache", "v_cache"), *outs):
        if exact:
            assert torch.equal(a, c), name
        else:
            torch.testing.assert_close(a, c, atol=1e-6, rtol=2.5e-7, msg=name)
    plain = gemv(x, weight, b)
    assert (views(outs[0][0], hq, hk, head_dim)[2] - views(plain, hq, hk, head_dim)[2]).abs().max() > 0, "not scaled"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gemv_rotary_kv_many_k_chunks(monkeypatch, dtype):
    """Several unmasked chunks after the prefetched one, then a tail: BLOCK_K capped at 32; a bf16 cos/sin
    cache (it is read in its own dtype, as the rotary kernel reads it)."""
    monkeypatch.setattr(gemv_mod, "_MAX_BLOCK_K", 32)
    check((3, 1, 64, 111), dtype, bias=True, slot=MID_BLOCK_SLOT, cos_sin_dtype=torch.bfloat16)


def test_gemv_rotary_kv_strided_caches():
    """k and v caches that are views into one allocation (k and v interleaved per block)."""
    hq, hk, head_dim, k = 1, 1, 64, 48
    x, weight, b, positions, cos_sin, slots, cache = make_inputs(hq, hk, head_dim, k, torch.bfloat16, True, 9)
    kv = torch.full((NUM_BLOCKS, 2, BLOCK_SIZE, hk, head_dim), SENTINEL, dtype=torch.bfloat16, device=DEVICE)
    expected_kv = kv.clone()
    out = gemv_rotary_kv(x, weight, b, None, positions, cos_sin, kv[:, 0], kv[:, 1], slots, hq, hk, head_dim)
    expected = gemv(x, weight, b)
    rotary_and_write_kv(positions, *views(expected, hq, hk, head_dim), cos_sin, True, expected_kv[:, 0],
                        expected_kv[:, 1], slots)  # fmt: skip
    assert torch.equal(out, expected) and torch.equal(kv, expected_kv)


def test_gemv_rotary_kv_supported_refuses_what_it_cannot_do():
    """Callers fall back to gemv + rotary_and_write_kv whenever the predicate says no."""
    hq, hk, d = 4, 2, 64
    x, w, _, pos, cs, slots, cache = make_inputs(hq, hk, d, 32, torch.float16, False, 3)

    def supported(**kw):
        args = dict(x=x, weight=w, positions=pos, cos_sin_cache=cs, is_neox=True, k_cache=cache, v_cache=cache,
                    slot_mapping=slots, num_q_heads=hq, num_kv_heads=hk, head_dim=d)  # fmt: skip
        return gemv_rotary_kv_supported(**{**args, **kw})

    assert supported()
    two = torch.tensor([3, 4], device=DEVICE)
    refused = {
        "GPT-J layout": dict(is_neox=False),
        "partial rotary": dict(cos_sin_cache=cs[:, : d // 2].contiguous()),
        "two tokens": dict(x=x.expand(2, -1)),
        "two positions": dict(positions=two),
        "odd head_dim": dict(head_dim=d - 1),
        "heads do not fill N": dict(num_q_heads=hq + 1),
        "cache dtype": dict(k_cache=cache.float(), v_cache=cache.float()),
        "cache head count": dict(k_cache=cache[:, :, :1], v_cache=cache[:, :, :1]),
        "cache strided in head_dim": dict(v_cache=torch.cat((cache, cache), -1)[..., ::2]),
        "unbound cache": dict(k_cache=torch.empty(0, device=DEVICE), v_cache=torch.empty(0, device=DEVICE)),
        "float positions": dict(positions=pos.float()),
        "fp64": dict(x=x.double(), weight=w.double(), k_cache=cache.double(), v_cache=cache.double()),
    }
    for why, kw in refused.items():
        assert not supported(**kw), why
    with pytest.raises(AssertionError, match="gemv_rotary_kv cannot take"):
        gemv_rotary_kv(x, w, None, None, pos, cs[:, : d // 2].contiguous(), cache, cache, slots, hq, hk, d)


def test_fuse_switch_reads_the_environment(monkeypatch):
    """DIST_LLM_GEMV_ROPE=1 turns the fusion on for callers, off otherwise (the function itself always fuses)."""
    try:
        for value, expected in (("0", False), ("1", True)):
            monkeypatch.setenv("DIST_LLM_GEMV_ROPE", value)
            assert importlib.reload(fused_mod).FUSE_ROPE_KV is expected
        monkeypatch.delenv("DIST_LLM_GEMV_ROPE")
        assert importlib.reload(fused_mod).FUSE_ROPE_KV is False
    finally:
        monkeypatch.undo()
        importlib.reload(fused_mod)


# ---- GPU: a CUDA graph with PDL, as the decode step runs it ------------------------------------------------


@pytest.mark.gpu
def test_gemv_rotary_kv_in_a_pdl_graph_equals_two_kernels():
    """Captured in a CUDA graph after a kernel that writes x (with PDL on Hopper), the fused call gives what
    the two kernels give: reading x, positions or the slot before `pdl_wait` would race with the producer."""
    from dist_llm.kernels.rmsnorm import fused_add_rms_norm

    hq, hk, d, k = 32, 8, 128, 4096
    x, w, b, pos, cs, slots, cache = make_inputs(hq, hk, d, k, torch.bfloat16, True, MID_BLOCK_SLOT)
    x, res, norm_w = x.contiguous(), randn(1, k, dtype=torch.bfloat16), randn(k, dtype=torch.bfloat16)
    results = []
    for fused in (True, False):
        xx, rr, kc, vc = x.clone(), res.clone(), cache.clone(), cache.clone()
        out = torch.empty(1, w.shape[0], dtype=torch.bfloat16, device=DEVICE)

        def step(fused=fused, xx=xx, rr=rr, kc=kc, vc=vc, out=out):
            fused_add_rms_norm(xx, rr, norm_w, 1e-5)
            if fused:
                gemv_rotary_kv(xx, w, b, out, pos, cs, kc, vc, slots, hq, hk, d)
            else:
                gemv(xx, w, b, out=out)
                rotary_and_write_kv(pos, *views(out, hq, hk, d), cs, True, kc, vc, slots)

        step()  # compile outside the capture
        xx.copy_(x), rr.copy_(res), kc.copy_(cache), vc.copy_(cache)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        graph.replay()
        torch.cuda.synchronize()
        results.append((out.clone(), kc.clone(), vc.clone()))
    for name, a, b in zip(("out", "k_cache", "v_cache"), *results):
        assert torch.equal(a, b), f"{name} differs from gemv + rotary_and_write_kv in a graph"
