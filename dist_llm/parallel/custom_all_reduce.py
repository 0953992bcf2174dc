"""The tp group's one-shot all-reduce over symmetric memory (`kernels/all_reduce.py`), NCCL's stand-in for
small tensors. The only module that touches `torch.distributed._symmetric_memory`.

`maybe_create(state)` is called once per process by `init_distributed` and returns an `OneShotAllReduce`
when the backend is NCCL, tp_size is 2, 4 or 8, every tp rank sits on one host on its own GPU with P2P
access to the others', and DIST_LLM_CUSTOM_AR=1 on all of them; otherwise None, and
`comm.tp_all_reduce` keeps using NCCL (as it does for tensors that do not `fit`). It is opt-in: on 2×
H200 (2026-11-28) it was 2-3.4× faster than NCCL per call in CUDA graphs, bit-exact on both ranks, but the
7B tp=2 decode step did not get faster (docs/performance.md), and it has not yet run on 4 or 8 GPUs.

Creation never hangs and never half-succeeds: every collective step is entered by all tp ranks or by
none. The ranks first gather what each knows about itself (host, GPU, the env switch, whether symmetric
memory imports), decide from that together, allocate, agree again on every rank's allocation, and only
then rendezvous (the collective that exchanges the buffers); a last agreement after it drops the object
on every rank if any rank failed. A refusal that is a failure (not a setting) logs one warning on tp
rank 0, naming the rank that failed; NCCL then does every all-reduce.

Torch facts this relies on (torch/distributed/_symmetric_memory/__init__.py and
torch/csrc/distributed/c10d/symm_mem/CUDASymmetricMemory.cu): `empty()` allocates from the symmetric
pool, and the signal pad in front of the buffer is zeroed before `rendezvous(tensor, group_name)` returns;
the handle's `buffer_ptrs` / `signal_pad_ptrs` are host lists of the peers' addresses (`buffer_ptrs_dev`
is a raw device address with no offset applied), to which the handle's `offset` (the tensor's place in
its allocation) is added here; `signal_pad_size` is in bytes. The "CUDA" backend (plain CUDA VMM + P2P)
is torch's default unless TORCH_SYMMMEM says otherwise; it is asked for explicitly when another one is
set. Multicast is never used (the kernel reads peers by unicast; TORCH_SYMM_MEM_DISABLE_MULTICAST=1 keeps
torch from even setting it up).
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from dist_llm.kernels.all_reduce import DTYPES, one_shot_all_reduce, signal_pad_ints

log = logging.getLogger("dist_llm")

ENV = "DIST_LLM_CUSTOM_AR"
TP_SIZES = (2, 4, 8)
CAPACITY_BYTES = 1 << 20  # decode all-reduces: up to 128 tokens x 4096 x bf16; bigger ones stay on NCCL


class OneShotAllReduce:
    """`ar(x)` sums x over the tp group in place, for x that `ar.fits(x)`; every tp rank calls it alike.

    Holds the rendezvoused symmetric buffer (CAPACITY_BYTES) and the peers' buffer and signal-pad addresses
    as int64 device tensors, built once, so a call allocates nothing and can be captured in a CUDA graph.
    Every tp rank gets the same bits: the kernel sums in fp32 in rank order (see `kernels/all_reduce.py`).
    """

    def __init__(self, buffer: torch.Tensor, handle, device: torch.device):
        self.rank, self.world_size = int(handle.rank), int(handle.world_size)
        self.device, self.capacity = device, buffer.nbytes
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
        need = signal_pad_ints(self.world_size) * 4
        if int(handle.signal_pad_size) < need:
            raise RuntimeError(f"signal pads of {handle.signal_pad_size} bytes; the kernel needs {need}")
        self.buffer_ptrs = torch.tensor(buffers, dtype=torch.int64, device=device)
        self.signal_ptrs = torch.tensor(pads, dtype=torch.int64, device=device)
        self._buffer, self._handle = buffer, handle  # the peers' mappings live as long as these

    def fits(self, x: torch.Tensor) -> bool:
        return x.device == self.device and x.dtype in DTYPES and x.is_contiguous() and 0 < x.nbytes <= self.capacity

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # out aliases x: each program reads x only at the indices it later writes (kernel docstring)
        return one_shot_all_reduce(x, x, self.buffer_ptrs, self.signal_ptrs, self.rank, self.world_size, self.capacity)


@dataclass(frozen=True)
class RankFacts:
    """What one tp rank knows about itself before any decision (gathered over the tp group)."""

    rank: int
    host: str
    device: int
    enabled: bool  # DIST_LLM_CUSTOM_AR=1
    error: str | None = None  # why this rank cannot take part at all


def refusal(facts: list[RankFacts]) -> tuple[str, bool] | None:
    """Why the tp group whose ranks report `facts` must stay on NCCL, and whether that is a failure worth a
    warning (not a setting); None when it can go on. Every rank computes it from the same list."""
    if not all(f.enabled for f in facts):
        return f"{ENV} is not 1", False
    if len({f.host for f in facts}) > 1:
        return "the tp ranks span several hosts", False
    for f in facts:
        if f.error:
            return f"rank {f.rank}: {f.error}", True
    if len({f.device for f in facts}) < len(facts):
        return "two tp ranks share a GPU", True
    return None


def _local_facts(rank: int, device: torch.device) -> RankFacts:
    error = None
    try:
        import torch.distributed._symmetric_memory  # noqa: F401
    except Exception as e:  # a build without symmetric memory
        error = f"no symmetric memory in this torch build ({type(e).__name__}: {e})"
    return RankFacts(rank, socket.gethostname(), device.index, os.environ.get(ENV, "0") == "1", error)


def _prepare(device: torch.device, peer_devices: list[int]) -> torch.Tensor:
    """This rank's part before the rendezvous: P2P access to every peer's GPU, then the buffer."""
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
    return symm_mem.empty(CAPACITY_BYTES, dtype=torch.uint8, device=device)


def _agree(error: str | None, group, size: int) -> str | None:
    """Every tp rank's `error` gathered: the first one, the same on every rank (None if all are None)."""
    errors = [None] * size
    dist.all_gather_object(errors, error, group=group)
    return next((e for e in errors if e), None)


def _create(state, devices: list[int]) -> tuple[OneShotAllReduce | None, str | None]:
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
        ar = OneShotAllReduce(buffer, symm_mem.rendezvous(buffer, group.group_name), state.device)
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
    dist.all_gather_object(facts, _local_facts(m.rank, state.device), group=state.tp_group)
    ar, why = None, refusal(facts)
    if why is None:
        ar, error = _create(state, [f.device for f in facts])
        why = None if ar is not None else (error, True)
    if m.tp_rank == 0:
        if ar is not None:
            log.info("tp all-reduces up to %d KiB use the one-shot peer-memory kernel", ar.capacity >> 10)
        else:
            reason, warn = why
            (log.warning if warn else log.info)(
                "[rank %d] one-shot all-reduce off (%s): NCCL does every tp all-reduce", m.rank, reason
            )
    return ar
