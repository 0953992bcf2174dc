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


def test_norm_fold_epilogues_keep_the_plain_gemv_occupancy():
    """benchmarks/sass_gemv.py: at Llama-2-7B's one-row shapes the norm fold's capped launches use no more registers
    than the plain GEMV (to the allocation unit of 8) and spill nothing; the caps matter (uncapped, they need more)."""
    if not (BIN / "ptxas").exists() or not (BIN / "nvdisasm").exists():
        pytest.skip("this Triton build has no bundled ptxas / nvdisasm")
    table = _sass_gemv_table()
    capped = [(p, e) for p, e in table if "maxnreg" in e]
    assert {p for p, _ in capped} == {"down", "gate_up", "lm_head"}, table
    for proj, epilogue in capped:
        plain_regs = table[proj, "plain"][0]
        regs, spills = table[proj, epilogue]
        assert regs <= -(-plain_regs // 8) * 8 and spills == 0, (proj, table)
        assert table[proj, epilogue.split()[0]][0] > regs, (proj, table)  # uncapped it would take more


def _sass_gemv_table(*args: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)  # this tree's dist_llm, whatever the environment has installed
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sass_gemv.py"), *args], capture_output=True,
                         text=True, env=env, cwd=ROOT, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    table = {}
    for line in out.stdout.splitlines()[2:]:
        proj, epilogue, regs, spills, _ = line.strip("| ").split(" | ")
        table[proj, epilogue] = int(regs), int(spills)
    return table


def test_the_h100_gemv_configs_spill_nothing():
    """The H100's own one-row configs (`gemv._TUNED_ONE_ROW_BY_CARD`): the folded-norm consumers (qkv, gate_up, LM
    head) stay within the plain kernel's register allocation unit and nothing spills."""
    if not (BIN / "ptxas").exists() or not (BIN / "nvdisasm").exists():
        pytest.skip("this Triton build has no bundled ptxas / nvdisasm")
    table = _sass_gemv_table("--card", "H100")
    assert all(spills == 0 for _, spills in table.values()), table
    for proj in ("qkv", "gate_up", "lm_head"):
        plain, folded = table[proj, "plain"][0], table[proj, "norm_in"][0]
        assert folded <= -(-plain // 8) * 8 + 8, (proj, table)
