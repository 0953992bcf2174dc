"""What the decode and prefill attention kernels share on the host side."""

from __future__ import annotations

import os

import torch

LOG2E = 1.4426950408889634  # the kernels use exp2: scores are scaled by scale * LOG2E once


def dot_precision(dtype: torch.dtype) -> str:
    """"ieee" makes the kernel upcast dot operands to fp32 (exact fp32 inputs; no tf32 on GPU). The
    interpreter multiplies bf16 operands as raw uint16 bits, so bf16 takes the fp32 path there."""
    interpreting = os.environ.get("TRITON_INTERPRET", "0") == "1"
    return "ieee" if dtype == torch.float32 or (dtype == torch.bfloat16 and interpreting) else "tf32"
