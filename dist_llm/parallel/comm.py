"""Collectives as free functions. Layers and the runtime call these; nothing else touches torch.distributed."""

from __future__ import annotations

import pickle
import socket

import torch
import torch.distributed as dist

from dist_llm.parallel.state import get_state


def tp_size() -> int:
    return get_state().mapping.tp_size


def tp_rank() -> int:
    return get_state().mapping.tp_rank


def tp_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum `x` over the tensor-parallel group, in place: small tensors through the one-shot peer-memory
    kernel where the tp group has one (`custom_all_reduce`), everything else through NCCL (or gloo)."""
    s = get_state()
    if s.mapping.tp_size > 1:
        if s.custom_ar is not None and s.custom_ar.fits(x):
            return s.custom_ar(x)
        dist.all_reduce(x, group=s.tp_group)
    return x


def tp_all_reduce_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> bool:
    """x <- rms_norm(sum of x over tp + residual) * weight and residual <- that sum + residual, in one
    kernel, where the tp group's one-shot all-reduce can fuse them (`custom_all_reduce.add_rms_norm`).
    False when it cannot, with nothing done: the caller all-reduces and normalises separately."""
    s = get_state()
    return s.mapping.tp_size > 1 and s.custom_ar is not None and s.custom_ar.add_rms_norm(x, residual, weight, eps)


def tp_all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Concatenate the tp ranks' `x` along `dim`, in rank order."""
    s = get_state()
    if s.mapping.tp_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(s.mapping.tp_size)]
    dist.all_gather(parts, x.contiguous(), group=s.tp_group)
    return torch.cat(parts, dim=dim)


def _needs_host_staging(x: torch.Tensor) -> bool:
    # gloo point-to-point works on CPU tensors only
    return get_state().backend == "gloo" and x.is_cuda


def pp_send(x: torch.Tensor, to_pp_rank: int):
    """Send activations to the rank with the same tp_rank in stage `to_pp_rank`, asynchronously.

    Returns a handle; the caller keeps it (and so the tensor) until `wait()`. Not waiting here is what lets
    a stage start its next micro-batch while the next stage is still busy with this one.
    """
    s = get_state()
    dst = s.mapping.peer_in_stage(to_pp_rank)
    x = x.cpu() if _needs_host_staging(x) else x.contiguous()
    return _Pending(dist.isend(x, dst=dst), x)


def pp_recv(shape, dtype: torch.dtype, from_pp_rank: int) -> torch.Tensor:
    s = get_state()
    src = s.mapping.peer_in_stage(from_pp_rank)
    if s.backend == "gloo" and s.device.type == "cuda":
        buf = torch.empty(shape, dtype=dtype)
        dist.recv(buf, src=src)
        return buf.to(s.device)
    buf = torch.empty(shape, dtype=dtype, device=s.device)
    dist.recv(buf, src=src)
    return buf


class _Pending:
    """An asynchronous operation and the tensors it reads, kept alive until it completes."""

    def __init__(self, work, *tensors):
        self.work, self.tensors = work, tensors

    def wait(self) -> None:
        self.work.wait()
        self.tensors = ()


_broadcasts: list[_Pending] = []


_FRAME = 32 << 10  # bytes of the first message: its length, then the pickled object (or its start)


def broadcast_object(obj=None):
    """Rank 0's `obj` on every rank (control plane, gloo).

    On rank 0 it does not wait for the other ranks to receive: with pipeline parallelism the last stage
    may still be busy with an earlier micro-batch. The other ranks block until the object arrives.
    One message of _FRAME bytes carries the length and the pickle (a decode step plan up to batch ~96),
    a second one the rest of a longer pickle: each gloo broadcast is a round trip (~0.2 ms on a small CPU).
    """
    s = get_state()
    if not s.distributed:
        return obj
    group = s.control_group
    if s.mapping.rank == 0:
        data = pickle.dumps(obj)
        head = min(len(data), _FRAME - 8)
        buf = bytearray(_FRAME)  # plain bytes work: each torch op on a small tensor costs µs
        buf[:8] = len(data).to_bytes(8, "little")
        buf[8 : 8 + head] = data[:head]
        frame = torch.frombuffer(buf, dtype=torch.uint8)
        pending = [_Pending(dist.broadcast(frame, src=0, group=group, async_op=True), frame)]
        if len(data) > head:
            rest = torch.frombuffer(bytearray(data[head:]), dtype=torch.uint8)
            pending.append(_Pending(dist.broadcast(rest, src=0, group=group, async_op=True), rest))
        _broadcasts.extend(pending)
        _broadcasts[:] = [p for p in _broadcasts if not p.work.is_completed()]
        return obj
    frame = torch.empty(_FRAME, dtype=torch.uint8)
    dist.broadcast(frame, src=0, group=group)
    view = memoryview(frame.numpy())
    size = int.from_bytes(view[:8], "little")
    if size <= _FRAME - 8:
        return pickle.loads(view[8 : 8 + size])
    rest = torch.empty(size - (_FRAME - 8), dtype=torch.uint8)
    dist.broadcast(rest, src=0, group=group)
    return pickle.loads(bytes(view[8:]) + rest.numpy().tobytes())


def flush_broadcasts() -> None:
    """Wait until every rank has received rank 0's broadcasts (before shutting down)."""
    for p in _broadcasts:
        p.wait()
    _broadcasts.clear()


def send_object(obj, dst: int) -> None:
    """Point-to-point on the result channel (sampled ids from the last stage to rank 0)."""
    dist.send_object_list([obj], dst=dst, group=get_state().result_group)


def recv_object(src: int):
    box = [None]
    dist.recv_object_list(box, src=src, group=get_state().result_group)
    return box[0]


def barrier() -> None:
    s = get_state()
    if s.distributed:
        dist.barrier(group=s.control_group)


def ranks_sharing_device(device: torch.device) -> int:
    """How many ranks (this one included) run on this host's `device`: 1 in one process; 2 when two gloo
    ranks share a GPU. A collective over the control plane: every rank must call it."""
    s = get_state()
    if not s.distributed:
        return 1
    key = (socket.gethostname(), str(torch.cuda.get_device_properties(device).uuid) if device.type == "cuda"
           else str(device))  # fmt: skip
    keys = [None] * dist.get_world_size(group=s.control_group)
    dist.all_gather_object(keys, key, group=s.control_group)
    return sum(k == key for k in keys)


def all_reduce_min_int(value: int) -> int:
    """The smallest `value` over all ranks (control plane)."""
    s = get_state()
    if not s.distributed:
        return value
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=s.control_group)
    return int(t.item())
