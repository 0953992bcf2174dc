"""Process groups. Created once per process by `init_distributed`, read by `comm`.

Two planes:
* the data plane (tp all-reduce / all-gather, pp send/recv) uses the device backend: NCCL on GPU,
  gloo on CPU (or gloo on GPU, to test tp/pp with several ranks on one GPU);
* the control plane (the coordinator's step plans, sampled ids going back) always uses gloo on CPU
  tensors, so it never occupies the GPU stream.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
import traceback
from dataclasses import dataclass

import torch
import torch.distributed as dist

from dist_llm.errors import DistLLMError
from dist_llm.parallel.discovery import RankInfo, discover, local_device_index
from dist_llm.parallel.mapping import Mapping


@dataclass
class ParallelState:
    mapping: Mapping
    info: RankInfo
    backend: str
    device: torch.device
    tp_group: object = None
    control_group: object = None  # gloo, world: step plans from rank 0
    result_group: object = None  # gloo, world: sampled ids from the last stage to rank 0
    custom_ar: object = None  # custom_all_reduce.OneShotAllReduce: small tp all-reduces on NCCL runs

    @property
    def distributed(self) -> bool:
        return self.mapping.world_size > 1


_state: ParallelState | None = None


def timeout_s() -> float:
    return float(os.environ.get("DIST_LLM_TIMEOUT_S", "600"))


def check_world_size(tp_size: int, pp_size: int, world_size: int, launcher: str) -> None:
    need = tp_size * pp_size
    if world_size != need:
        raise DistLLMError(
            f"the engine needs tp_size*pp_size = {tp_size}*{pp_size} = {need} ranks but {world_size} "
            f"{'was' if world_size == 1 else 'were'} started ({launcher}); run it as "
            f"`mpirun -n {need} python -m dist_llm.run ...` (or launch/mpirun.sh ENGINE_DIR)"
        )


def resolve_device(device: str, info: RankInfo) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise DistLLMError("--device cuda was asked for but torch sees no CUDA GPU; use --device cpu")
        index = local_device_index(info)
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    if device != "cpu":
        raise DistLLMError(f"unknown --device {device!r}; choose auto, cuda or cpu")
    return torch.device("cpu")


def _install_abort_hook(info: RankInfo) -> None:
    """An uncaught exception on one rank must end every rank, never leave the others waiting.

    Installed after init_process_group, whose own hook buffers stderr; this one writes straight to
    file descriptor 2, then aborts the MPI job (or just exits under other launchers, whose peers then
    fail on the broken connection or the collective timeout).
    """

    def hook(exc_type, exc, tb):
        if issubclass(exc_type, DistLLMError):
            text = f"[rank {info.rank}] error: {exc}\n"
        else:
            text = f"[rank {info.rank}] uncaught exception:\n" + "".join(traceback.format_exception(exc_type, exc, tb))
        os.write(2, text.encode())
        if info.launcher == "mpi":
            from mpi4py import MPI

            MPI.COMM_WORLD.Abort(1)
        os._exit(1)

    sys.excepthook = hook


def init_distributed(tp_size: int, pp_size: int, backend: str = "auto", device: str = "auto") -> ParallelState:
    """Discover this rank, check the world size against tp×pp and create the process groups."""
    global _state
    if _state is not None:
        return _state
    info = discover()
    check_world_size(tp_size, pp_size, info.world_size, info.launcher)
    dev = resolve_device(device, info)
    if backend == "auto":
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if backend not in ("nccl", "gloo"):
        raise DistLLMError(f"unknown --backend {backend!r}; choose auto, nccl or gloo")
    if backend == "nccl" and dev.type != "cuda":
        raise DistLLMError("--backend nccl needs --device cuda; use --backend gloo on the CPU")
    mapping = Mapping(tp_size=tp_size, pp_size=pp_size, rank=info.rank)
    state = ParallelState(mapping=mapping, info=info, backend=backend, device=dev)
    if mapping.world_size > 1:
        timeout = datetime.timedelta(seconds=timeout_s())
        kwargs = {"device_id": dev} if backend == "nccl" else {}
        dist.init_process_group(
            backend=backend,
            init_method=f"tcp://{info.master_addr}:{info.master_port}",
            rank=info.rank,
            world_size=info.world_size,
            timeout=timeout,
            **kwargs,
        )
        # own groups for the control plane, so that its asynchronous broadcasts never queue behind,
        # or ahead of, data-plane collectives
        state.control_group = dist.new_group(backend="gloo", timeout=timeout)
        state.result_group = dist.new_group(backend="gloo", timeout=timeout)
        for pp_rank in range(pp_size):
            group = dist.new_group(mapping.stage_ranks(pp_rank), backend=backend, timeout=timeout)
            if pp_rank == mapping.pp_rank:
                state.tp_group = group
        if backend == "nccl":
            from dist_llm.parallel.custom_all_reduce import maybe_create

            state.custom_ar = maybe_create(state)  # a collective over the tp group
        _install_abort_hook(info)
    _state = state
    return state


def is_initialized() -> bool:
    return _state is not None


def get_state() -> ParallelState:
    if _state is None:
        raise RuntimeError("dist_llm.parallel.state.init_distributed() has not been called in this process")
    return _state


def set_single_process_state(device: torch.device) -> ParallelState:
    """A one-rank state without discovery, for tools and tests that run a model in-process."""
    global _state
    info = RankInfo(0, 1, 0, 1, "127.0.0.1", 0, "single")
    _state = ParallelState(mapping=Mapping(), info=info, backend="gloo", device=device)
    return _state


@contextlib.contextmanager
def single_rank_scope():
    """Inside it, collectives see a one-rank world on this rank's device: a model built and run there is whole on
    this rank (tp = pp = 1), whatever the job's mapping. A speculative draft model on rank 0 runs so
    (runtime/draft_model.py) beside the target model's shard. The job's state comes back on exit."""
    global _state
    outer = get_state()
    _state = ParallelState(mapping=Mapping(), info=outer.info, backend=outer.backend, device=outer.device)
    try:
        yield _state
    finally:
        _state = outer


def destroy() -> None:
    global _state
    if _state is not None:
        _state.custom_ar = None  # drop the symmetric buffer before its process group
    if _state is not None and _state.distributed and dist.is_initialized():
        dist.destroy_process_group()
    _state = None
