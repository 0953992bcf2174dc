"""A crash on any rank ends the whole job within seconds, with that rank's traceback: never a hang."""

from __future__ import annotations

import sys
import time

import pytest
from conftest import mpirun_cmd, run_cmd

CRASH = """
import sys
import dist_llm.runtime.worker as w
from dist_llm.runtime import ModelRunner

victim = int(sys.argv[2])
original = w.Worker.execute
calls = {"n": 0}

def execute(self, plan):
    calls["n"] += 1
    if self.mapping.rank == victim and calls["n"] == 3:
        raise RuntimeError(f"injected failure on rank {victim}")
    return original(self, plan)

w.Worker.execute = execute
runner = ModelRunner.from_dir(sys.argv[1])
runner.generate(batch_input_ids=[[5, 6, 7]], max_new_tokens=20, ignore_eos=True)
"""


@pytest.mark.parametrize("victim", [0, 1])
def test_a_crash_on_any_rank_ends_the_job(victim, tiny_engine_tp2, tmp_path):
    script = tmp_path / "crash.py"
    script.write_text(CRASH)
    start = time.time()
    proc = run_cmd(mpirun_cmd(2) + [sys.executable, str(script), tiny_engine_tp2, str(victim)], check=False,
                   timeout=120)
    assert proc.returncode != 0
    assert time.time() - start < 60
    assert f"[rank {victim}] uncaught exception" in proc.stderr
    assert f"injected failure on rank {victim}" in proc.stderr
