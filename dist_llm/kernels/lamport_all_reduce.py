"""Barrier-free ("Lamport") one-shot all-reduce over peer memory, for the small 16-bit tensors of a decode step.

`all_reduce.py` spends three NVLink round trips per call (two barriers and the read). Here there is one
one-way trip, and no barrier: every element carries its own "ready" flag, because the buffers start out
filled with a value that no rank ever writes (the sentinel) and a reader waits until that value is gone.

The sentinel is the 16-bit word 0x8000: negative zero in bf16 and in fp16, so only those dtypes are taken
(fp32 stays on NCCL or the barrier kernel). A rank writes -0.0 as +0.0. The sum is the same unless every
rank's value at an element is -0.0: the exact sum is then -0.0 and this kernel returns +0.0 (x + (-x) is
+0.0 in any case, under round to nearest).

Layout. Each of the W ranks owns a buffer that every peer can address (`parallel/custom_all_reduce.py`):
3 slots, each of W segments of `slot_bytes`; segment p of a slot receives rank p's contribution. Every
16-bit word of it is the sentinel before the first call (`init_buffer`). Each rank also keeps a small int32
`state` of its own (`new_state`): the current slot, the previous call's numel, and an exit count.

One call on rank r, slot s (calls go 0, 1, 2, 0, ...), one program per 8 KB tile (grid stride beyond 32):

1. push: write x (-0.0 made +0.0) into segment r of slot s of EVERY rank's buffer, its own included, with
   plain stores (NVLink P2P for the peers);
2. clear: write the sentinel over the previous call's slot (s + 2) % 3 of its own buffer, in all W
   segments, over the previous call's numel (the call before may have been bigger than this one);
3. wait and reduce: read its own slot s, segments 0..W-1, with volatile loads until no word of the tile is
   the sentinel, then sum them in fp32 **in rank order 0..W-1**, round once to x's dtype, store to out.
   Every rank adds the same W numbers in the same order: bit-identical results on all ranks, equal to
   `reference.all_reduce_ref` (but for the -0.0 case above);
4. exit: the last program out advances the state: slot (s + 1) % 3, previous numel n, exit count 0.

Why three slots. While rank r is in call c (slot c % 3), a peer may already be in call c + 1: it finished
c as soon as it had seen every rank's data, r's included, and it writes slot (c + 1) % 3 into r's buffer.
It cannot be in c + 2, which needs r's data of c + 1, pushed only after r's call c has ended. So peers
write into r's slots c % 3 and (c + 1) % 3 only, and r can clear the third one, (c - 1) % 3: r has seen
every word the peers wrote there in call c - 1 (it waited for each of them), and the next writes to it,
in call c + 2, come after r's call c + 1 push, which stream order on r's GPU puts after this clear.
The slot r reads in call c was cleared by r in call c - 2, which this GPU ran before, so r cannot see a
value left over from call c - 3 (coherence of one address: the old value, r's clear, the new value).
The clear is off the critical path: it runs while the peers' data is on its way.

Memory ordering. Each 16-bit word is written once per use of a slot, by a single aligned store (vector
stores split into words as far as the memory model goes), so a reader sees either the sentinel or the
final value: the data is its own flag, and no fence or flag write is needed between data and flag. The
volatile loads (ld.volatile: not cached in L1, never hoisted out of the loop) see the peer's stores once
they arrive. The pushes and clears are plain (weak) stores, as in TensorRT-LLM's Lamport all-reduce: a
peer's write of call c + 2 lands after r's clear of call c because that clear was complete (r's grid had
ended) before r's call c + 1 push, which the peer must see first; this is an order in time, through this
GPU's L2, rather than one the PTX memory model derives from these weak accesses. The state words are read
after `pdl_wait`, written by the previous call's last program, which ended before (kernel boundary). The
slot and previous numel are read by every program before its exit count atomic (acq_rel, after a
`debug_barrier`, so all of the program's threads are past their reads); the program that counts the last
exit has acquired every other exit, so no program of this call can read the advanced state. The next call
reads it after this grid has completed.

In place: `out` may be `x`. Program b reads x only at its own tiles, in step 1, and writes out only at
those tiles, in step 3; peers never read x (they read their own buffers).

Contract for the caller: all W ranks make the same calls (numel and dtype) in the same order as their
other collectives; the state is per rank and starts at zero on every rank at once, so ranks agree on the
slot. The grid is small (<= all_reduce.MAX_PROGRAMS programs), all resident at once, so waiting programs cannot
starve those they wait for. A rank that never arrives hangs its peers' GPUs (there is no timeout), as an
NCCL collective would until its watchdog fires. With PDL the wait comes first, before any memory access.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from dist_llm.kernels._pdl import pdl_launch_kwargs, pdl_wait
from dist_llm.kernels._rounding import round_to
from dist_llm.kernels.all_reduce import MAX_PROGRAMS, TILE_BYTES, num_programs  # the same tiles and grid bound
from dist_llm.kernels.rmsnorm import _MAX_FUSED_BLOCK, _add_rms_norm_row
from dist_llm.kernels.rmsnorm import _launch_config as _norm_launch_config

DTYPES = (torch.bfloat16, torch.float16)  # 16-bit types whose negative zero is the word 0x8000
SENTINEL = -32768  # 0x8000 as int16: -0.0 in bf16 and fp16
SLOTS = 3
STATE_INTS = 3  # the current slot, the previous call's numel, the exit count
# the same, as the kernel sees them
_SENTINEL, _SLOTS = tl.constexpr(SENTINEL), tl.constexpr(SLOTS)
_SLOT, _PREV_NUMEL, _EXITS = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)
_NUM_WARPS = 8  # 256 threads: two 16-byte words per thread and segment (not swept yet)
MAX_NORM_HIDDEN = _MAX_FUSED_BLOCK  # widest row the fused norm holds in registers (rmsnorm's one-pass path)
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def buffer_bytes(world_size: int, slot_bytes: int) -> int:
    """Bytes of each rank's symmetric buffer: 3 slots of W segments of `slot_bytes`."""
    return SLOTS * world_size * slot_bytes


def init_buffer(buffer: torch.Tensor) -> torch.Tensor:
    """Fill a (byte) buffer with the sentinel, every 16-bit word 0x8000 (bytes 00 80); returns `buffer`."""
    buffer.view(torch.int16).fill_(SENTINEL)
    return buffer


def new_state(device) -> torch.Tensor:
    """A rank's call state, zeroed: slot 0, no previous call, no program exited."""
    return torch.zeros(STATE_INTS, dtype=torch.int32, device=device)


@triton.jit
def _words(ptrs, p):
    """Peer p's buffer from an int64 address table, as 16-bit words (16-byte aligned)."""
    return tl.multiple_of(tl.load(ptrs + p).to(tl.pointer_type(tl.int16)), 16)


@triton.jit
def _push(x_ptr, buffer_ptrs, slot, slot_words, idx, mask, RANK: tl.constexpr, WORLD_SIZE: tl.constexpr):
    """Step 1 for the words at `idx`: x into segment RANK of the slot, on every rank (-0.0 sent as +0.0)."""
    bits = tl.load(x_ptr + idx, mask=mask).to(tl.int16, bitcast=True)
    bits = tl.where(bits == _SENTINEL, tl.zeros_like(bits), bits)
    for p in tl.static_range(WORLD_SIZE):
        tl.store(_words(buffer_ptrs, p) + (slot * WORLD_SIZE + RANK) * slot_words + idx, bits, mask=mask)


@triton.jit
def _clear_previous(state_ptr, own, slot, slot_words, pid, step, WORLD_SIZE: tl.constexpr, BLOCK: tl.constexpr):
    """Step 2, this program's share: the sentinel over the previous call's slot of its own buffer (every
    peer's write there has been seen, by the previous call), over the previous call's numel rounded up to
    whole 16-byte words (the words past it are the sentinel already; slot_words is a multiple of 8)."""
    prev_n = tl.multiple_of((tl.load(state_ptr + _PREV_NUMEL) + 7) // 8 * 8, 8)
    prev = own + ((slot + _SLOTS - 1) % _SLOTS) * WORLD_SIZE * slot_words
    sentinel = tl.full([BLOCK], _SENTINEL, tl.int16)
    for start in range(pid * BLOCK, prev_n, step):
        idx = start + tl.arange(0, BLOCK)
        mask = idx < prev_n
        for p in tl.static_range(WORLD_SIZE):
            tl.store(prev + p * slot_words + idx, sentinel, mask=mask)


@triton.jit
def _wait_and_sum(cur, slot_words, idx, mask, dtype: tl.constexpr, WORLD_SIZE: tl.constexpr, BLOCK: tl.constexpr):
    """Step 3 for the words at `idx`: poll segments 0..W-1 of the current slot until no word is the
    sentinel, and return their fp32 sum in rank order (the same bits on every rank). The sum of the last
    pass is kept: by then no word read was the sentinel, so all are final. The loop condition is a scalar
    computed at the end of the body: a tensor reduction in the while condition breaks triton 3.6's
    TritonGPURemoveLayoutConversions pass (PassManager::run failed in make_ttgir)."""
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    pending = 1  # int32 scalar: 1 while the last pass read a sentinel word
    while pending > 0:
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        waiting = tl.zeros([BLOCK], dtype=tl.int32)
        for p in tl.static_range(WORLD_SIZE):
            w = tl.load(cur + p * slot_words + idx, mask=mask, other=0, volatile=True)
            waiting = tl.where(w == _SENTINEL, 1, waiting)
            acc += w.to(dtype, bitcast=True).to(tl.float32)
        pending = tl.max(waiting, axis=0)
    return acc


@triton.jit
def _advance_state(state_ptr, slot, n, programs):
    """Step 4: the last program out advances the state (every program has read it: module docstring)."""
    tl.debug_barrier()
    exited = tl.atomic_add(state_ptr + _EXITS, 1, sem="acq_rel", scope="gpu")
    if exited == programs - 1:
        tl.store(state_ptr + _EXITS, 0)
        tl.store(state_ptr + _PREV_NUMEL, n)
        tl.store(state_ptr + _SLOT, (slot + 1) % _SLOTS)


@triton.jit
def _lamport_all_reduce_kernel(
    x_ptr, out_ptr, buffer_ptrs, state_ptr, n, slot_words,
    RANK: tl.constexpr, WORLD_SIZE: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    step = programs * BLOCK
    offs = tl.arange(0, BLOCK)
    dtype = x_ptr.dtype.element_ty
    pdl_wait(USE_PDL)
    slot = tl.load(state_ptr + _SLOT)
    own = _words(buffer_ptrs, RANK)
    for start in range(pid * BLOCK, n, step):
        _push(x_ptr, buffer_ptrs, slot, slot_words, start + offs, start + offs < n, RANK, WORLD_SIZE)
    _clear_previous(state_ptr, own, slot, slot_words, pid, step, WORLD_SIZE, BLOCK)
    cur = own + slot * WORLD_SIZE * slot_words
    for start in range(pid * BLOCK, n, step):
        idx = start + offs
        mask = idx < n
        acc = _wait_and_sum(cur, slot_words, idx, mask, dtype, WORLD_SIZE, BLOCK)
        tl.store(out_ptr + idx, round_to(acc, dtype), mask=mask)
    _advance_state(state_ptr, slot, n, programs)


@triton.jit
def _lamport_all_reduce_rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, buffer_ptrs, state_ptr, rows, hidden, slot_words, eps,
    RANK: tl.constexpr, WORLD_SIZE: tl.constexpr, BLOCK: tl.constexpr, ROUND_TO_RES: tl.constexpr,
    USE_PDL: tl.constexpr,
):  # fmt: skip
    """The all-reduce of x [rows, hidden] (a program per row, grid-stride), then, per row as its sum
    arrives, `rmsnorm._fused_add_rms_norm_kernel`'s one-pass body: residual <- sum + residual, x <- the
    normed residual. The same slots, state and words as `_lamport_all_reduce_kernel`, so calls of the two
    kernels interleave."""
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    offs = tl.arange(0, BLOCK)
    col_mask = offs < hidden
    dtype = x_ptr.dtype.element_ty
    pdl_wait(USE_PDL)
    slot = tl.load(state_ptr + _SLOT)
    own = _words(buffer_ptrs, RANK)
    for row in range(pid, rows, programs):  # every row of this program is pushed before any wait
        _push(x_ptr, buffer_ptrs, slot, slot_words, row * hidden + offs, col_mask, RANK, WORLD_SIZE)
    _clear_previous(state_ptr, own, slot, slot_words, pid, programs * BLOCK, WORLD_SIZE, BLOCK)
    cur = own + slot * WORLD_SIZE * slot_words
    for row in range(pid, rows, programs):
        idx = row * hidden + offs
        y = round_to(_wait_and_sum(cur, slot_words, idx, col_mask, dtype, WORLD_SIZE, BLOCK), dtype)
        _add_rms_norm_row(
            y.to(tl.float32), res_ptr + row * hidden, x_ptr + row * hidden, w_ptr, offs, col_mask, hidden, eps,
            ROUND_TO_RES,
        )  # fmt: skip
    _advance_state(state_ptr, slot, rows * hidden, programs)


def lamport_all_reduce(
    x: torch.Tensor,
    out: torch.Tensor,
    buffer_ptrs: torch.Tensor,
    state: torch.Tensor,
    rank: int,
    world_size: int,
    slot_bytes: int,
) -> torch.Tensor:
    """out = the sum of the W ranks' x (fp32, in rank order, rounded once), on every rank. `out` may be `x`.

    buffer_ptrs: int64 [W] addresses, on x's device, of the peers' symmetric buffers (16-byte aligned,
    `buffer_bytes(W, slot_bytes)` each, sentinel-filled by `init_buffer` before any rank's first call).
    state: this rank's int32 [STATE_INTS] (`new_state`), zero before the first call, then the kernel's.
    Every rank must make the same call (same numel and 16-bit dtype), in the same order. Nothing is
    allocated, so the call can be captured in a CUDA graph (and replayed: the state lives on the device).
    """
    _check_call(x, buffer_ptrs, state, rank, world_size, slot_bytes)
    assert out.is_contiguous() and out.shape == x.shape and out.dtype == x.dtype and out.device == x.device, (
        "out must be contiguous and like x"
    )
    n = x.numel()
    if n == 0:
        return out
    block = TILE_BYTES // x.element_size()
    _lamport_all_reduce_kernel[(num_programs(n, x.dtype),)](
        x, out, buffer_ptrs, state, n, slot_bytes // 2,
        RANK=rank, WORLD_SIZE=world_size, BLOCK=block, num_warps=_NUM_WARPS, **pdl_launch_kwargs(x.device),
    )  # fmt: skip
    return out


def _check_call(x, buffer_ptrs, state, rank, world_size, slot_bytes) -> None:
    assert x.dtype in DTYPES, f"the Lamport all-reduce takes bf16 or fp16 (-0.0 is its sentinel), got {x.dtype}"
    assert x.is_contiguous(), "x must be contiguous"
    assert x.device.type == "cuda" or (_INTERPRET and x.device.type == "cpu"), f"x is on {x.device}"
    assert slot_bytes % 16 == 0, f"slot_bytes {slot_bytes} is not a multiple of 16"
    assert x.nbytes <= slot_bytes, f"{x.nbytes} bytes do not fit the {slot_bytes}-byte segment"
    assert 0 <= rank < world_size, f"rank {rank} of {world_size}"
    assert buffer_ptrs.dtype == torch.int64 and buffer_ptrs.shape == (world_size,), (
        f"buffer_ptrs must be int64 [{world_size}], got {buffer_ptrs.dtype} {tuple(buffer_ptrs.shape)}"
    )
    assert state.dtype == torch.int32 and state.shape == (STATE_INTS,), f"state must be int32 [{STATE_INTS}]"
    assert buffer_ptrs.device == x.device and state.device == x.device, "buffer_ptrs and state go on x's device"


def rms_norm_fits(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, slot_bytes: int) -> bool:
    """Whether `lamport_all_reduce_rms_norm` takes these: x and residual [T, H] contiguous of one 16-bit
    dtype, H <= MAX_NORM_HIDDEN, x within a segment, weight [H] contiguous, all on one device."""
    return (
        x.dim() == 2
        and x.dtype in DTYPES
        and residual.shape == x.shape
        and residual.dtype == x.dtype
        and x.is_contiguous()
        and residual.is_contiguous()
        and 0 < x.shape[1] <= MAX_NORM_HIDDEN
        and 0 < x.nbytes <= slot_bytes
        and weight.shape == (x.shape[1],)
        and weight.is_contiguous()
        and weight.dtype.is_floating_point
        and residual.device == x.device == weight.device
    )


def lamport_all_reduce_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    buffer_ptrs: torch.Tensor,
    state: torch.Tensor,
    rank: int,
    world_size: int,
    slot_bytes: int,
) -> None:
    """In place: s = the all-reduce of x [T, H] (as `lamport_all_reduce`); residual <- s + residual;
    x <- rms_norm(residual) * weight. Bit for bit what `lamport_all_reduce(x, x, ...)` then
    `rmsnorm.fused_add_rms_norm(x, residual, weight, eps)` leave, in one launch: the decode step's
    all-reduce after a row-parallel projection and the norm that follows it. Same buffers, state and
    calling contract as `lamport_all_reduce` (and one state for both: calls of the two interleave)."""
    _check_call(x, buffer_ptrs, state, rank, world_size, slot_bytes)
    assert rms_norm_fits(x, residual, weight, slot_bytes), (
        f"lamport_all_reduce_rms_norm cannot take x {tuple(x.shape)} {x.dtype}, residual {tuple(residual.shape)} "
        f"{residual.dtype}, weight {tuple(weight.shape)} (see rms_norm_fits)"
    )
    rows, hidden = x.shape
    # the norm kernel's own row tile and warps: its sum of squares reduces in the same order, bit for bit
    block, one_pass, num_warps = _norm_launch_config(hidden)
    assert one_pass, f"a {hidden}-wide row is past the one-pass norm"
    _lamport_all_reduce_rms_norm_kernel[(min(rows, MAX_PROGRAMS),)](
        x, residual, weight, buffer_ptrs, state, rows, hidden, slot_bytes // 2, eps,
        RANK=rank, WORLD_SIZE=world_size, BLOCK=block,
        ROUND_TO_RES=torch.promote_types(residual.dtype, weight.dtype) == residual.dtype,
        num_warps=num_warps, **pdl_launch_kwargs(x.device),
    )  # fmt: skip
