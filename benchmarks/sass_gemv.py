"""The batch-1 GEMV compiled offline for a GPU target (no GPU needed; `sass_decode_attention.py`'s tools) at a
model's one-row shapes: registers, spills and instruction count of the plain kernel and of the norm fold's two
epilogues (`kernels/gemv_norm.py`), and with the register cap that `gemv.launch` puts on them. A static
check for when no GPU is at hand: a producer that needs more registers than the plain kernel holds fewer programs
an SM, and a projection whose programs then no longer fit one wave streams in two.

    python benchmarks/sass_gemv.py [--model llama-2-7b] [--arch 90] [--card H100]
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # what the runtime compiles with
import triton  # noqa: E402
from sass_decode_attention import inspect  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from dist_llm.checkpoint.presets import PRESETS  # noqa: E402
from dist_llm.kernels import gemv as G  # noqa: E402

INTS = ("N", "K", "stride_xm", "stride_wn", "stride_ym", "num_parts")


def compile_gemv(n: int, k: int, arch: int, silu: bool = False, epilogue: str = "plain", maxnreg: int | None = None,
                 card: str = ""):  # fmt: skip
    """`_gemv_kernel` as `gemv` launches it for one bf16 row of an [n, k] weight on `card` (a key of
    `gemv._TUNED_ONE_ROW_BY_CARD`, "" for the rule); epilogue "plain", "add_norm" (the producer) or "norm_in"
    (the consumer)."""
    block_n, block_k, warps = G._config(1, n, k, 2, card)
    names = G._gemv_kernel.arg_names
    ptrs = {"x_ptr": "*bf16", "w_ptr": "*bf16", "b_ptr": "*bf16", "y_ptr": "*bf16"}
    consts = dict(M=1, BLOCK_N=block_n, BLOCK_K=block_k, EVEN_K=k % block_k == 0, HAS_BIAS=False, USE_PDL=True,
                  PREFETCH=G.prefetch_chunks(k, block_k), SILU_MUL=silu, ROPE_KV=False,
                  ADD_NORM=epilogue == "add_norm", NORM_IN=epilogue == "norm_in", PARTS_BLOCK=512)  # fmt: skip
    if epilogue == "add_norm":
        ptrs.update(res_ptr="*bf16", nw_ptr="*bf16", hw_ptr="*bf16", part_out_ptr="*fp32")
    if epilogue == "norm_in":
        ptrs.update(part_in_ptr="*fp32")
    sig = {}
    for name in names:
        if name in ptrs:
            sig[name] = ptrs[name]
        elif name in INTS:
            sig[name] = "i32"
        elif name == "eps":
            sig[name] = "fp32"
        else:
            sig[name] = "constexpr"
            consts.setdefault(name, None)
    div16 = [name for name in names if name in ptrs or name in ("K", "stride_wn")]
    src = ASTSource(G._gemv_kernel, sig, constexprs={(names.index(a),): v for a, v in consts.items()},
                    attrs={(names.index(a),): [["tt.divisibility", 16]] for a in div16})  # fmt: skip
    options = dict(num_warps=warps, num_stages=G._NUM_STAGES)
    if maxnreg:
        options["maxnreg"] = maxnreg
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options), warps


def rows(model: str, arch: int, card: str = ""):
    """(projection, variant, registers, spill instructions, instructions) for each one-row GEMV of `model`."""
    cfg = PRESETS[model]
    h, i, heads = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_attention_heads"]
    qkv = h + 2 * cfg["num_key_value_heads"] * (h // heads)
    shapes = {"qkv": (qkv, h, False, "norm_in"), "o": (h, h, False, "add_norm"),
              "gate_up": (2 * i, h, False, "norm_in"), "down": (h, i, True, "add_norm"),
              "lm_head": (cfg["vocab_size"], h, False, "norm_in")}  # fmt: skip
    for proj, (n, k, silu, fold) in shapes.items():
        variants = [("plain", None), (fold, None)]
        cap = G._FOLD_MAX_REGISTERS.get(G._config(1, n, k, 2, card))
        if cap:  # what `gemv.launch` launches the fold with
            variants.append((fold, cap))
        for epilogue, cap in variants:
            compiled, _ = compile_gemv(n, k, arch, silu, epilogue, cap, card)
            regs, ops = inspect(compiled)
            name = epilogue + (f" maxnreg={cap}" if cap else "")
            yield proj, name, regs, ops["STL"] + ops["LDL"], sum(ops.values())


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-2-7b", choices=sorted(PRESETS))
    p.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: H100/H200)")
    p.add_argument("--card", default="", choices=["", *G._TUNED_ONE_ROW_BY_CARD],
                   help="the configs a card of gemv._TUNED_ONE_ROW_BY_CARD launches (default: the rule)")
    args = p.parse_args()
    print("| projection | epilogue | registers | spill instructions | instructions |")
    print("| --- | --- | --- | --- | --- |")
    for row in rows(args.model, args.arch, args.card):
        print("| " + " | ".join(map(str, row)) + " |")


if __name__ == "__main__":
    main()
