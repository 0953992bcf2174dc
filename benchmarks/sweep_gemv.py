"""Sweep the decode GEMV's launch configs at one row, at a model's projection shapes (bf16), in CUDA graphs
with programmatic dependent launch (`bench_kernels.graph_time_us`), cycling through 8 weight copies so
that nothing is served from L2. The down projection runs as the model runs it, with SiLU-and-mul. Prints
cuBLAS, the config `gemv._config` picks, and the best six per shape; the JSON has every config. This is
how the one-row rules and the table in `dist_llm/kernels/gemv.py:_config` were chosen.

    python benchmarks/sweep_gemv.py --output_dir bench_out/gemv_sweep [--model llama-2-70b] [--shapes qkv,o] [--tp 2]

`--tp N` sweeps one rank's shard at tensor parallelism N: N divided for the column-parallel projections
(qkv, gate_up, LM head), K for the row-parallel ones (o, down).

`--write_table FILE` writes this card's one-row table for `DIST_LLM_GEMV_TABLE=FILE`: each swept shape whose best
config (at the stage count the model launches) beats the rule by 1% or more. That is how a GPU other than the ones
`gemv._TUNED_ONE_ROW_BY_CARD` names gets its own configs without a code change.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_kernels import Bench, graph_time_us  # noqa: E402
from common import header, write_json  # noqa: E402

from dist_llm.checkpoint.presets import preset_config  # noqa: E402

NAMES = ("qkv", "o", "gate_up", "down", "lm_head")
ROW_PARALLEL = ("o", "down")


def shapes(model: str) -> dict[str, tuple[int, int, str | None]]:
    """name: (N, K, act) of the preset's projections; the down projection reads [gate | up] with SiLU-and-mul."""
    c = preset_config(model)
    h, heads, kv = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"]
    d, inter = h // heads, c["intermediate_size"]
    return {"qkv": ((heads + 2 * kv) * d, h, None), "o": (h, heads * d, None), "gate_up": (2 * inter, h, None),
            "down": (h, inter, "silu_and_mul"), "lm_head": (c["vocab_size"], h, None)}  # fmt: skip


def shard(shape: tuple[int, int, str | None], name: str, tp: int) -> tuple[int, int, str | None]:
    n, k, act = shape
    return (n, k // tp, act) if name in ROW_PARALLEL else (n // tp, k, act)


COPIES = 8


def sweep(b: Bench, name: str, shape: tuple[int, int, str | None], tp: int = 1) -> dict:
    from dist_llm.kernels import gemv as G
    from dist_llm.kernels._pdl import pdl_launch_kwargs

    n, k, act = shard(shape, name, tp)
    dev = torch.device("cuda")
    weights = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) * k**-0.5 for _ in range(COPIES)]
    x = torch.randn(1, 2 * k if act else k, device=dev, dtype=torch.bfloat16)
    out = torch.empty(1, n, device=dev, dtype=torch.bfloat16)
    gb = n * k * 2 / 1e3  # GB/s = gb / µs
    ref = G.gemv(x, weights[0], act=act).float()
    row = {"n": n, "k": k, "act": act, "current": list(G._config(1, n, k, 2, G.card(dev))),
           "current_gb_s": gb / graph_time_us(b, [lambda w=w: G.gemv(x, w, out=out, act=act) for w in weights])}
    if act is None:
        row["cublas_gb_s"] = gb / graph_time_us(b, [lambda w=w: F.linear(x, w, out=out) for w in weights])
    configs = []
    for bn, bk, nw, ns in itertools.product([4, 8, 16, 32], [256, 512, 1024], [4, 8], [2, 3, 4]):
        if bn * bk / (32 * nw) > 64 or bk / (32 * nw) < 2:
            continue  # over 64 accumulator registers per thread, or under one 4-byte vector per thread

        def launch(w, bn=bn, bk=bk, nw=nw, ns=ns):
            G._gemv_kernel[(triton.cdiv(n, bn),)](
                x, w, w, out, n, k, x.stride(0), w.stride(0), out.stride(0),
                M=1, BLOCK_N=bn, BLOCK_K=bk, EVEN_K=k % bk == 0, HAS_BIAS=False, PREFETCH=G.prefetch_chunks(k, bk),
                SILU_MUL=act is not None, **pdl_launch_kwargs(dev), num_warps=nw, num_stages=ns,
            )  # fmt: skip

        launch(weights[0])
        err = (out.float() - ref).abs().max().item()
        configs.append({"block_n": bn, "block_k": bk, "num_warps": nw, "num_stages": ns, "max_diff": err,
                        "gb_s": gb / graph_time_us(b, [lambda w=w: launch(w) for w in weights])})
    row["configs"] = sorted(configs, key=lambda c: -c["gb_s"])
    return row


MIN_GAIN = 1.01  # a table entry must beat the rule by this much: smaller gaps are run-to-run spread


def card_table(rows: dict, card: str, num_stages: int) -> dict:
    """The `load_card_table` form of a sweep: per shape, its best config at `num_stages` where it beats the rule's."""
    from dist_llm.kernels import gemv as G

    entries = []
    for r in rows.values():
        at = {(c["block_n"], c["block_k"], c["num_warps"]): c["gb_s"] for c in r["configs"]
              if c["num_stages"] == num_stages}
        rule = G._config(1, r["n"], r["k"], 2, "")
        best = max(at, key=at.get)
        if rule not in at or at[best] >= MIN_GAIN * at[rule]:
            entries.append([r["n"], r["k"], *best])
    return {"card": card, "one_row": entries}


def write_table(path: str, table: dict) -> None:
    """Atomically: a reader never sees half a file."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(table, f)
    os.replace(tmp, path)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", required=True)
    p.add_argument("--model", default="llama-2-7b", help="a preset of dist_llm/checkpoint/presets.py")
    p.add_argument("--shapes", default=",".join(NAMES), help=f"comma-separated, of {', '.join(NAMES)}")
    p.add_argument("--tp", type=int, default=1, choices=[1, 2, 4, 8], help="sweep one rank's shard at this tp")
    p.add_argument("--write_table", metavar="FILE", help="write this card's table for DIST_LLM_GEMV_TABLE=FILE")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("sweep_gemv.py needs a CUDA GPU")
    names = args.shapes.split(",")
    unknown = [s for s in names if s not in NAMES]
    if unknown:
        sys.exit(f"unknown --shapes {unknown}; choose from {', '.join(NAMES)}")
    model_shapes = shapes(args.model)
    info = header()
    b = Bench("cuda", small=False)
    b.rep_s = 0.02  # ~60 configs a shape: a short loop of graph replays each is enough at these sizes
    rows = {name: sweep(b, name, model_shapes[name], args.tp) for name in names}
    command = "python " + " ".join(sys.argv)
    if args.write_table:
        from dist_llm.kernels import gemv as G

        table = card_table(rows, torch.cuda.get_device_name().removeprefix("NVIDIA "), G._NUM_STAGES)
        write_table(args.write_table, table)
        print(f"wrote {args.write_table}: {table}")
    write_json(args.output_dir, "gemv_sweep.json",
               {**info, "model": args.model, "tp": args.tp, "shapes": rows, "command": command})
    print(f"# {info['gpu']}  torch {info['torch']}  triton {info['triton']}  {info['date']}  {args.model} tp={args.tp}")
    for name, r in rows.items():
        cublas = f"cuBLAS {r['cublas_gb_s']:.0f} GB/s, " if "cublas_gb_s" in r else ""
        print(f"{name} [{r['n']} x {r['k']}]: {cublas}current {tuple(r['current'])} {r['current_gb_s']:.0f} GB/s")
        for c in r["configs"][:6]:
            print(f"  {c['gb_s']:6.0f} GB/s  BLOCK_N={c['block_n']} BLOCK_K={c['block_k']} "
                  f"warps={c['num_warps']} stages={c['num_stages']} max diff {c['max_diff']:.2g}")


if __name__ == "__main__":
    main()
