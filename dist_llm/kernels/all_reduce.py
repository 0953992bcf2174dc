"""One-shot all-reduce over peer (symmetric) memory, for the small tensors of a tensor-parallel decode step.

Each of the W ranks owns a buffer that every peer can address (CUDA P2P over NVLink; `parallel/
custom_all_reduce.py` sets them up). One launch per rank does the whole collective:

1. copy x into this rank's own buffer;
2. barrier with the peers;
3. read the slice from all W buffers **in rank order 0..W-1**, sum in fp32, round once to x's dtype;
4. barrier again, so that no rank overwrites its buffer (in the next call) while a peer still reads it.

Every rank adds the same W numbers in the same order, so all ranks get bit-identical results (the model
needs that: the tp ranks must sample the same token), equal to `reference.all_reduce_ref`. One kernel and
three NVLink round trips (two barriers, one read) replace NCCL's kernel and protocol, ~15 µs per 8 KB
call on an H200 inside a CUDA graph.

The barrier (the pattern of PyTorch's Triton symmetric-memory barriers). Each rank has an int32 signal pad
that every peer can address, zero when idle. Program b of rank r signals program b of each peer p by a
compare-and-swap 0 -> 1 on flag (b * W + r) of p's pad, spinning while the flag is still 1 (p has not
consumed the previous signal yet); then it waits for its own pad's flags (b * W + p), consuming each with a
CAS 1 -> 0. The W flags of each step are swapped at once, one thread per peer. Each barrier leaves every
flag it used back at zero once all ranks are through, so there is no epoch counter to keep on the host:
the same launch, with the same arguments, can be replayed from a CUDA graph forever. The two barriers of a
call use separate flags (the second set starts at MAX_PROGRAMS * W). All accesses to one flag are
serialized: a rank signals it at most once per call, the next call's signal waits for the previous one's
consumption, and a call starts only after this GPU's previous call ended.

Memory ordering. The signalling CAS is a release and the waiting CAS an acquire, both at system scope
(peers are other GPUs). W threads swap the W flags, one each, so `tl.debug_barrier()` (bar.sync) orders
all threads' buffer stores before the releases, and all threads' peer loads after the acquires.

In place: `out` may be `x`. Program b reads x only at its own indices, before the first barrier, and writes
out only at those same indices, after it; no other program or rank ever reads x (peers read the buffer).

Contract for the caller: all W ranks launch the kernel with the same n and dtype, in the same order as
their other collectives; the grid is small (<= MAX_PROGRAMS programs), so all of it is resident at once
and the spinning programs cannot starve the peers they wait for. A rank that never arrives hangs its
peers' GPUs (there is no timeout), as an NCCL collective would until its watchdog fires.

With PDL (`_pdl.py`) the wait comes first: x is the previous kernel's output, and the previous call's
second barrier must be over on this GPU before the buffer is written again.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from dist_llm.kernels._pdl import pdl_launch_kwargs, pdl_wait
from dist_llm.kernels._rounding import round_to

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
MAX_PROGRAMS = 32  # flags per barrier and rank; also the bound that keeps the grid resident
TILE_BYTES = 8192  # one program per 8 KB tile (up to MAX_PROGRAMS); bigger tensors loop over tiles
_NUM_WARPS = 8  # 256 threads: a tile is two 16-byte loads per thread per peer (not swept yet)
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def signal_pad_ints(world_size: int) -> int:
    """int32 flags the kernel uses in each rank's signal pad: two barriers x MAX_PROGRAMS x W."""
    return 2 * MAX_PROGRAMS * world_size


@triton.jit
def _peer_ptr(ptrs, p, dtype: tl.constexpr):
    """Peer p's address from an int64 address table, as a pointer to `dtype` (16-byte aligned)."""
    return tl.multiple_of(tl.load(ptrs + p).to(tl.pointer_type(dtype)), 16)


@triton.jit
def _spin_cas(ptrs, expected: tl.constexpr, desired: tl.constexpr, sem: tl.constexpr):
    """CAS expected -> desired at each of the [W] flag addresses, each retried until it succeeds. The W
    flags are swapped in parallel (one thread each), so a barrier costs one NVLink round trip, not W. A flag
    already swapped is compared with 2, a value no flag holds, so the retries of the others leave it alone."""
    done = tl.zeros(ptrs.shape, dtype=tl.int32)
    while tl.min(done, axis=0) == 0:
        cmp = tl.where(done != 0, 2, expected)
        val = tl.where(done != 0, 2, desired)
        old = tl.atomic_cas(ptrs, cmp, val, sem=sem, scope="sys")
        done = tl.where(old == cmp, 1, done)


@triton.jit
def _barrier(signal_ptrs, flag, RANK: tl.constexpr, WORLD_SIZE: tl.constexpr):
    """Program-wise barrier with the programs of the same index on all peers (see the module docstring).
    `flag` is this program's slot: (barrier * MAX_PROGRAMS + program) * W."""
    peers = tl.arange(0, WORLD_SIZE)
    peer_pads = tl.load(signal_ptrs + peers).to(tl.pointer_type(tl.int32))
    own_pad = tl.load(signal_ptrs + RANK).to(tl.pointer_type(tl.int32))
    tl.debug_barrier()  # every thread's earlier stores happen before the releases below
    _spin_cas(peer_pads + flag + RANK, 0, 1, "release")  # tell every peer this program has arrived
    _spin_cas(own_pad + flag + peers, 1, 0, "acquire")  # wait until every peer has told this one
    tl.debug_barrier()  # the acquires above happen before every thread's later loads


@triton.jit
def _one_shot_all_reduce_kernel(
    x_ptr, out_ptr, buffer_ptrs, signal_ptrs, n,
    RANK: tl.constexpr, WORLD_SIZE: tl.constexpr, BLOCK: tl.constexpr, MAX_PROGRAMS: tl.constexpr,
    USE_PDL: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    step = tl.num_programs(0) * BLOCK
    offs = tl.arange(0, BLOCK)
    dtype = x_ptr.dtype.element_ty
    pdl_wait(USE_PDL)
    own = _peer_ptr(buffer_ptrs, RANK, dtype)
    for start in range(pid * BLOCK, n, step):
        idx = start + offs
        mask = idx < n
        tl.store(own + idx, tl.load(x_ptr + idx, mask=mask), mask=mask)
    _barrier(signal_ptrs, pid * WORLD_SIZE, RANK, WORLD_SIZE)
    for start in range(pid * BLOCK, n, step):
        idx = start + offs
        mask = idx < n
        acc = tl.load(_peer_ptr(buffer_ptrs, 0, dtype) + idx, mask=mask, other=0.0).to(tl.float32)
        for p in tl.static_range(1, WORLD_SIZE):  # rank order: the same sum, bit for bit, on every rank
            acc += tl.load(_peer_ptr(buffer_ptrs, p, dtype) + idx, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + idx, round_to(acc, dtype), mask=mask)
    _barrier(signal_ptrs, (MAX_PROGRAMS + pid) * WORLD_SIZE, RANK, WORLD_SIZE)


def num_programs(numel: int, dtype: torch.dtype) -> int:
    block = TILE_BYTES // dtype.itemsize
    return max(1, min(MAX_PROGRAMS, triton.cdiv(numel, block)))


def one_shot_all_reduce(
    x: torch.Tensor,
    out: torch.Tensor,
    buffer_ptrs: torch.Tensor,
    signal_ptrs: torch.Tensor,
    rank: int,
    world_size: int,
    buffer_bytes: int,
) -> torch.Tensor:
    """out = the sum of the W ranks' x (fp32, in rank order, rounded once), on every rank. `out` may be `x`.

    buffer_ptrs / signal_ptrs: int64 tensors on x's device, [W] addresses of the peers' symmetric buffers
    (`buffer_bytes` each, 16-byte aligned) and int32 signal pads (zeroed once, at least
    `signal_pad_ints(W)` flags). Every rank must make the same call (same numel and dtype), in the same
    order. Nothing is allocated, so the call can be captured in a CUDA graph.
    """
    assert x.dtype in DTYPES, f"one_shot_all_reduce takes {DTYPES}, got {x.dtype}"
    assert x.is_contiguous() and out.is_contiguous(), "x and out must be contiguous"
    assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device, "out must be like x"
    assert x.device.type == "cuda" or (_INTERPRET and x.device.type == "cpu"), f"x is on {x.device}"
    assert x.nbytes <= buffer_bytes, f"{x.nbytes} bytes do not fit the {buffer_bytes}-byte buffer"
    assert 0 <= rank < world_size, f"rank {rank} of {world_size}"
    for name, t in (("buffer_ptrs", buffer_ptrs), ("signal_ptrs", signal_ptrs)):
        assert t.dtype == torch.int64 and t.shape == (world_size,) and t.device == x.device, (
            f"{name} must be int64 [{world_size}] on {x.device}, got {t.dtype} {tuple(t.shape)} on {t.device}"
        )
    n = x.numel()
    if n == 0:
        return out
    _one_shot_all_reduce_kernel[(num_programs(n, x.dtype),)](
        x, out, buffer_ptrs, signal_ptrs, n,
        RANK=rank, WORLD_SIZE=world_size, BLOCK=TILE_BYTES // x.element_size(), MAX_PROGRAMS=MAX_PROGRAMS,
        num_warps=_NUM_WARPS, **pdl_launch_kwargs(x.device),
    )  # fmt: skip
    return out
