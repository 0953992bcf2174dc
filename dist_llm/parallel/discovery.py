"""Rank discovery: who am I, how many of us are there, and where is rank 0's rendezvous.

``discover()`` reads the launcher's environment and returns a ``RankInfo``; nobody has to set
``MASTER_ADDR`` by hand. Launchers are tried in this order (the first match wins):

1. ``torchrun`` (``TORCHELASTIC_RUN_ID``): its children may also carry MPI/SLURM variables when torchrun
   itself was started by mpirun or srun, so it goes first.
2. MPI (``OMPI_COMM_WORLD_SIZE``, ``PMIX_RANK``, ``PMI_SIZE``, ...): rank and size from mpi4py; rank 0
   picks an address and a free port and broadcasts them. An ``mpirun`` inside an sbatch job also sees
   ``SLURM_*`` variables, which is why MPI is checked before SLURM.
3. Plain ``RANK`` + ``WORLD_SIZE`` (torch's ``env://`` convention, set by hand or by another launcher).
4. SLURM tasks started by ``srun`` without MPI (``SLURM_STEP_ID`` set): rank from ``SLURM_PROCID``,
   rank 0 on the first host of the step's node list, a port derived from the job and step ids.
   The batch script itself also has ``SLURM_PROCID=0`` and ``SLURM_NTASKS`` but no step id; it is one
   process and falls through to 5.
5. A single process: rank 0 of 1 on 127.0.0.1 with a free port.

An explicit ``MASTER_ADDR`` / ``MASTER_PORT`` always wins over what discovery would pick.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import socket
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass

LOOPBACK = "127.0.0.1"
# Any one of these means "started by an MPI launcher" (Open MPI, PMIx, MPICH/Intel MPI hydra, MVAPICH).
MPI_ENV_VARS = ("OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_SIZE", "PMI_RANK", "MPI_LOCALNRANKS",
                "MV2_COMM_WORLD_SIZE")


@dataclass(frozen=True)
class RankInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    # rank 0's TCP rendezvous: torch.distributed init_method=f"tcp://{master_addr}:{master_port}"
    master_addr: str
    master_port: int
    launcher: str  # "mpi" | "slurm" | "torchrun" | "single"

    def __post_init__(self):
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not in [0, world_size={self.world_size}) "
                             f"({self.launcher})")
        if self.local_world_size < 1 or not 0 <= self.local_rank < self.local_world_size:
            raise ValueError(f"local rank {self.local_rank} is not in [0, local_world_size="
                             f"{self.local_world_size}) ({self.launcher})")
        if not 0 <= self.master_port < 65536:  # 0: a one-rank state that never rendezvouses
            raise ValueError(f"master port {self.master_port} is not a TCP port ({self.launcher})")


def discover(default_port: int | None = None) -> RankInfo:
    """This process's place in the job. ``default_port`` replaces the launcher's port choice
    (a free port, or the SLURM-derived one) but not an explicit ``MASTER_PORT``."""
    env = os.environ
    if "TORCHELASTIC_RUN_ID" in env:
        return _from_torchrun(env, default_port)
    if any(k in env for k in MPI_ENV_VARS):
        return _from_mpi(env, default_port)
    if "RANK" in env and "WORLD_SIZE" in env:
        return _from_torchrun(env, default_port)
    if "SLURM_PROCID" in env and "SLURM_STEP_ID" in env and _slurm_ntasks(env) > 1:
        return _from_slurm(env, default_port)
    return RankInfo(0, 1, 0, 1, env.get("MASTER_ADDR", LOOPBACK),
                    _int(env, "MASTER_PORT") or default_port or free_port(), "single")


def local_device_index(info: RankInfo) -> int:
    """The GPU this rank drives: one per local rank. CUDA_VISIBLE_DEVICES is honoured by CUDA itself,
    so the index is into the visible devices."""
    import torch

    if torch.cuda.is_available():
        return info.local_rank % torch.cuda.device_count()
    return info.local_rank


# ---------------------------------------------------------------------------------------- launchers

def _from_torchrun(env: Mapping[str, str], default_port: int | None) -> RankInfo:
    rank, world = _int(env, "RANK", required=True), _int(env, "WORLD_SIZE", required=True)
    _check_rank(rank, world, "RANK", "WORLD_SIZE")
    # Set by hand without LOCAL_*: assume everything runs on this node.
    local_rank = _int(env, "LOCAL_RANK", default=rank)
    local_world = _int(env, "LOCAL_WORLD_SIZE", default=world)
    _check_rank(local_rank, local_world, "LOCAL_RANK", "LOCAL_WORLD_SIZE")
    port = _int(env, "MASTER_PORT") or default_port
    if port is None:
        if world > 1:
            raise ValueError(f"RANK={rank} WORLD_SIZE={world} are set but MASTER_PORT is not; "
                             "ranks cannot agree on a port (set MASTER_PORT or use torchrun/mpirun)")
        port = free_port()
    return RankInfo(rank, world, local_rank, local_world, env.get("MASTER_ADDR", LOOPBACK), port, "torchrun")


def _from_mpi(env: Mapping[str, str], default_port: int | None) -> RankInfo:
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, world = comm.Get_rank(), comm.Get_size()
    local = comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
    local_rank, local_world = local.Get_rank(), local.Get_size()
    local.Free()
    endpoint = None
    if rank == 0:
        addr = env.get("MASTER_ADDR") or (LOOPBACK if local_world == world else host_ip())
        endpoint = (addr, _int(env, "MASTER_PORT") or default_port or free_port())
    addr, port = comm.bcast(endpoint, root=0)
    return RankInfo(rank, world, local_rank, local_world, addr, port, "mpi")


def _from_slurm(env: Mapping[str, str], default_port: int | None) -> RankInfo:
    rank, world = _int(env, "SLURM_PROCID", required=True), _slurm_ntasks(env)
    _check_rank(rank, world, "SLURM_PROCID", "SLURM_STEP_NUM_TASKS/SLURM_NTASKS")
    local_rank = _int(env, "SLURM_LOCALID", required=True)
    local_world = _slurm_local_world(env)
    _check_rank(local_rank, local_world, "SLURM_LOCALID", "SLURM_STEP_TASKS_PER_NODE/SLURM_TASKS_PER_NODE")
    addr = env.get("MASTER_ADDR")
    if not addr:
        keys = ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
        nodelist = next((env[k] for k in keys if env.get(k)), None)
        if not nodelist:
            raise ValueError("SLURM_PROCID is set but none of SLURM_STEP_NODELIST / SLURM_JOB_NODELIST / "
                             "SLURM_NODELIST is; cannot find rank 0's host")
        hosts = expand_hostlist(nodelist)
        # Task 0 always lands on the first node. Within one node loopback always works, even where a
        # NodeName is not a resolvable host name.
        addr = LOOPBACK if len(hosts) == 1 else hosts[0]
    port = _int(env, "MASTER_PORT") or default_port
    if port is None:
        # Every task must agree without talking, so derive the port from ids they all share; the step id
        # keeps back-to-back srun steps of one job off each other's (possibly TIME_WAIT) port.
        job, step = _int(env, "SLURM_JOB_ID", default=0), _int(env, "SLURM_STEP_ID", default=0)
        port = 20000 + (job * 31 + step) % 20000
    return RankInfo(rank, world, local_rank, local_world, addr, port, "slurm")


def _slurm_ntasks(env: Mapping[str, str]) -> int:
    for key in ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS"):
        if key in env:
            return _int(env, key)
    return 1


def _slurm_local_world(env: Mapping[str, str]) -> int:
    node = _int(env, "SLURM_NODEID", default=0)
    for key in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        if env.get(key):
            counts = expand_tasks_per_node(env[key])
            if node >= len(counts):
                raise ValueError(f"SLURM_NODEID={node} but {key}={env[key]!r} lists {len(counts)} nodes")
            return counts[node]
    if env.get("SLURM_NTASKS_PER_NODE"):
        return _int(env, "SLURM_NTASKS_PER_NODE")
    return _slurm_ntasks(env)


# ------------------------------------------------------------------------------------- slurm syntax

def expand_hostlist(hostlist: str) -> list[str]:
    """Expand a Slurm host list: ``node[01-03,7],gpu5`` -> node01, node02, node03, node7, gpu5.
    Zero padding is kept; several bracket groups in one name expand as a product, first group slowest
    (``r[1-2]n[1-2]`` -> r1n1, r1n2, r2n1, r2n2), as ``scontrol show hostnames`` does."""
    try:
        return _expand_hostlist(hostlist)
    except ValueError:
        if shutil.which("scontrol"):  # odd syntax we do not know: let Slurm try before giving up
            out = subprocess.run(["scontrol", "show", "hostnames", hostlist], capture_output=True, text=True)
            if out.returncode == 0 and out.stdout.split():
                return out.stdout.split()
        raise


def _expand_hostlist(hostlist: str) -> list[str]:
    hosts: list[str] = []
    for item in _split_top_level(hostlist.strip()):
        names = [""]
        for literal, group in re.findall(r"([^\[\]]*)(?:\[([^\[\]]*)\])?", item):
            names = [n + literal for n in names]
            if group:
                names = [n + x for n in names for x in _expand_ranges(group, hostlist)]
        if "[" in item and not re.fullmatch(r"[^\[\]]*(\[[^\[\]]+\][^\[\]]*)*", item):
            raise ValueError(f"malformed Slurm host list {hostlist!r}")
        hosts.extend(names)
    if not hosts or any(not h for h in hosts):
        raise ValueError(f"malformed Slurm host list {hostlist!r}")
    return hosts


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside brackets."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if depth not in (0, 1):
            raise ValueError(f"unbalanced brackets in Slurm host list {text!r}")
        if ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    if depth:
        raise ValueError(f"unbalanced brackets in Slurm host list {text!r}")
    return items + [text[start:]]


def _expand_ranges(group: str, hostlist: str) -> list[str]:
    out = []
    for part in group.split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part.strip())
        if not m:
            raise ValueError(f"bad range {part!r} in Slurm host list {hostlist!r}")
        lo, hi = m.group(1), m.group(2) or m.group(1)
        if int(hi) < int(lo):
            raise ValueError(f"descending range {part!r} in Slurm host list {hostlist!r}")
        out.extend(str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1))
    return out


def expand_tasks_per_node(spec: str) -> list[int]:
    """``2(x3),1`` -> [2, 2, 2, 1] (SLURM_TASKS_PER_NODE syntax)."""
    counts = []
    for part in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            raise ValueError(f"cannot parse SLURM tasks-per-node value {spec!r}")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts


# -------------------------------------------------------------------------------------- networking

def free_port() -> int:
    """A TCP port that is free right now (the OS picks it; we release it for torch to bind)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def host_ip() -> str:
    """An address of this host that other nodes can reach: the host name's address, unless that is a
    loopback (Debian maps the host name to 127.0.1.1), then the source address of the default route."""
    host = socket.gethostname()
    try:
        ip = socket.gethostbyname(host)
        if not ip.startswith("127."):
            return ip
    except OSError:
        pass
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))  # UDP connect sends nothing; it only picks a route
            ip = s.getsockname()[0]
            if not ip.startswith("127.") and ip != "0.0.0.0":
                return ip
    except OSError:
        pass
    return host


# ---------------------------------------------------------------------------------------- env utils

def _int(env: Mapping[str, str], key: str, default: int | None = None, required: bool = False) -> int | None:
    value = env.get(key, "").strip()
    if not value:
        if required:
            raise ValueError(f"environment variable {key} is not set")
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {key}={value!r} is not an integer") from None


def _check_rank(rank: int, world: int, rank_var: str, world_var: str) -> None:
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"inconsistent environment: {rank_var}={rank} must be in [0, {world_var}={world})")


if __name__ == "__main__":
    # One JSON line per rank, for debugging launches: mpirun -n 2 python -m dist_llm.parallel.discovery
    print(json.dumps(dataclasses.asdict(discover()), sort_keys=True), flush=True)
