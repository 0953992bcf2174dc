"""Rank discovery from launcher environments (torchrun, SLURM, single), one real mpirun, and the
launch/mpirun.sh guard rails."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dist_llm.parallel import discovery
from dist_llm.parallel.discovery import RankInfo, discover, expand_hostlist, expand_tasks_per_node

REPO = Path(__file__).resolve().parents[1]
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
LAUNCH_PREFIXES = ("SLURM_", "OMPI_", "PMIX_", "PMI_", "MV2_", "TORCHELASTIC_", "MPI_LOCAL")


@pytest.fixture
def env(monkeypatch):
    """A clean slate: no launcher variables (CI itself may run under Slurm or mpirun)."""
    for key in list(os.environ):
        if key in LAUNCH_VARS or key.startswith(LAUNCH_PREFIXES):
            monkeypatch.delenv(key)

    def set_env(**values):
        for key, value in values.items():
            monkeypatch.setenv(key, str(value))

    return set_env


# ---------------------------------------------------------------------------------------- single

def test_single_process(env):
    info = discover()
    assert (info.rank, info.world_size, info.local_rank, info.local_world_size) == (0, 1, 0, 1)
    assert (info.master_addr, info.launcher) == ("127.0.0.1", "single")
    assert 0 < info.master_port < 65536


def test_single_honours_master_port_then_default_port(env):
    assert discover(default_port=29123).master_port == 29123
    env(MASTER_ADDR="10.0.0.5", MASTER_PORT=29500)
    info = discover(default_port=29123)
    assert (info.master_addr, info.master_port) == ("10.0.0.5", 29500)


@pytest.mark.parametrize("extra", [{}, {"SLURM_STEP_ID": 0, "SLURM_NTASKS": 1}])
def test_slurm_batch_step_is_single(env, extra):
    """The batch script has SLURM_PROCID=0 and the job's SLURM_NTASKS but no step: one process.
    An srun step of one task is one process as well."""
    env(SLURM_PROCID=0, SLURM_NTASKS=2, SLURM_LOCALID=0, SLURM_JOB_ID=7, SLURM_NODELIST="vm")
    env(**extra)
    assert discover().launcher == "single"


# -------------------------------------------------------------------------------------- torchrun

def test_torchrun(env):
    env(TORCHELASTIC_RUN_ID="abc", RANK=5, WORLD_SIZE=8, LOCAL_RANK=1, LOCAL_WORLD_SIZE=4,
        MASTER_ADDR="node01", MASTER_PORT=29400)
    assert discover() == RankInfo(5, 8, 1, 4, "node01", 29400, "torchrun")


def test_plain_rank_env_without_local_vars(env):
    env(RANK=1, WORLD_SIZE=2, MASTER_PORT=29500)
    assert discover() == RankInfo(1, 2, 1, 2, "127.0.0.1", 29500, "torchrun")


def test_torchrun_errors_name_the_variables(env, monkeypatch):
    env(TORCHELASTIC_RUN_ID="abc", RANK=4, WORLD_SIZE=4, MASTER_PORT=1)
    with pytest.raises(ValueError, match="RANK=4.*WORLD_SIZE=4"):
        discover()
    env(RANK="one")
    with pytest.raises(ValueError, match="RANK='one' is not an integer"):
        discover()
    env(RANK=1, WORLD_SIZE=2)
    monkeypatch.delenv("MASTER_PORT")
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    with pytest.raises(ValueError, match="MASTER_PORT"):
        discover()


# ----------------------------------------------------------------------------------------- SLURM

def slurm_task(env, **overrides):
    """Task 9 of `srun -N 2 -n 16` (8 per node): the first task on the second node."""
    values = dict(SLURM_PROCID=9, SLURM_NTASKS=16, SLURM_STEP_NUM_TASKS=16, SLURM_LOCALID=1, SLURM_NODEID=1,
                  SLURM_STEP_TASKS_PER_NODE="8(x2)", SLURM_TASKS_PER_NODE="8(x2)", SLURM_JOB_ID=123456,
                  SLURM_STEP_ID=3, SLURM_STEP_NODELIST="gpu[07-08]", SLURM_NODELIST="gpu[01-08]")
    values.update(overrides)
    env(**values)


def test_slurm_two_nodes(env):
    slurm_task(env)
    port = 20000 + (123456 * 31 + 3) % 20000
    assert discover() == RankInfo(9, 16, 1, 8, "gpu07", port, "slurm")


def test_slurm_port_differs_per_step_and_honours_overrides(env):
    slurm_task(env)
    first = discover().master_port
    env(SLURM_STEP_ID=4)
    assert discover().master_port != first
    assert discover(default_port=29999).master_port == 29999
    env(MASTER_ADDR="10.1.2.3", MASTER_PORT=29500)
    info = discover(default_port=29999)
    assert (info.master_addr, info.master_port) == ("10.1.2.3", 29500)


def test_slurm_job_nodelist_and_uneven_tasks_per_node(env):
    slurm_task(env, SLURM_STEP_NODELIST="", SLURM_STEP_TASKS_PER_NODE="", SLURM_TASKS_PER_NODE="3(x2),2",
               SLURM_NODEID=2, SLURM_LOCALID=1, SLURM_PROCID=7, SLURM_STEP_NUM_TASKS=8,
               SLURM_NODELIST="rack1-n[3,5],rack2-n1")
    info = discover()
    assert (info.master_addr, info.world_size, info.local_world_size) == ("rack1-n3", 8, 2)


def test_slurm_one_node_uses_loopback(env):
    slurm_task(env, SLURM_STEP_NODELIST="gpu07", SLURM_NODEID=0, SLURM_PROCID=1)
    assert discover().master_addr == "127.0.0.1"


def test_slurm_inconsistent_env(env):
    slurm_task(env, SLURM_PROCID=16)
    with pytest.raises(ValueError, match="SLURM_PROCID=16"):
        discover()
    slurm_task(env, SLURM_LOCALID=8)
    with pytest.raises(ValueError, match="SLURM_LOCALID=8"):
        discover()


@pytest.mark.parametrize("hostlist, hosts", [
    ("node[01-03,7],gpu5", ["node01", "node02", "node03", "node7", "gpu5"]),
    ("gpu5", ["gpu5"]),
    ("a,b,c", ["a", "b", "c"]),
    ("n[8-11]", ["n8", "n9", "n10", "n11"]),
    ("n[098-101]", ["n098", "n099", "n100", "n101"]),
    ("x-[001-002]-ib,y", ["x-001-ib", "x-002-ib", "y"]),
    ("r[1-2]n[01-02]", ["r1n01", "r1n02", "r2n01", "r2n02"]),
    ("a[1,3]b[7],c[009-010]", ["a1b7", "a3b7", "c009", "c010"]),
])
def test_expand_hostlist(hostlist, hosts):
    assert expand_hostlist(hostlist) == hosts


@pytest.mark.parametrize("bad", ["n[1-", "n[]", "n[3-1]", "a]b", "n[a-b]", "a,,b"])
def test_expand_hostlist_rejects_malformed(bad, monkeypatch):
    monkeypatch.setattr(discovery.shutil, "which", lambda _: None)  # no scontrol fallback
    with pytest.raises(ValueError):
        expand_hostlist(bad)


def test_expand_tasks_per_node():
    assert expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert expand_tasks_per_node("8") == [8]


# ------------------------------------------------------------------------------ launcher precedence

def test_mpi_wins_over_slurm_and_torchrun_over_mpi(env, monkeypatch):
    """mpirun inside sbatch sees SLURM_* too; torchrun started by mpirun hands its children OMPI_*."""
    monkeypatch.setattr(discovery, "_from_mpi", lambda env, port: "mpi")
    slurm_task(env)
    env(OMPI_COMM_WORLD_SIZE=16)
    assert discover() == "mpi"
    env(TORCHELASTIC_RUN_ID="x", RANK=0, WORLD_SIZE=2, MASTER_PORT=29500)
    assert discover().launcher == "torchrun"


def test_local_device_index(monkeypatch):
    import torch

    info = RankInfo(5, 8, 5, 8, "127.0.0.1", 1, "mpi")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert discovery.local_device_index(info) == 5
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)  # CUDA_VISIBLE_DEVICES=0,1,2,3
    assert discovery.local_device_index(info) == 1


# ---------------------------------------------------------------------------------- real mpirun

def _mpirun(*extra_env: str) -> list[dict]:
    root = ["--allow-run-as-root"] if os.geteuid() == 0 else []
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "PMIX_", "PMI_"))}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env.update(kv.split("=", 1) for kv in extra_env)
    cmd = ["mpirun", *root, "--oversubscribe", "-n", "2", sys.executable, "-m", "dist_llm.parallel.discovery"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return sorted((json.loads(line) for line in proc.stdout.splitlines()), key=lambda i: i["rank"])


@pytest.mark.skipif(not shutil.which("mpirun"), reason="mpirun not on PATH")
def test_mpirun_two_ranks_agree():
    infos = _mpirun()
    assert [i["rank"] for i in infos] == [0, 1]
    assert [i["local_rank"] for i in infos] == [0, 1]
    assert {(i["launcher"], i["world_size"], i["local_world_size"]) for i in infos} == {("mpi", 2, 2)}
    assert len({(i["master_addr"], i["master_port"]) for i in infos}) == 1
    assert infos[0]["master_addr"] == "127.0.0.1"  # one node

    infos = _mpirun("MASTER_ADDR=127.0.0.2", "MASTER_PORT=29777")
    assert {(i["master_addr"], i["master_port"]) for i in infos} == {("127.0.0.2", 29777)}


# ----------------------------------------------------------------------------- launch/mpirun.sh

def _launch(engine_dir, *args, **env):
    cmd = [str(REPO / "launch" / "mpirun.sh"), str(engine_dir), *args]
    full_env = {**os.environ, "PYTHON": sys.executable, "DIST_LLM_DRY_RUN": "1", **env}
    return subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=60)


def test_launch_script(tmp_path):
    missing = _launch(tmp_path / "nope")
    assert missing.returncode == 2 and "engine.json not found" in missing.stderr
    mapping = {"world_size": 4, "tp_size": 2, "pp_size": 2}
    (tmp_path / "engine.json").write_text(json.dumps({"mapping": mapping}))
    wrong = _launch(tmp_path, "-n", "8")
    assert wrong.returncode == 2 and "-n 8" in wrong.stderr and "world size 4" in wrong.stderr
    ok = _launch(tmp_path, "-n", "4", "--", "--input_text", "hi there", NCCL_IB_HCA="mlx5")
    assert ok.returncode == 0, ok.stderr
    for flag in ("-n 4", "-x NCCL_NVLS_ENABLE=0", "-x TORCH_SYMM_MEM_DISABLE_MULTICAST=1", "-x NCCL_IB_HCA",
                 "-m dist_llm.run --engine_dir", "--input_text hi\\ there"):
        assert flag in ok.stderr, (flag, ok.stderr)


SITE_KEYS = ("--partition", "--account", "--gres", "--time")


@pytest.mark.parametrize("script", sorted((REPO / "slurm").glob("*.sbatch")), ids=lambda p: p.name)
def test_sbatch_templates(script):
    """Valid bash, and every site-specific #SBATCH value has a `# change for your site` line above it."""
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    lines = script.read_text().splitlines()
    for i, line in enumerate(lines):
        if line.startswith("#SBATCH") and line.split()[1].split("=")[0] in SITE_KEYS:
            assert lines[i - 1].strip() == "# change for your site", f"{script.name}:{i + 1}: {line}"
