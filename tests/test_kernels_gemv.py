"""The decode GEMV kernel (`kernels/gemv.py`) against `reference.linear_ref`, and against F.linear on the GPU.

Without CUDA the kernel runs through Triton's interpreter at odd shapes chosen to hit every path: N below,
at and past a BLOCK_N multiple (the clamped tail rows), K that is only a masked tail, an even multiple of
BLOCK_K, and a full chunk plus a tail. Outputs are strided views poisoned with NaN, with sentinel columns
around them that must survive.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from dist_llm.kernels import gemv as gemv_mod  # noqa: E402
from dist_llm.kernels.gemv import MAX_M, gemv, gemv_supported  # noqa: E402
from dist_llm.kernels.reference import linear_ref  # noqa: E402

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]
# Outputs are O(1); the kernel and the reference differ only in the fp32 summation order, so fp16/bf16
# results are the same rounding of nearly the same number: at most an ulp apart.
TOL = {torch.float32: (2e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}
SENTINEL = -777.0
# (N, K) with BLOCK_N = 8: N below it, N = 1, one past a multiple, a tail of 2, an exact multiple; K that
# is only a masked tail (5, 100), even (64), one full 512 chunk + a masked tail of 3 (515)
SHAPES = [(7, 5), (1, 64), (33, 515), (18, 100), (16, 64)]
if GPU:
    SHAPES += [(4096, 4096), (1000, 11008), (16400, 4096), (20000, 1000)]


def randn(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, device=DEVICE) * scale).to(dtype)


def operands(m, n, k, dtype, bias: bool):
    """x [m, k] as a strided view (row stride k + 16), weight [n, k] scaled so that outputs are O(1)."""
    x = randn(m, k + 16, dtype=dtype)[:, 8 : 8 + k]
    weight = randn(n, k, dtype=dtype, scale=k**-0.5)
    b = randn(n, dtype=dtype) if bias else None
    return x, weight, b


def close(actual, expected, dtype):
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, equal_nan=False)
    if dtype != torch.float32 and expected.numel() >= 100:
        # one rounding of nearly the same fp32 sum: bit-identical except where the summation order tips
        # it. A second rounding (say, of the product before the bias add) would differ far more often.
        same = (actual == expected).float().mean().item()
        assert same >= 0.95, f"only {same:.1%} of elements bit-identical to the reference"


def poisoned_out(m, n, dtype):
    """A NaN-filled [m, n] view with sentinel columns on both sides (row stride n + 6)."""
    buf = torch.full((m, n + 6), SENTINEL, dtype=dtype, device=DEVICE)
    buf[:, 3 : 3 + n] = float("nan")
    return buf, buf[:, 3 : 3 + n]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("m", range(1, MAX_M + 1))
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_gemv_matches_reference(dtype, m, n, k, bias):
    x, weight, b = operands(m, n, k, dtype, bias)
    assert gemv_supported(x, weight)
    expected = linear_ref(x, weight, b)
    buf, out = poisoned_out(m, n, dtype)
    assert gemv(x, weight, b, out=out) is out
    close(out, expected, dtype)
    assert (buf[:, :3] == SENTINEL).all() and (buf[:, 3 + n :] == SENTINEL).all(), "wrote outside out"
    if not bias:  # contiguous x, allocated out (half the cases, to keep the interpreter run short)
        got = gemv(x.contiguous(), weight)
        assert got.dtype == dtype and got.shape == (m, n)
        torch.testing.assert_close(got, out, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("m,n,k", [(1, 9, 96), (3, 20, 100), (4, 5, 127)])
def test_gemv_many_k_chunks(monkeypatch, dtype, m, n, k):
    """Several unmasked chunks before the tail (or none): force BLOCK_K = 32 at a small K."""
    monkeypatch.setattr(gemv_mod, "_MAX_BLOCK_K", 32)
    x, weight, b = operands(m, n, k, dtype, bias=True)
    _, out = poisoned_out(m, n, dtype)
    close(gemv(x, weight, b, out=out), linear_ref(x, weight, b), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("m,n,k", [(1, 9, 100), (3, 5, 127)])
def test_gemv_prefetch_depth_changes_no_bit(monkeypatch, dtype, m, n, k):
    """0-3 weight chunks loaded before the wait (32-wide chunks here: 3 full ones and a tail, or fewer when K
    holds fewer): the same bits as the default of one."""
    monkeypatch.setattr(gemv_mod, "_MAX_BLOCK_K", 32)
    x, w = torch.randn(m, k, device=DEVICE).to(dtype), torch.randn(n, k, device=DEVICE).to(dtype)
    want = gemv(x, w)
    for chunks in (0, 2, 3):
        monkeypatch.setattr(gemv_mod, "PREFETCH_CHUNKS", chunks)
        assert gemv_mod.prefetch_chunks(k, 32) == min(chunks, k // 32)
        assert torch.equal(gemv(x, w), want), f"{chunks} chunks"
    assert gemv_mod.prefetch_chunks(k=40, block_k=32) == 1  # K holds one full chunk only


def test_gemv_prefetch_setting_is_checked(monkeypatch):
    monkeypatch.setenv("DIST_LLM_GEMV_PREFETCH", "2")
    assert gemv_mod._prefetch_setting() == 2
    monkeypatch.setenv("DIST_LLM_GEMV_PREFETCH", "4")
    with pytest.raises(ValueError, match="give 0, 1, 2 or 3"):
        gemv_mod._prefetch_setting()


@pytest.mark.parametrize("m", [2, 3])
def test_gemv_wide_n_config(monkeypatch, m):
    """Past one row, wide N takes BLOCK_N = 16 for M = 2 (8 otherwise); both must be right across the N tail."""
    monkeypatch.setattr(gemv_mod, "_WIDE_N", 16)
    assert gemv_mod._config(m, 40, 64)[0] == (16 if m <= 2 else 8)
    x, weight, b = operands(m, 40, 64, torch.bfloat16, bias=True)
    _, out = poisoned_out(m, 40, torch.bfloat16)
    close(gemv(x, weight, b, out=out), linear_ref(x, weight, b), torch.bfloat16)


# one row of 16-bit weights: (N, K) in each aspect class of `_config`, with its (BLOCK_N, num_warps)
ONE_ROW_CLASSES = {"long rows": (5, 96, 8, 4), "square": (40, 64, 16, 8), "tall": (100, 64, 32, 4),
                   "wide": (300, 64, 8, 4)}  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("aspect", list(ONE_ROW_CLASSES))
def test_gemv_one_row_configs(monkeypatch, dtype, aspect):
    """Each one-row config, with several K chunks (BLOCK_K capped at 32) and an N tail, matches the reference;
    fp32 keeps the many-row config."""
    n, k, block_n, num_warps = ONE_ROW_CLASSES[aspect]
    monkeypatch.setattr(gemv_mod, "_MAX_BLOCK_K", 32)
    assert gemv_mod._config(1, n, k, 2) == (block_n, 32, num_warps)
    assert gemv_mod._config(1, n, k, 4)[2] == 8
    x, weight, b = operands(1, n, k, dtype, bias=True)
    _, out = poisoned_out(1, n, dtype)
    close(gemv(x, weight, b, out=out), linear_ref(x, weight, b), dtype)


def test_gemv_card_table(monkeypatch):
    """A card's table overrides the rule for its one-row shapes only; card() is "" off the GPU; launches take it."""
    assert gemv_mod._config(1, 12288, 4096, 2, "H100") == (8, 1024, 8)
    assert gemv_mod._config(1, 12288, 4096, 2) == (32, 256, 4)  # the rule, tuned on an H200
    assert gemv_mod._config(2, 12288, 4096, 2, "H100") == gemv_mod._config(2, 12288, 4096, 2)
    assert gemv_mod._config(1, 4096, 4096, 2, "H100") == gemv_mod._config(1, 4096, 4096, 2)  # not in its table
    assert gemv_mod.card(torch.device("cpu")) == ""
    monkeypatch.setattr(gemv_mod, "_TUNED_ONE_ROW_BY_CARD", {"X": {(40, 64): (4, 32, 4)}})
    monkeypatch.setattr(gemv_mod, "card", lambda device: "X")
    assert gemv_mod._config(1, 40, 64, 2, "X") == (4, 32, 4)
    x, weight, b = operands(1, 40, 64, torch.bfloat16, bias=True)
    _, out = poisoned_out(1, 40, torch.bfloat16)
    close(gemv(x, weight, b, out=out), linear_ref(x, weight, b), torch.bfloat16)


def test_gemv_fp32_bias_on_bf16():
    """An fp32 bias is added in fp32 before the single rounding to x.dtype."""
    x, weight, _ = operands(2, 33, 100, torch.bfloat16, bias=False)
    b = randn(33) * 3
    close(gemv(x, weight, b), linear_ref(x, weight, b), torch.bfloat16)


def test_gemv_supported_refuses_what_it_cannot_do(monkeypatch):
    x, w = randn(2, 64), randn(10, 64)
    assert gemv_supported(x, w) and gemv_supported(randn(MAX_M, 64), w)
    refused = {
        "no rows": (randn(0, 64), w),
        "too many rows": (randn(MAX_M + 1, 64), w),
        "1-D x": (randn(64), w),
        "3-D x": (randn(1, 2, 64), w),
        "K mismatch": (randn(2, 63), w),
        "dtype mismatch": (x.half(), w),
        "fp64": (x.double(), w.double()),
        "int": (x.int(), w.int()),
        "x column-strided": (randn(64, 2).t(), w),
        "weight transposed": (x, randn(64, 10).t()),
    }
    for why, (xx, ww) in refused.items():
        assert not gemv_supported(xx, ww), why
    with pytest.raises(AssertionError, match="gemv cannot take"):
        gemv(randn(MAX_M + 1, 64), w)
    if not GPU:
        monkeypatch.setattr(gemv_mod, "_INTERPRET", False)  # a CPU tensor without the interpreter
        assert not gemv_supported(x, w)


def test_gemv_checks_out_and_bias():
    x, w = randn(2, 64), randn(10, 64)
    with pytest.raises(AssertionError):
        gemv(x, w, out=torch.empty(2, 10, dtype=torch.float16, device=DEVICE))
    with pytest.raises(AssertionError):
        gemv(x, w, out=torch.empty(10, 2, device=DEVICE).t())
    with pytest.raises(AssertionError):
        gemv(x, w, bias=randn(11))


# ---- GPU: Llama-2-7B decode shapes against cuBLAS -------------------------------------------------

LLAMA_7B = {"qkv": (12288, 4096), "o": (4096, 4096), "gate_up": (22016, 4096), "down": (4096, 11008),
            "lm_head": (32000, 4096),
            # one rank's shards at tp=2: configs from gemv._TUNED_ONE_ROW at one row
            "qkv_tp2": (6144, 4096), "o_tp2": (4096, 2048), "lm_head_tp2": (16000, 4096)}  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", list(LLAMA_7B))
def test_gemv_llama7b_shapes_match_f_linear(name, dtype):
    n, k = LLAMA_7B[name]
    weight = randn(n, k, dtype=dtype, scale=k**-0.5)
    for m in range(1, MAX_M + 1):
        x = randn(m, k, dtype=dtype)
        out = gemv(x, weight)
        close(out, linear_ref(x, weight), dtype)
        # cuBLAS may reduce in another order (split-K), so only the dtype's tolerance applies
        atol, rtol = TOL[dtype]
        torch.testing.assert_close(out, F.linear(x, weight), atol=atol, rtol=rtol)
        assert torch.equal(gemv(x, weight), out), "not deterministic"


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(LLAMA_7B))
def test_gemv_prefetch_depth_changes_no_bit_at_llama7b_shapes(monkeypatch, name):
    n, k = LLAMA_7B[name]
    weight, x = randn(n, k, dtype=torch.bfloat16, scale=k**-0.5), randn(1, k, dtype=torch.bfloat16)
    want = gemv(x, weight)
    for chunks in (0, 2, 3):
        monkeypatch.setattr(gemv_mod, "PREFETCH_CHUNKS", chunks)
        assert torch.equal(gemv(x, weight), want), f"{chunks} chunks"


@pytest.mark.gpu
def test_gemv_captures_in_a_cuda_graph():
    n, k = LLAMA_7B["qkv"]
    weight, bias = randn(n, k, dtype=torch.bfloat16, scale=k**-0.5), randn(n, dtype=torch.bfloat16)
    x = randn(2, k, dtype=torch.bfloat16)
    out = torch.empty(2, n, dtype=torch.bfloat16, device=DEVICE)
    gemv(x, weight, bias, out=out)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        gemv(x, weight, bias, out=out)
    x.copy_(randn(2, k, dtype=torch.bfloat16))
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    close(out, linear_ref(x, weight, bias), torch.bfloat16)


# ---- the down projection with SiLU-and-mul in its prologue ----------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("m", [1, 2, 4])
@pytest.mark.parametrize("n,k", [(7, 5), (33, 515), (16, 64)] + ([(4096, 5504)] if GPU else []))
def test_gemv_silu_and_mul_equals_the_two_kernels(dtype, m, n, k):
    """act="silu_and_mul" reads [gate | up] and must give bit for bit what silu_and_mul then gemv give."""
    from dist_llm.kernels.activation import silu_and_mul
    from dist_llm.kernels.reference import silu_and_mul_ref

    gate_up = randn(m, 2 * k + 16, dtype=dtype, scale=2.0)[:, 8 : 8 + 2 * k]  # strided rows
    weight = randn(n, k, dtype=dtype, scale=k**-0.5)
    assert gemv_supported(gate_up, weight, act="silu_and_mul") and not gemv_supported(gate_up, weight)
    buf, out = poisoned_out(m, n, dtype)
    gemv(gate_up, weight, out=out, act="silu_and_mul")
    assert (buf[:, :3] == SENTINEL).all() and (buf[:, 3 + n :] == SENTINEL).all(), "wrote outside out"
    close(out, linear_ref(silu_and_mul_ref(gate_up), weight), dtype)
    torch.testing.assert_close(out, gemv(silu_and_mul(gate_up), weight), atol=0, rtol=0)


def test_gemv_silu_and_mul_refuses_bad_shapes():
    w = randn(10, 64)
    assert not gemv_supported(randn(2, 64), w, act="silu_and_mul"), "x must be [M, 2K]"
    assert not gemv_supported(randn(2, 128), w, act="gelu"), "unknown activation"
    with pytest.raises(AssertionError, match="act='silu_and_mul'"):
        gemv(randn(2, 64), w, act="silu_and_mul")


@pytest.mark.gpu
def test_pdl_chain_in_a_graph_equals_plain_launches(monkeypatch):
    """A decode-like chain of dependent kernels (norm -> GEMV -> SiLU-GEMV -> norm ...) captured in a CUDA
    graph with programmatic dependent launch gives bit for bit what ordinary launches give: a kernel that
    touched an activation before `pdl_wait` would race with its producer and differ."""
    from dist_llm.kernels._pdl import pdl_enabled
    from dist_llm.kernels.rmsnorm import fused_add_rms_norm

    hidden, inter = 4096, 11008
    up_w = randn(2 * inter, hidden, dtype=torch.bfloat16, scale=hidden**-0.5)
    down_w = randn(hidden, inter, dtype=torch.bfloat16, scale=inter**-0.5)
    norm_w = randn(hidden, dtype=torch.bfloat16)

    def chain(x0, res0):
        x, res = x0.clone(), res0.clone()
        for _ in range(8):
            fused_add_rms_norm(x, res, norm_w, 1e-5)
            x = gemv(gemv(x, up_w), down_w, act="silu_and_mul")
        return x, res

    x0, res0 = randn(1, hidden, dtype=torch.bfloat16), randn(1, hidden, dtype=torch.bfloat16)
    results = {}
    for pdl in ("1", "0"):
        monkeypatch.setenv("DIST_LLM_PDL", pdl)
        chain(x0, res0)  # compile outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = chain(x0, res0)
        graph.replay()
        torch.cuda.synchronize()
        results[pdl] = (out[0].clone(), out[1].clone(), pdl_enabled(x0.device))
    assert results["1"][2] == (torch.cuda.get_device_capability()[0] >= 9) and not results["0"][2]
    torch.testing.assert_close(results["1"][:2], results["0"][:2], atol=0, rtol=0)
