"""`round_to(x, dtype)`: cast to `dtype` with round-to-nearest-even, also under TRITON_INTERPRET.

On the GPU `x.to(tl.bfloat16)` already rounds to nearest even. Triton's CPU interpreter truncates
fp32 -> bf16 instead, so bf16 results would drift one ulp from torch. Under the interpreter only, the
rounding is done on the fp32 bits and the bf16 is their upper half (subnormals included); compiled
kernels keep the plain cast. NaN payloads are not preserved there (interpreter only).

fp8 e4m3fn (`tl.float8e4nv`, the fp8 KV cache) likewise: on the GPU (sm_89+) the cast is
`cvt.rn.satfinite`, nearest even and saturated to +-448, which is what torch gives for
`x.clamp(-448, 448).to(torch.float8_e4m3fn)`. The interpreter's cast drops carries (31.68 -> 16, not 32)
and does not tie to even, but it is exact on values e4m3fn holds, so there the value is rounded in fp32
first: |x| clamped to 448, then rounded to a multiple of its e4m3 quantum 2^(max(e, -6) - 3) (e: the
unbiased fp32 exponent; -6 is e4m3's smallest normal exponent, so subnormals get the quantum 2^-9).
NaN is not preserved there (interpreter only).
"""

import os

import triton
import triton.language as tl

_INTERPRET = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


@triton.jit
def _round_e4m3_in_fp32(x):
    """x (fp32) rounded to the nearest e4m3fn value (ties to even, saturated to +-448), still in fp32."""
    bits = x.to(tl.uint32, bitcast=True)
    a = tl.minimum(tl.abs(x), 448.0)
    exp = (a.to(tl.uint32, bitcast=True) >> 23).to(tl.int32)  # biased; a is non-negative
    quantum = ((tl.maximum(exp, 127 - 6) - 3).to(tl.uint32) << 23).to(tl.float32, bitcast=True)
    # a / quantum < 2^5 is exact; adding and subtracting 2^23 rounds it to an integer, nearest even
    r = (a / quantum + 8388608.0) - 8388608.0
    y = r * quantum
    return tl.where((bits >> 31) != 0, -y, y)  # from the sign bit: -0.0 and values rounding to -0 keep it


@triton.jit
def round_to(x, dtype: tl.constexpr):
    if _INTERPRET and dtype == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        y = bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    elif _INTERPRET and dtype == tl.float8e4nv:
        y = _round_e4m3_in_fp32(x.to(tl.float32)).to(dtype)
    else:
        y = x.to(dtype)
    return y
