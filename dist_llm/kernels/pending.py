"""Fill the PENDING input ids of a step from the previous step's sampled tokens, on the device.

With overlapped scheduling (runtime/executor.py) the host plans step N+1 before step N's tokens are back:
a decode row's input id is then `sampled[prev_index[t]]`, and `prev_index[t] = -1` keeps `input_ids[t]`.
`fill_pending_ref` does it in torch as four launches (compare, clamp, gather, where); this is one PDL
kernel, so the first kernel of a decode step overlaps the previous step's tail (`_pdl.py`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dist_llm.kernels._pdl import pdl_launch_kwargs, pdl_wait

_BLOCK = 1024


@triton.jit
def _fill_pending_kernel(ids_ptr, prev_ptr, sampled_ptr, out_ptr, T, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_wait(USE_PDL)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < T
    prev = tl.load(prev_ptr + offs, mask=mask, other=-1)
    ids = tl.load(ids_ptr + offs, mask=mask, other=0)
    taken = tl.load(sampled_ptr + tl.maximum(prev, 0), mask=mask & (prev >= 0), other=0)
    tl.store(out_ptr + offs, tl.where(prev >= 0, taken, ids).to(out_ptr.dtype.element_ty), mask=mask)


def fill_pending(input_ids: torch.Tensor, prev_index: torch.Tensor, sampled: torch.Tensor) -> torch.Tensor:
    """`input_ids` [T] with each entry whose `prev_index` is >= 0 replaced by `sampled[prev_index]`; a new
    tensor of `input_ids`' dtype. Indices must lie below `sampled.numel()` (not checked on the device)."""
    assert input_ids.shape == prev_index.shape and input_ids.dim() == 1, (
        f"input_ids {tuple(input_ids.shape)} and prev_index {tuple(prev_index.shape)} must be the same [T]"
    )
    assert input_ids.is_contiguous() and prev_index.is_contiguous() and sampled.is_contiguous()
    out = torch.empty_like(input_ids)
    n = input_ids.numel()
    if n:
        _fill_pending_kernel[(triton.cdiv(n, _BLOCK),)](
            input_ids, prev_index, sampled, out, n, BLOCK=_BLOCK, num_warps=4, **pdl_launch_kwargs(out.device),
        )  # fmt: skip
    return out
