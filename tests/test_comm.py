"""Control-plane collectives in `parallel/comm.py` under mpirun (gloo, CPU)."""

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
