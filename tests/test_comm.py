"""Collectives in `parallel/comm.py` under mpirun (gloo, CPU), and when the one-shot all-reduce is chosen."""

from __future__ import annotations

import sys

import torch

SHARING_SCRIPT = """
import sys, torch
from dist_llm.parallel import comm
from dist_llm.parallel.state import destroy, get_state, init_distributed
init_distributed(2, 1, backend="gloo", device="cpu")
n = comm.ranks_sharing_device(torch.device("cpu"))
open(sys.argv[1] + str(get_state().mapping.rank), "w").write(str(n))
destroy()
"""


def test_ranks_sharing_device_counts_both_ranks_on_one_host(tmp_path):
    """Two ranks on one host's CPU share the device: each must see 2, so that a GPU's KV pool (sized
    from its free memory) is split between them instead of being claimed twice."""
    from conftest import mpirun_cmd, run_cmd

    from dist_llm.parallel import comm
    from dist_llm.parallel.state import destroy, set_single_process_state

    script = tmp_path / "sharing.py"
    script.write_text(SHARING_SCRIPT)
    run_cmd(mpirun_cmd(2) + [sys.executable, str(script), str(tmp_path / "n")], timeout=120)
    assert [(tmp_path / f"n{r}").read_text() for r in (0, 1)] == ["2", "2"]
    set_single_process_state(torch.device("cpu"))
    try:
        assert comm.ranks_sharing_device(torch.device("cpu")) == 1
    finally:
        destroy()


TP_ALL_REDUCE_SCRIPT = """
import sys, torch
from dist_llm.parallel import comm
from dist_llm.parallel.state import destroy, get_state, init_distributed
init_distributed(2, 1, backend="gloo", device="cpu")
s = get_state()
x = torch.full((5,), float(s.mapping.rank + 1))
y = comm.tp_all_reduce(x)
open(sys.argv[1] + str(s.mapping.rank), "w").write(f"{s.custom_ar is None} {y is x} {x.tolist()}")
destroy()
"""


def test_tp_all_reduce_on_gloo_has_no_one_shot_path(tmp_path):
    """gloo never gets the peer-memory kernel (custom_ar stays None); tp_all_reduce still sums in place."""
    from conftest import mpirun_cmd, run_cmd

    script = tmp_path / "tp_ar.py"
    script.write_text(TP_ALL_REDUCE_SCRIPT)
    run_cmd(mpirun_cmd(2) + [sys.executable, str(script), str(tmp_path / "r")], timeout=120)
    assert [(tmp_path / f"r{r}").read_text() for r in (0, 1)] == ["True True [3.0, 3.0, 3.0, 3.0, 3.0]"] * 2


CREATION_SCRIPT = """
import sys, torch
from types import SimpleNamespace
import torch.distributed._symmetric_memory as symm_mem
from dist_llm.parallel import custom_all_reduce as car
from dist_llm.parallel.state import destroy, get_state, init_distributed
init_distributed(2, 1, backend="gloo", device="cpu")
s = get_state()
s.backend = "nccl"  # pretend: the creation protocol runs over the gloo tp group
rank = s.mapping.rank
car._local_facts = lambda r, device, tp_size: car.RankFacts(r, "h", r, True)
entered = []
def prepare_fails_on(bad):
    def prepare(device, devices):
        if rank in bad:
            raise RuntimeError("no P2P")
        return torch.zeros(16, dtype=torch.uint8)
    return prepare
def rendezvous(buf, group_name):  # breaks on rank 0 only; rank 1 gets a handle that works
    entered.append(group_name)
    if rank == 0:
        raise RuntimeError("rendezvous broke")
    return SimpleNamespace(rank=1, world_size=2, buffer_ptrs=[0, buf.data_ptr()], signal_pad_ptrs=[0, 0],
                           signal_pad_size=1 << 12)
symm_mem.rendezvous = rendezvous
results = []
for bad in ({1}, {0, 1}, set()):  # prepare fails on one rank, on both, on none (then rendezvous on one)
    car._prepare = prepare_fails_on(bad)
    entered.clear()
    results.append((car.maybe_create(s) is None, len(entered)))
open(sys.argv[1] + str(rank), "w").write(repr(results))
destroy()
"""


def test_creation_agrees_on_every_step_so_no_rank_waits_alone(tmp_path):
    """A failure on one rank before the rendezvous keeps every rank out of it; a failed rendezvous leaves
    every rank on NCCL (None), not just the one that saw the error."""
    from conftest import mpirun_cmd, run_cmd

    script = tmp_path / "create.py"
    script.write_text(CREATION_SCRIPT)
    run_cmd(mpirun_cmd(2) + [sys.executable, str(script), str(tmp_path / "c")], timeout=120)
    want = repr([(True, 0), (True, 0), (True, 1)])
    assert [(tmp_path / f"c{r}").read_text() for r in (0, 1)] == [want, want]


def _facts(rank1: dict | None = None):
    """Two ranks' facts, all fine, with rank 1's fields replaced by `rank1`."""
    import dataclasses

    from dist_llm.parallel.custom_all_reduce import RankFacts

    facts = [RankFacts(rank=r, host="h", device=r, enabled=True) for r in range(2)]
    return [facts[0], dataclasses.replace(facts[1], **(rank1 or {}))]


def test_one_shot_all_reduce_is_refused_by_env_hosts_errors_and_shared_gpus():
    """Every rank decides from the same gathered facts, so all take the same path (no half-made group)."""
    from dist_llm.parallel.custom_all_reduce import refusal

    assert refusal(_facts()) is None
    assert refusal(_facts({"enabled": False})) == (
        "switched off (DIST_LLM_CUSTOM_AR=0)", False
    )
    assert refusal(_facts({"host": "other"})) == ("the tp ranks span several hosts", False)
    assert refusal(_facts({"error": "no symmetric memory"})) == ("rank 1: no symmetric memory", True)
    assert refusal(_facts({"device": 0})) == ("two tp ranks share a GPU", True)


def test_custom_ar_env_switch_and_non_nccl_backends_give_none(monkeypatch):
    from dist_llm.parallel import custom_all_reduce as car
    from dist_llm.parallel.discovery import RankInfo
    from dist_llm.parallel.mapping import Mapping
    from dist_llm.parallel.state import ParallelState

    cpu = torch.device("cpu")
    monkeypatch.delenv("DIST_LLM_CUSTOM_AR", raising=False)
    assert car._local_facts(0, cpu, 2).enabled is True  # on by default where it has run: tp=2 and 4
    assert car._local_facts(0, cpu, 4).enabled is True and car._local_facts(0, cpu, 8).enabled is False
    monkeypatch.setenv("DIST_LLM_CUSTOM_AR", "0")
    assert car._local_facts(0, cpu, 2).enabled is False
    monkeypatch.setenv("DIST_LLM_CUSTOM_AR", "1")
    assert car._local_facts(0, cpu, 2).enabled is True and car._local_facts(0, cpu, 8).enabled is True

    info = RankInfo(0, 2, 0, 2, "127.0.0.1", 0, "single")
    for backend, tp in (("gloo", 2), ("nccl", 1), ("nccl", 3)):  # returns before any collective
        state = ParallelState(
            mapping=Mapping(tp_size=tp, pp_size=2 if tp == 1 else 1),
            info=info,
            backend=backend,
            device=torch.device("cpu"),
        )
        assert car.maybe_create(state) is None
    assert ParallelState(mapping=Mapping(), info=info, backend="nccl", device=torch.device("cpu")).custom_ar is None


BROADCAST_SCRIPT = """
import sys
from dist_llm.parallel import comm
from dist_llm.parallel.state import destroy, get_state, init_distributed
init_distributed(2, 1, backend="gloo", device="cpu")
rank = get_state().mapping.rank
sizes = [0, 1, comm._FRAME - 8 - 60, comm._FRAME, 5 * comm._FRAME + 3]  # in one frame, nearly full, two messages
objs = [bytes(range(256)) * (n // 256) + bytes(n % 256) for n in sizes] + [{"a": [1, 2.5, None]}]
got = [comm.broadcast_object(o if rank == 0 else None) for o in objs]
comm.flush_broadcasts()
open(sys.argv[1] + str(rank), "w").write(str(got == objs))
destroy()
"""


def test_broadcast_object_one_frame_and_longer(tmp_path):
    """Rank 0's objects arrive whole and in order on the other rank, whether the pickle fits the first
    frame, nearly fills it or needs a second message."""
    from conftest import mpirun_cmd, run_cmd

    script = tmp_path / "bcast.py"
    script.write_text(BROADCAST_SCRIPT)
    run_cmd(mpirun_cmd(2) + [sys.executable, str(script), str(tmp_path / "b")], timeout=120)
    assert [(tmp_path / f"b{r}").read_text() for r in (0, 1)] == ["True", "True"]


def test_single_rank_scope_is_a_one_rank_world_and_gives_the_job_back(monkeypatch):
    """Inside `single_rank_scope` (a draft model on rank 0) the collectives see tp = 1 on this rank's device, so a
    model built there is whole and all-reduces nothing; the job's state comes back on exit, also after an error."""
    import pytest

    import dist_llm.parallel.state as state_module
    from dist_llm.parallel import comm
    from dist_llm.parallel.mapping import Mapping
    from dist_llm.parallel.state import ParallelState, get_state, single_rank_scope

    job = ParallelState(mapping=Mapping(tp_size=2, pp_size=2, rank=0), info=None, backend="gloo",
                        device=torch.device("cpu"))
    monkeypatch.setattr(state_module, "_state", job)
    with single_rank_scope() as local:
        assert comm.tp_size() == 1 and comm.tp_rank() == 0 and local.mapping.world_size == 1
        assert local.device == job.device and local.tp_group is None
        x = torch.ones(3)
        assert comm.tp_all_reduce(x) is x and torch.equal(x, torch.ones(3))  # (no collective: tp = 1)
    assert get_state() is job and comm.tp_size() == 2
    with pytest.raises(RuntimeError, match="inside"), single_rank_scope():
        raise RuntimeError("inside")
    assert get_state() is job
