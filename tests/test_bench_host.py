"""bench_host runs on the CPU and writes its table; a smoke test so the benchmark cannot rot."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bench_host(tmp_path):
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_host.py"), "--batch_sizes", "1", "8",
                    "--steps", "3", "--output_dir", str(tmp_path)], check=True, capture_output=True, timeout=120)
    rows = json.loads((tmp_path / "host.json").read_text())["rows"]
    assert [r["batch"] for r in rows] == [1, 8]
    assert all(r["step_ms"] > 0 and 0 < r["plan_ms"] for r in rows)
