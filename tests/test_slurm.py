"""Launch under a real Slurm (start one with .ci/slurm_up.sh, then `. /tmp/dist_llm_slurm/env.sh`).

Both launch modes of slurm/cpu_demo.sbatch must give exactly the output of a direct `mpirun -n 2`:
`mpirun` inside the allocation (ranks from MPI, although SLURM_* is set too) and `srun --mpi=none`
(ranks from SLURM_* only; the PMIx plugin does not load on Debian's slurm).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PROMPT = "The capital of France is"
MAX_NEW_TOKENS = 8

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.skipif(
        not os.environ.get("SLURM_CONF") or not shutil.which("sbatch") or not shutil.which("mpirun"),
        reason="needs a running Slurm: run .ci/slurm_up.sh and source /tmp/dist_llm_slurm/env.sh "
        "(SLURM_CONF unset, or sbatch/mpirun not on PATH)",
    ),
]


def _env(**extra: str) -> dict[str, str]:
    """The job sees our python (the venv's bin dir first on PATH) and this checkout of dist_llm."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env["OMP_NUM_THREADS"] = "1"  # two ranks on a small CI box
    env.update(extra)
    return env


def _sbatch(script: Path, log: Path, **extra: str) -> None:
    """Submit and wait; on failure show the job's log, which says which rank broke."""
    cmd = ["sbatch", "--wait", "--export=ALL", f"--chdir={REPO}", f"--output={log}", str(script)]
    proc = subprocess.run(cmd, env=_env(**extra), capture_output=True, text=True, timeout=600)
    job_log = log.read_text() if log.exists() else "(no job log)"
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr}\n{job_log}"


def _mpirun_prefix() -> list[str]:
    root = ["--allow-run-as-root"] if os.geteuid() == 0 else []
    return ["mpirun", *root, "--oversubscribe", "-n", "2"]


CHECK = """
import json
import torch
import torch.distributed as dist
from dataclasses import asdict
from dist_llm.parallel.discovery import discover
info = discover()
dist.init_process_group("gloo", init_method=f"tcp://{info.master_addr}:{info.master_port}",
                        rank=info.rank, world_size=info.world_size)
t = torch.tensor([info.rank + 1])
dist.all_reduce(t)
print(json.dumps({**asdict(info), "sum": int(t.item())}), flush=True)
dist.destroy_process_group()
"""


def test_rank_discovery_under_slurm(tmp_path):
    """mpirun in the batch script -> "mpi"; srun --mpi=none -> "slurm"; the batch step alone -> "single".
    Each multi-rank launch then really rendezvouses on the discovered address (a gloo all-reduce)."""
    (tmp_path / "check.py").write_text(CHECK)
    mpirun = " ".join(_mpirun_prefix())
    script = tmp_path / "discovery.sbatch"
    script.write_text(f"""#!/bin/bash
#SBATCH --job-name=dist_llm_discovery
#SBATCH --nodes=1
#SBATCH --ntasks=2
#SBATCH --time=00:05:00
set -euo pipefail
{mpirun} python {tmp_path}/check.py > {tmp_path}/mpirun.jsonl
srun -n 2 --mpi=none python {tmp_path}/check.py > {tmp_path}/srun.jsonl
python -m dist_llm.parallel.discovery > {tmp_path}/batch.jsonl
""")
    _sbatch(script, tmp_path / "job.log")

    for mode, launcher in (("mpirun", "mpi"), ("srun", "slurm")):
        infos = [json.loads(line) for line in (tmp_path / f"{mode}.jsonl").read_text().splitlines()]
        assert sorted(i["rank"] for i in infos) == [0, 1], (mode, infos)
        assert sorted(i["local_rank"] for i in infos) == [0, 1], (mode, infos)
        assert {(i["launcher"], i["world_size"], i["local_world_size"]) for i in infos} == {(launcher, 2, 2)}
        assert len({(i["master_addr"], i["master_port"]) for i in infos}) == 1, (mode, infos)
        assert {i["sum"] for i in infos} == {3}, (mode, infos)  # 1 + 2 over the real process group
    srun_port = json.loads((tmp_path / "srun.jsonl").read_text().splitlines()[0])["master_port"]
    assert 20000 <= srun_port < 40000  # derived from SLURM_JOB_ID / SLURM_STEP_ID
    (batch,) = [json.loads(line) for line in (tmp_path / "batch.jsonl").read_text().splitlines()]
    assert (batch["launcher"], batch["world_size"]) == ("single", 1)


def test_cpu_demo_matches_mpirun(tiny_engine_tp2, tmp_path):
    run_args = ["--engine_dir", str(tiny_engine_tp2), "--input_text", PROMPT, "--max_new_tokens",
                str(MAX_NEW_TOKENS), "--temperature", "0", "--device", "cpu", "--backend", "gloo"]
    ref = tmp_path / "direct.json"
    cmd = [*_mpirun_prefix(), sys.executable, "-m", "dist_llm.run", *run_args, "--output_json", str(ref)]
    proc = subprocess.run(cmd, env=_env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    expected = json.loads(ref.read_text())
    assert expected and expected[0]["output_token_ids"], expected

    for launch in ("mpirun", "srun"):
        out = tmp_path / f"{launch}.json"
        _sbatch(REPO / "slurm" / "cpu_demo.sbatch", tmp_path / f"{launch}.log",
                DIST_LLM_ENGINE=str(tiny_engine_tp2), DIST_LLM_LAUNCH=launch, DIST_LLM_OUT=str(out),
                DIST_LLM_PROMPT=PROMPT, DIST_LLM_MAX_NEW_TOKENS=str(MAX_NEW_TOKENS))
        assert json.loads(out.read_text()) == expected, launch
