"""Decode attention's pass-1 kernel compiled offline for a GPU target (no GPU needed: Triton's bundled ptxas and
nvdisasm), with the runtime's specialisations (unit strides as constants, pointers and strides divisible by 16):
registers, shared memory and the SASS instruction mix per config. A static check for when no GPU is at hand: it
says what a change does to the code, not how fast it runs.

    python benchmarks/sass_decode_attention.py [--kv_dtype fp8] [--configs 32,2,2 64,4,2] [--gather token]
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import tempfile

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # what the runtime compiles with (Triton 3.9 warns if unset)
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from dist_llm.kernels.decode_attention import _decode_partition_kernel as KERNEL  # noqa: E402

UNIT_STRIDES = ("stride_qd", "stride_kd", "stride_vd", "stride_od", "stride_pod", "stride_btm", "stride_pls")
BLOCK_SIZE = 64  # tokens per KV block, as the benchmarks build engines
SHOWN = ("IMAD", "LEA", "LDG", "LDGSTS", "LDS", "LDSM", "F2FP", "HMMA", "STL")


def compile_config(kv: str, block_n: int, warps: int, stages: int, tile_gather: bool, arch: int):
    names = KERNEL.arg_names
    ptrs = {"q_ptr": "*bf16", "k_cache_ptr": f"*{kv}", "v_cache_ptr": f"*{kv}", "block_tables_ptr": "*i32",
            "seq_lens_ptr": "*i32", "out_ptr": "*bf16", "part_out_ptr": "*fp32", "part_lse_ptr": "*fp32"}
    consts = dict(GROUP=1, BLOCK_G=16, HEAD_DIM=128, BLOCK_D=128, BLOCK_SIZE=BLOCK_SIZE, BLOCK_N=block_n, SINGLE=True,
                  PRECISION="tf32", USE_PDL=True, DOT_F16=kv == "fp8e4nv", EARLY_EXIT=True,
                  TILE_IN_BLOCK=tile_gather and BLOCK_SIZE % block_n == 0, **{n: 1 for n in UNIT_STRIDES})
    sig = {n: ptrs.get(n) or ("constexpr" if n in consts else "fp32" if n in ("qk_scale", "v_scale") else "i32")
           for n in names}
    div16 = [n for n in names if n in ptrs or (n.startswith("stride") and n not in UNIT_STRIDES and n != "stride_btb")]
    src = ASTSource(KERNEL, sig, constexprs={(names.index(k),): v for k, v in consts.items()},
                    attrs={(names.index(n),): [["tt.divisibility", 16]] for n in div16})
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=warps, num_stages=stages))


def _tool(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def inspect(compiled) -> tuple[int | None, collections.Counter]:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
    try:
        usage = subprocess.run([_tool("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True).stdout
        sass = subprocess.run([_tool("nvdisasm"), "-c", f.name], capture_output=True, text=True).stdout
    finally:
        os.unlink(f.name)
    m = re.search(r"REG:(\d+)", usage)
    ops = collections.Counter()
    for line in sass.splitlines():
        op = re.match(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line)
        if op:
            ops[op.group(1).split(".")[0]] += 1
    return (int(m.group(1)) if m else None), ops


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kv_dtype", default="bf16", choices=["bf16", "fp8"])
    p.add_argument("--configs", nargs="+", default=["32,2,2", "64,4,2"], metavar="N,W,S")
    p.add_argument("--gather", nargs="+", default=["tile", "token"], choices=["tile", "token"])
    p.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: H100/H200)")
    args = p.parse_args()
    kv = "fp8e4nv" if args.kv_dtype == "fp8" else "bf16"
    print(f"| KV {args.kv_dtype} config | gather | registers | shared bytes | instructions | "
          + " | ".join(SHOWN) + " |")
    print("| --- " * (5 + len(SHOWN)) + "|")
    for cfg in args.configs:
        n, w, s = (int(x) for x in cfg.split(","))
        for gather in args.gather:
            c = compile_config(kv, n, w, s, gather == "tile", args.arch)
            regs, ops = inspect(c)
            print(f"| {cfg} | {gather} | {regs} | {c.metadata.shared} | {sum(ops.values())} | "
                  + " | ".join(str(ops[k]) for k in SHOWN) + " |")


if __name__ == "__main__":
    main()
