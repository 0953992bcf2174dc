"""benchmarks/sass_decode_attention.py compiles decode attention for sm_90 without a GPU: with one block-table entry
per tile, the kernel issues fewer global loads and address instructions than with one per token, and keeps its
registers (the per-tile lookup must not cost occupancy). Run in a subprocess: the tests' Triton interpreter
(TRITON_INTERPRET=1) replaces compiled kernels."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


@pytest.mark.parametrize("kv", ["bf16", "fp8"])
def test_tile_gather_issues_fewer_loads_than_token_gather(kv):
    if not (BIN / "ptxas").exists() or not (BIN / "nvdisasm").exists():
        pytest.skip("this Triton build has no bundled ptxas / nvdisasm")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sass_decode_attention.py"), "--kv_dtype", kv,
                          "--configs", "32,2,2"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [line.strip("| ").split(" | ") for line in out.stdout.splitlines() if line.startswith("| 32,2,2")]
    header = next(line for line in out.stdout.splitlines() if line.startswith("| KV")).strip("| ").split(" | ")
    rows = {r[1]: dict(zip(header[2:], map(int, r[2:]))) for r in lines}
    tile, token = rows["tile"], rows["token"]
    assert tile["HMMA"] == token["HMMA"] > 0  # the same math
    assert tile["LDG"] < token["LDG"] and tile["IMAD"] < token["IMAD"], (tile, token)
    assert tile["registers"] <= token["registers"], (tile, token)
