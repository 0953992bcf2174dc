"""The tp group's one-shot all-reduce over symmetric memory, NCCL's stand-in for small tensors. The only
module that touches `torch.distributed._symmetric_memory`.

Two kernels, chosen by DIST_LLM_CUSTOM_AR_ALGO (the same on every rank):
- "lamport" (default): `kernels/lamport_all_reduce.py`, barrier-free: each rank pushes its x into every
  peer's buffer, where the words themselves say they have arrived (bf16 and fp16 only);
- "barrier": `kernels/all_reduce.py`, copy in, barrier, read every peer's buffer, barrier (any float).
Both sum in fp32 in rank order, so every rank gets the same bits. fp32 tensors stay on NCCL with "lamport".
With "lamport", `add_rms_norm` also fuses the residual add and RMSNorm that follow a row-parallel
projection into the all-reduce's launch (one kernel instead of two, 64 times a Llama-7B decode step);
it is on unless DIST_LLM_AR_NORM=0 (4x H200, 2026-11-28: 7B batch-1 decode 427.0 -> 434.9 tok/s at tp=2,
513.4 -> 532.3 at tp=4, with the same tokens as NCCL). Its words on the wire are the plain kernel's, so
ranks may even differ.

`maybe_create(state)` is called once per process by `init_distributed` and returns an `OneShotAllReduce`
when the backend is NCCL, tp_size is 2, 4 or 8, every tp rank sits on one host on its own GPU with P2P
access to the others', and the switch is on for all of them: DIST_LLM_CUSTOM_AR=1, or unset at tp_size 2
and 4 (`DEFAULT_ON_TP`); otherwise None, and `comm.tp_all_reduce` keeps using NCCL (as it does for tensors that
do not `fit`). On 2× H200 (2026-11-28,
CUDA graphs, bit-exact on both ranks) the Lamport kernel took 3.7 µs per 8-64 KB call against NCCL's
15-19 µs and the barrier kernel's 7; the 7B tp=2 batch-1 decode went from 359 tok/s (NCCL) and 373
(barrier) to 400 (docs/performance.md). On 4x H200 it took 4.8-7.1 µs against NCCL's 21-22 and passed the
tp=4 token test, and 7B decoded 513 tok/s at tp=4. So it is on by default at tp=2 and 4, and opt-in at
tp=8 until it has run there. A rank that never arrives leaves its peers spinning (the kernels have no timeout); rank 0's
wait for the step (`StepResult.wait`) then stops the job after DIST_LLM_TIMEOUT_S.

Creation never hangs and never half-succeeds: every collective step is entered by all tp ranks or by
none. The ranks first gather what each knows about itself (host, GPU, the env switches, whether symmetric
memory imports), decide from that together, allocate, agree again on every rank's allocation, and only
then rendezvous (the collective that exchanges the buffers); a last agreement after it drops the object
on every rank if any rank failed. A refusal that is a failure (not a setting) logs one warning on tp
rank 0, naming the rank that failed; NCCL then does every all-reduce.

One buffer per rank holds both kernels' regions (`buffer_bytes`): the barrier kernel's CAPACITY_BYTES,
then the Lamport kernel's 3 slots x W segments of CAPACITY_BYTES, so either can run (the benchmark times
both). The Lamport region must hold its sentinel before any peer writes into it: `_prepare` fills the
whole buffer and synchronizes the device before the first agreement, and no peer can write before every
rank has entered that collective (and the rendezvous and last agreement after it).

Torch facts this relies on (torch/distributed/_symmetric_memory/__init__.py and
torch/csrc/distributed/c10d/symm_mem/CUDASymmetricMemory.cu): `empty()` allocates from the symmetric
pool, and the signal pad in front of the buffer is zeroed before `rendezvous(tensor, group_name)` returns
(the buffer itself is left as it is); the handle's `buffer_ptrs` / `signal_pad_ptrs` are host lists of the
peers' addresses (`buffer_ptrs_dev` is a raw device address with no offset applied), to which the handle's
`offset` (the tensor's place in its allocation) is added here; `signal_pad_size` is in bytes. The "CUDA"
backend (plain CUDA VMM + P2P) is torch's default unless TORCH_SYMMMEM says otherwise; it is asked for
explicitly when another one is set. Multicast is never used (the kernels read and write peers by unicast;
TORCH_SYMM_MEM_DISABLE_MULTICAST=1 keeps torch from even setting it up).
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from dist_llm.kernels import lamport_all_reduce as lamport
from dist_llm.kernels.all_reduce import DTYPES, one_shot_all_reduce, signal_pad_ints

log = logging.getLogger("dist_llm")

ENV = "DIST_LLM_CUSTOM_AR"
ALGO_ENV = "DIST_LLM_CUSTOM_AR_ALGO"
ALGOS = ("lamport", "barrier")  # the first is the default
NORM_ENV = "DIST_LLM_AR_NORM"  # 0 turns off the residual add + RMSNorm in the all-reduce's launch
TP_SIZES = (2, 4, 8)
DEFAULT_ON_TP = (2, 4)  # on unless DIST_LLM_CUSTOM_AR=0: the tp sizes it has run at on real GPUs (4x H200)
CAPACITY_BYTES = 1 << 20  # decode all-reduces: up to 128 tokens x 4096 x bf16; bigger ones stay on NCCL


def buffer_bytes(world_size: int) -> int:
    """Each rank's symmetric buffer: the barrier kernel's region, then the Lamport kernel's slots."""
    return CAPACITY_BYTES + lamport.buffer_bytes(world_size, CAPACITY_BYTES)


class OneShotAllReduce:
    """`ar(x)` sums x over the tp group in place, for x that `ar.fits(x)`; every tp rank calls it alike.

    Holds the rendezvoused symmetric buffer (`buffer_bytes(W)`), the peers' buffer and signal-pad addresses
    as int64 device tensors and the Lamport kernel's call state, built once, so a call allocates nothing and
    can be captured in a CUDA graph. `algo` picks the kernel of `ar(x)`; `ar(x, algo)` runs the other one
    (both regions exist, and calls of the two may interleave, in the same order on every rank). Every tp
    rank gets the same bits: the kernels sum in fp32 in rank order.
    """

    def __init__(self, buffer: torch.Tensor, handle, device: torch.device, algo: str = ALGOS[0]):
        if algo not in ALGOS:
            raise ValueError(f"unknown one-shot all-reduce {algo!r}; choose one of {ALGOS}")
        self.rank, self.world_size = int(handle.rank), int(handle.world_size)
        self.device, self.algo, self.capacity = device, algo, CAPACITY_BYTES
        self.fuse_norm = os.environ.get(NORM_ENV, "1") != "0"  # on unless DIST_LLM_AR_NORM=0
        if buffer.nbytes < (need := buffer_bytes(self.world_size)):
            raise RuntimeError(f"a {buffer.nbytes}-byte buffer; {self.world_size} ranks need {need}")
        offset = int(getattr(handle, "offset", 0))
        buffers = [int(p) + offset for p in handle.buffer_ptrs]
        pads = [int(p) for p in handle.signal_pad_ptrs]
        if buffers[self.rank] != buffer.data_ptr():
            raise RuntimeError(
                f"the handle's own buffer address {buffers[self.rank]:#x} is not the tensor's "
                f"{buffer.data_ptr():#x} (offset {offset})"
            )
        if any(a % 16 for a in buffers + pads):
            raise RuntimeError("a peer's buffer or signal pad is not 16-byte aligned")
        if int(handle.signal_pad_size) < (need := signal_pad_ints(self.world_size) * 4):
            raise RuntimeError(f"signal pads of {handle.signal_pad_size} bytes; the kernel needs {need}")
        self.buffer_ptrs = torch.tensor(buffers, dtype=torch.int64, device=device)
        self.signal_ptrs = torch.tensor(pads, dtype=torch.int64, device=device)
        self.lamport_ptrs = torch.tensor([b + CAPACITY_BYTES for b in buffers], dtype=torch.int64, device=device)
        self.lamport_state = lamport.new_state(device)  # per rank; all start at slot 0 together
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the tables and the zeroed state are there for a call on any stream
        self._buffer, self._handle = buffer, handle  # the peers' mappings live as long as these

    def fits(self, x: torch.Tensor, algo: str | None = None) -> bool:
        dtypes = lamport.DTYPES if (algo or self.algo) == "lamport" else DTYPES
        return x.device == self.device and x.dtype in dtypes and x.is_contiguous() and 0 < x.nbytes <= self.capacity

    def add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> bool:
        """The all-reduce of x fused with the residual add and RMSNorm that follow it, in place (x <- the
        normed sum, residual <- sum + residual), where the Lamport kernel takes them and NORM_ENV is not 0;
        False, with nothing done, otherwise. The same decision on every tp rank: the shapes are the same."""
        if not (self.fuse_norm and self.algo == "lamport" and x.device == self.device):
            return False
        if not lamport.rms_norm_fits(x, residual, weight, self.capacity):
            return False
        lamport.lamport_all_reduce_rms_norm(
            x, residual, weight, eps, self.lamport_ptrs, self.lamport_state, self.rank, self.world_size, self.capacity
        )
        return True

    def __call__(self, x: torch.Tensor, algo: str | None = None) -> torch.Tensor:
        # out aliases x: each program reads x only at the indices it later writes (kernel docstrings)
        if (algo or self.algo) == "lamport":
            return lamport.lamport_all_reduce(
                x, x, self.lamport_ptrs, self.lamport_state, self.rank, self.world_size, self.capacity
            )
        return one_shot_all_reduce(x, x, self.buffer_ptrs, self.signal_ptrs, self.rank, self.world_size, self.capacity)


@dataclass(frozen=True)
class RankFacts:
    """What one tp rank knows about itself before any decision (gathered over the tp group)."""

    rank: int
    host: str
    device: int
    enabled: bool  # DIST_LLM_CUSTOM_AR=1, or unset where DEFAULT_ON_TP has the tp size (`switched_on`)
    error: str | None = None  # why this rank cannot take part at all
    algo: str = ALGOS[0]  # DIST_LLM_CUSTOM_AR_ALGO


def refusal(facts: list[RankFacts]) -> tuple[str, bool] | None:
    """Why the tp group whose ranks report `facts` must stay on NCCL, and whether that is a failure worth a
    warning (not a setting); None when it can go on. Every rank computes it from the same list."""
    if not all(f.enabled for f in facts):
        if len(facts) in DEFAULT_ON_TP:
            return f"switched off ({ENV}=0)", False
        return f"off at tp_size {len(facts)} unless {ENV}=1", False
    if len({f.host for f in facts}) > 1:
        return "the tp ranks span several hosts", False
    for f in facts:
        if f.error:
            return f"rank {f.rank}: {f.error}", True
    if len({f.algo for f in facts}) > 1:
        return f"the tp ranks set {ALGO_ENV} differently: {', '.join(f.algo for f in facts)}", True
    if len({f.device for f in facts}) < len(facts):
        return "two tp ranks share a GPU", True
    return None


def switched_on(tp_size: int) -> bool:
    """DIST_LLM_CUSTOM_AR: 1 on, 0 off, unset (or anything else): on at the tp sizes of DEFAULT_ON_TP."""
    value = os.environ.get(ENV, "")
    return value == "1" if value in ("0", "1") else tp_size in DEFAULT_ON_TP


def _local_facts(rank: int, device: torch.device, tp_size: int) -> RankFacts:
    error = None
    try:
        import torch.distributed._symmetric_memory  # noqa: F401
    except Exception as e:  # a build without symmetric memory
        error = f"no symmetric memory in this torch build ({type(e).__name__}: {e})"
    algo = os.environ.get(ALGO_ENV) or ALGOS[0]
    if algo not in ALGOS:
        error = f"{ALGO_ENV}={algo!r}: choose one of {', '.join(ALGOS)}"
    return RankFacts(rank, socket.gethostname(), device.index, switched_on(tp_size), error, algo)


def _prepare(device: torch.device, peer_devices: list[int]) -> torch.Tensor:
    """This rank's part before the rendezvous: P2P access to every peer's GPU (`peer_devices`, this one's
    included), then the buffer, filled with the Lamport sentinel and complete on the device before the
    agreement that follows (no peer writes into it before that collective)."""
    import torch.distributed._symmetric_memory as symm_mem

    for p in peer_devices:
        if p != device.index and not torch.cuda.can_device_access_peer(device, p):
            raise RuntimeError(f"cuda:{device.index} has no P2P access to cuda:{p}")
    get_backend = getattr(symm_mem, "get_backend", None)
    if get_backend is not None and get_backend(device) != "CUDA":
        try:
            symm_mem.set_backend("CUDA")  # plain CUDA peer memory, not NVSHMEM
        except Exception as e:
            log.debug("symm_mem.set_backend('CUDA') failed (%s); keeping %s", e, get_backend(device))
    buffer = symm_mem.empty(buffer_bytes(len(peer_devices)), dtype=torch.uint8, device=device)
    lamport.init_buffer(buffer)  # the barrier kernel's region too: it does not care what it holds
    torch.cuda.synchronize(device)
    return buffer


def _agree(error: str | None, group, size: int) -> str | None:
    """Every tp rank's `error` gathered: the first one, the same on every rank (None if all are None)."""
    errors = [None] * size
    dist.all_gather_object(errors, error, group=group)
    return next((e for e in errors if e), None)


def _create(state, devices: list[int], algo: str) -> tuple[OneShotAllReduce | None, str | None]:
    """Allocate, agree, rendezvous, agree: each collective step is entered by every tp rank or by none."""
    import torch.distributed._symmetric_memory as symm_mem

    m, group = state.mapping, state.tp_group
    buffer = ar = error = None
    try:
        buffer = _prepare(state.device, devices)
    except Exception as e:
        error = f"rank {m.rank}: {type(e).__name__}: {e}"
    if (error := _agree(error, group, m.tp_size)) is not None:
        return None, error
    try:
        ar = OneShotAllReduce(buffer, symm_mem.rendezvous(buffer, group.group_name), state.device, algo)
    except Exception as e:
        error = f"rank {m.rank}: rendezvous: {type(e).__name__}: {e}"
    if (error := _agree(error, group, m.tp_size)) is not None:
        return None, error
    return ar, None


def maybe_create(state) -> OneShotAllReduce | None:
    """The tp group's `OneShotAllReduce`, or None. A collective over `state.tp_group` on NCCL runs of
    tp_size 2, 4 or 8 (every rank of the group must call it); returns None at once elsewhere."""
    m = state.mapping
    if state.backend != "nccl" or m.tp_size not in TP_SIZES:
        return None
    facts = [None] * m.tp_size
    dist.all_gather_object(facts, _local_facts(m.rank, state.device, m.tp_size), group=state.tp_group)
    ar, why = None, refusal(facts)
    if why is None:
        ar, error = _create(state, [f.device for f in facts], facts[0].algo)
        why = None if ar is not None else (error, True)
    if m.tp_rank == 0:
        if ar is not None:
            log.info("tp all-reduces up to %d KiB use the one-shot peer-memory kernel (%s)", ar.capacity >> 10, ar.algo)
        else:
            reason, warn = why
            (log.warning if warn else log.info)(
                "[rank %d] one-shot all-reduce off (%s): NCCL does every tp all-reduce", m.rank, reason
            )
    return ar
