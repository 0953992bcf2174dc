"""What the decode and prefill attention kernels share on the host side."""

from __future__ import annotations

import os

import torch

from dist_llm.kernels.reference import FP8_KV_DTYPE, check_kv_scales

LOG2E = 1.4426950408889634  # the kernels use exp2: scores are scaled by scale * LOG2E once


def dot_precision(dtype: torch.dtype) -> str:
    """"ieee" makes the kernel upcast dot operands to fp32 (exact fp32 inputs; no tf32 on GPU). The
    interpreter multiplies bf16 operands as raw uint16 bits, so bf16 takes the fp32 path there."""
    interpreting = os.environ.get("TRITON_INTERPRET", "0") == "1"
    return "ieee" if dtype == torch.float32 or (dtype == torch.bfloat16 and interpreting) else "tf32"


def check_attention_caches(q, k_cache, v_cache, k_scale: float, v_scale: float) -> bool:
    """Caches of q's dtype (scales 1), or fp8 ones holding K / k_scale and V / v_scale; whether they are fp8."""
    assert k_cache.dtype == v_cache.dtype and k_cache.dtype in (q.dtype, FP8_KV_DTYPE), (
        f"caches must be q's dtype or {FP8_KV_DTYPE}: q {q.dtype}, k_cache {k_cache.dtype}, v_cache {v_cache.dtype}"
    )
    check_kv_scales(k_cache.dtype, k_scale, v_scale)
    return k_cache.dtype == FP8_KV_DTYPE
