"""Programmatic dependent launch (PDL, Hopper and later) for the decode-path kernels.

A decode step is ~400 small kernels in a row; between two of them the GPU drains the first grid, then
launches and ramps up the second. With PDL the second grid is launched while the first finishes: its
programs become resident and wait at `griddepcontrol.wait` until the first grid has completed and its
writes are visible, so the launch latency is hidden (also inside CUDA graphs, where stream capture keeps
the programmatic edge).

The contract every kernel here keeps: **no global memory access before `pdl_wait`**, except loads of
data that no kernel in the step writes (weights, in the GEMV's prefetch; the step's seq_lens, in decode
attention's early exit). `pdl_wait` also lets the next
kernel launch early. A kernel launched without PDL, or a non-PDL kernel (cuBLAS, NCCL, torch) on either
side, keeps ordinary stream order: the wait returns at once and the trigger is a no-op.

`DIST_LLM_PDL=0` turns it off (for A/B timing); it is never used on the CPU or under the interpreter.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl


@functools.cache
def _device_supports_pdl(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def pdl_enabled(device: torch.device) -> bool:
    """Whether kernels launched on `device` use PDL: a CUDA device of compute capability 9.0 or later,
    and DIST_LLM_PDL is not 0."""
    if device.type != "cuda" or os.environ.get("DIST_LLM_PDL", "1") == "0":
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _device_supports_pdl(index)


def pdl_launch_kwargs(device: torch.device) -> dict:
    """The launch keywords of a kernel that takes a `USE_PDL: tl.constexpr` parameter."""
    return {"USE_PDL": True, "launch_pdl": True} if pdl_enabled(device) else {"USE_PDL": False}


@triton.jit
def pdl_wait(USE_PDL: tl.constexpr):
    """Wait for the previous kernel's writes, then let the next kernel launch. Call it before any load
    or store of activations; a no-op when USE_PDL is false."""
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
