"""MPI helpers for tools that run once per rank without torch.distributed (e.g. `build` under mpirun)."""

from __future__ import annotations

import os

from dist_llm.parallel.discovery import MPI_ENV_VARS


def launched_by_mpi() -> bool:
    return any(v in os.environ for v in MPI_ENV_VARS)


class World:
    """rank/size plus bcast and barrier; a trivial one-process world without MPI."""

    def __init__(self):
        self.comm = None
        self.rank, self.size = 0, 1
        if launched_by_mpi():
            from mpi4py import MPI

            self.comm = MPI.COMM_WORLD
            self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()

    def bcast(self, obj):
        return obj if self.comm is None else self.comm.bcast(obj, root=0)

    def allgather(self, obj) -> list:
        return [obj] if self.comm is None else self.comm.allgather(obj)

    def barrier(self) -> None:
        if self.comm is not None:
            self.comm.Barrier()
