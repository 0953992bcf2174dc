"""bench_comm runs the model's own all-reduce under mpirun and reports time and bus bandwidth per size."""

import json
import sys
from pathlib import Path

from conftest import mpirun_cmd, run_cmd

REPO = Path(__file__).resolve().parents[1]


def test_bench_comm_on_cpu(tmp_path):
    run_cmd(mpirun_cmd(2) + [sys.executable, str(REPO / "benchmarks" / "bench_comm.py"), "--device", "cpu",
                             "--output_dir", str(tmp_path), "--sizes", "8192", "65536", "--iters", "5"])
    data = json.loads((tmp_path / "comm_2ranks_gloo.json").read_text())
    assert [r["bytes"] for r in data["rows"]] == [8192, 65536]
    for r in data["rows"]:
        assert r["us"] > 0 and r["busbw_gb_s"] == r["algbw_gb_s"]  # 2(n-1)/n = 1 for two ranks


def test_bench_control_plane_on_cpu(tmp_path):
    run_cmd(mpirun_cmd(2) + [sys.executable, str(REPO / "benchmarks" / "bench_control_plane.py"),
                             "--output_dir", str(tmp_path), "--batch_sizes", "1", "33", "--plans", "20"])
    data = json.loads((tmp_path / "control_plane.json").read_text())
    assert [r["batch"] for r in data["rows"]] == [1, 33] and data["ranks"] == 2
    for r in data["rows"]:
        assert r["us_per_plan"] > 0 and r["bytes"] > 0
