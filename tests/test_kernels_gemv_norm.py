"""The RMSNorm folded into the decode GEMVs (`kernels/gemv_norm.py`): the producer epilogue (residual add,
h * weight, per-program sums of squares) and the consumer's scale, each against its torch twin in
`reference.py`, and the chain of both against the unfolded path (fused add + RMSNorm, then the GEMV).

Without CUDA the kernels run through Triton's interpreter at odd shapes: N below, at and past a BLOCK_N
multiple (the tail rows must not count in the sums of squares), K only a masked tail or a chunk plus one.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import triton  # noqa: E402

from dist_llm.kernels import gemv as gemv_mod  # noqa: E402
from dist_llm.kernels.gemv import gemv  # noqa: E402
from dist_llm.kernels.gemv_norm import gemv_add_norm, gemv_add_norm_supported  # noqa: E402
from dist_llm.kernels.reference import (  # noqa: E402
    fused_add_rms_norm_ref,
    gemv_add_norm_ref,
    gemv_normed_ref,
    linear_ref,
)

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]
TOL = {torch.float32: (3e-5, 2e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}
# producer (N, K): N is the hidden size the norm runs over
PRODUCER_SHAPES = [(7, 5), (33, 515), (18, 100), (16, 64)]
# consumer (N, K): K is the hidden size
CONSUMER_SHAPES = [(7, 33), (40, 18), (1, 64), (20, 515)]
if GPU:
    PRODUCER_SHAPES += [(4096, 4096), (4096, 11008), (5120, 13824)]
    CONSUMER_SHAPES += [(12288, 4096), (22016, 4096), (32000, 4096)]


def randn(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, device=DEVICE) * scale).to(dtype)


def close(actual, expected, dtype, ulps=1):
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(actual, expected, atol=atol * ulps, rtol=rtol * ulps)


def producer_operands(n, k, dtype, act):
    x = randn(1, 2 * k if act else k, dtype=dtype)
    weight = randn(n, k, dtype=dtype, scale=k**-0.5)
    residual = randn(1, n, dtype=dtype)
    norm_weight = (torch.rand(n, device=DEVICE) + 0.5).to(dtype)
    return x, weight, residual, norm_weight


@pytest.mark.parametrize("act", [None, "silu_and_mul"], ids=["", "silu"])
@pytest.mark.parametrize("n,k", PRODUCER_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_add_norm_producer_matches_reference(n, k, dtype, act):
    torch.manual_seed(n * 31 + k)
    x, weight, residual, norm_weight = producer_operands(n, k, dtype, act)
    res_kernel, res_ref = residual.clone(), residual.clone()
    hw, partials = gemv_add_norm(x, weight, res_kernel, norm_weight, act=act)
    hw_ref, ss_ref = gemv_add_norm_ref(x, weight, res_ref, norm_weight, act=act)

    close(res_kernel, res_ref, dtype)  # the GEMV's sums may tip an ulp; the add after it is the reference's
    block_n = gemv_mod._config(1, n, k, x.element_size())[0]
    assert partials.shape == (triton.cdiv(n, block_n),) and partials.dtype == torch.float32
    # the epilogue's own outputs agree with each other exactly: hw from the stored residual, and the partial
    # sums (tail rows past N excluded) adding up to its sum of squares
    h = res_kernel.float()
    assert torch.equal(hw, (h * norm_weight.float()).to(dtype))
    torch.testing.assert_close(partials.sum(), h.pow(2).sum(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(partials.sum(), ss_ref[0], rtol=TOL[dtype][1] * 4, atol=1e-5)
    close(hw, hw_ref, dtype, ulps=2)
    if dtype != torch.float32:  # one rounding of the same numbers: nearly always the same bits
        assert (res_kernel == res_ref).float().mean() >= 0.9


@pytest.mark.parametrize("bias", [False, True], ids=["", "bias"])
@pytest.mark.parametrize("n,k", CONSUMER_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_normed_consumer_matches_reference(n, k, dtype, bias):
    torch.manual_seed(n * 7 + k)
    hw = randn(1, k, dtype=dtype)
    weight = randn(n, k, dtype=dtype, scale=k**-0.5)
    b = randn(n, dtype=dtype) if bias else None
    partials = torch.rand(13, device=DEVICE) * k * 4  # an odd count: masked in the tree
    out = torch.full((1, n), float("nan"), dtype=dtype, device=DEVICE)
    y = gemv(hw, weight, b, out=out, norm=(partials, 1e-5))
    assert y is out
    close(y, gemv_normed_ref(hw, weight, b, partials, 1e-5), dtype)
    # and it is the plain GEMV's sums times the scale (not the plain call with a different x)
    plain = gemv(hw, weight, None).float()
    scale = torch.rsqrt(partials.sum() / k + 1e-5)
    close(y.float() - (b.float() if bias else 0.0), plain * scale, dtype, ulps=4)
    # deterministic: the partials' tree has a fixed order
    assert torch.equal(gemv(hw, weight, b, norm=(partials, 1e-5)), y)


@pytest.mark.parametrize("n_mid,n_out", [(18, 7), (33, 40)])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_fold_chain_equals_the_unfolded_norm(n_mid, n_out, dtype):
    """o-like producer then gate_up-like consumer against GEMV, fused add + RMSNorm, GEMV."""
    torch.manual_seed(n_mid + n_out)
    x, w1, residual, norm_weight = producer_operands(n_mid, 70, dtype, None)
    w2 = randn(n_out, n_mid, dtype=dtype, scale=n_mid**-0.5)
    res_fold, res_plain = residual.clone(), residual.clone()
    hw, partials = gemv_add_norm(x, w1, res_fold, norm_weight)
    folded = gemv(hw, w2, None, norm=(partials, 1e-6))

    y = gemv(x, w1, None)
    fused_add_rms_norm_ref(y, res_plain, norm_weight, 1e-6)  # y <- normed, res_plain <- new residual
    assert torch.equal(res_fold, res_plain)  # the same GEMV sums, then the same add
    close(folded, linear_ref(y, w2), dtype, ulps=3)  # rounded once less than HF: within a few ulps


def test_supported_and_errors():
    x = randn(1, 16, dtype=torch.bfloat16)
    weight = randn(8, 16, dtype=torch.bfloat16)
    residual = randn(1, 8, dtype=torch.bfloat16)
    nw = randn(8, dtype=torch.bfloat16)
    assert gemv_add_norm_supported(x, weight, residual, nw)
    assert not gemv_add_norm_supported(x.repeat(2, 1), weight, residual.repeat(2, 1), nw)  # one token only
    assert not gemv_add_norm_supported(x, weight, residual.float(), nw)  # residual in x's dtype
    assert not gemv_add_norm_supported(x, weight, randn(1, 9, dtype=torch.bfloat16), nw)
    assert not gemv_add_norm_supported(x, weight, residual, randn(16, 2, dtype=torch.bfloat16)[:, 0])
    with pytest.raises(AssertionError, match="gemv_add_norm cannot take"):
        gemv_add_norm(x, weight, residual.float(), nw)
    with pytest.raises(AssertionError, match="one row"):
        gemv(x.repeat(2, 1), weight, None, norm=(torch.ones(3, device=DEVICE), 1e-5))
