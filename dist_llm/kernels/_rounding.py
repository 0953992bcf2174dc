"""`round_to(x, dtype)`: cast fp32 to `dtype` with round-to-nearest-even, also under TRITON_INTERPRET.

On the GPU `x.to(tl.bfloat16)` already rounds to nearest even. Triton's CPU interpreter truncates
fp32 -> bf16 instead, so bf16 results would drift one ulp from torch. Under the interpreter only, the
rounding is done on the fp32 bits and the bf16 is their upper half (subnormals included); compiled
kernels keep the plain cast. NaN payloads are not preserved there (interpreter only).
"""

import os

import triton
import triton.language as tl

_INTERPRET = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


@triton.jit
def round_to(x, dtype: tl.constexpr):
    if _INTERPRET and dtype == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        y = bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        y = x.to(dtype)
    return y
