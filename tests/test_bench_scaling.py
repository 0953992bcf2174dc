"""benchmarks/bench_scaling.py end to end on the CPU: a tiny dummy-weight model at 1×1, 2×1 and 1×2 under
mpirun (gloo), two batch sizes, an fp8 KV pool; the JSON has every row with positive tok/s and efficiencies, and both
plots are real images."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
CONFIGS, BATCHES = ["1x1", "2x1", "1x2"], [1, 4]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    pytest.importorskip("matplotlib")
    out = tmp_path_factory.mktemp("scaling")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_scaling.py"), "--model", "tiny", "--device", "cpu",
           "--configs", *CONFIGS, "--batch_sizes", *map(str, BATCHES), "--input_len", "8", "--output_len", "8",
           "--output_dir", str(out), "--kv_cache_dtype", "fp8"]  # fp8: its pool under tp and pp too
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "DIST_LLM_GEMV_PREFETCH": "2"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return out, proc.stdout


def test_json_has_every_row(sweep):
    out, stdout = sweep
    data = json.loads((out / "scaling.json").read_text())
    assert [c["status"] for c in data["configs"]] == ["ok"] * len(CONFIGS)
    assert data["efficiency_base"]["world_size"] == 1
    rows = {(r["config"], r["batch"]): r for r in data["rows"]}
    assert set(rows) == {(c, b) for c in CONFIGS for b in BATCHES}
    for r in rows.values():
        assert r["output_tok_s"] > 0 and r["efficiency"] > 0 and r["ttft_ms_mean"] > 0
        assert r["world_size"] == r["tp"] * r["pp"]
    assert rows[("1x1", 4)]["efficiency"] == pytest.approx(1.0)
    latency = {r["config"]: r for r in data["latency"]}
    assert set(latency) == set(CONFIGS)
    for r in latency.values():
        assert r["decode_tok_s"] > 0 and r["efficiency"] > 0
        assert r["decode_tok_s"] == pytest.approx(1e3 / r["decode_ms_per_token"])
    assert "bench_scaling.py" in data["command"] and data["model"] == "tiny"
    assert data["switches"]["DIST_LLM_GEMV_PREFETCH"] == "2"  # the knobs of an A/B run are on record
    assert data["kv_cache_dtype"] == "fp8"
    assert [c["kv_dtype"] for c in data["configs"]] == ["float8_e4m3fn"] * len(CONFIGS)  # what rank 0 ran on
    for c in CONFIGS:  # the Markdown table
        assert f"| {c} |" in stdout


@pytest.mark.parametrize("name", ["scaling_tok_s.png", "scaling_efficiency.png"])
def test_plots_are_images(sweep, name):
    import matplotlib.image

    img = matplotlib.image.imread(str(sweep[0] / name))
    height, width = img.shape[:2]
    assert width >= 400 and height >= 300
    rgb = img[..., :3].reshape(-1, 3)
    assert len(np.unique(rgb, axis=0)) > 10  # lines, text and axes, not a blank canvas
    assert (rgb.std(axis=0) > 0.01).any()
