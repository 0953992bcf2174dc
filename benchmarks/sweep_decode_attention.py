"""Sweep paged decode attention's launch configs (BLOCK_N, warps, stages) in CUDA graphs, Llama-2-7B heads
(32 × 128, bf16), 64-token blocks, at the shapes the benchmarks run: full load (batch 256 and 64 at a short
context, block tables 4,096 tokens wide, as bench_throughput builds them), a long context (batch 32 × 2k)
and batch 1. The config is picked from static shapes only, so one config must serve every context a
block-table width allows: the summary ranks configs by the geometric mean over the cases against the
current rule (`decode_attention._launch_config`). Prints GB/s of K/V read and the fraction of the copy rate.

    python benchmarks/sweep_decode_attention.py --output_dir bench_out/attn_sweep
"""

from __future__ import annotations

import argparse
import functools
import itertools
import math
import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_kernels import Bench, graph_time_us  # noqa: E402
from common import header, write_json  # noqa: E402

H, D, BS = 32, 128, 64
# (batch, context, block-table width in tokens, KV heads)
CASES = [(256, 192, 4096, 32), (64, 192, 4096, 32), (32, 2048, 4096, 32), (1, 256, 384, 32), (256, 192, 4096, 8),
         (1, 256, 1024, 32)]  # the last: bench_latency's batch 1 (max_seq_len 1024)


def make_case(batch, ctx, width, hk, kv_dtype=torch.bfloat16, layout="nhd"):
    from dist_llm.kernels.kv_cache import empty_kv_cache

    nblk = width // BS
    used = -(-ctx // BS)
    kc, vc = (empty_kv_cache(batch * used + 1, BS, hk, D, kv_dtype, "cuda", layout) for _ in range(2))
    kc.copy_(torch.randn(kc.shape, device="cuda", dtype=torch.bfloat16))
    vc.copy_(torch.randn(vc.shape, device="cuda", dtype=torch.bfloat16))
    bt = torch.zeros(batch, nblk, device="cuda", dtype=torch.int32)
    bt[:, :used] = torch.randperm(batch * used, device="cuda", dtype=torch.int32).view(batch, used)
    sl = torch.full((batch,), ctx, device="cuda", dtype=torch.int32)
    q = torch.randn(batch, H, D, device="cuda", dtype=torch.bfloat16)
    return q, kc, vc, bt, sl


def fixed_config(rule, cfg):
    """`rule` (a `_launch_config`) with BLOCK_N, warps and stages from cfg; BLOCK_D and BLOCK_G stay the rule's."""

    def config(*args):
        block_d, _, block_g, _, _ = rule(*args)
        return block_d, cfg[0], block_g, cfg[1], cfg[2]

    return config


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", required=True)
    p.add_argument("--kv_cache_dtype", default="auto", choices=["auto", "fp8"], help="fp8: e4m3 caches, scales 1")
    p.add_argument("--configs", nargs="+", metavar="N,W,S", help="only these BLOCK_N,warps,stages (and the rule)")
    p.add_argument("--kv_layout", default="nhd", choices=["nhd", "hnd"],
                   help="the caches' order in memory (kernels/kv_cache.empty_kv_cache)")
    p.add_argument("--cases", nargs="+", metavar="B,CTX,WIDTH,HK",
                   help="sweep these (batch, context, block-table width in tokens, KV heads) instead of the defaults")
    p.add_argument("--programs", type=int, nargs="+", default=[],
                   help="also time the rule's config with these pass-1 program targets (decode_attention's "
                        "TARGET_PROGRAMS, 1024; 32 gives batch 1 a single pass)")
    args = p.parse_args()
    cases = CASES
    if args.cases:
        try:
            cases = [tuple(int(x) for x in c.split(",")) for c in args.cases]
        except ValueError:
            cases = []
        if not cases or any(len(c) != 4 or min(c) < 1 or c[2] % BS or c[1] > c[2] or H % c[3] for c in cases):
            p.error(f"--cases takes B,CTX,WIDTH,HK with CTX <= WIDTH, WIDTH a multiple of {BS} and HK dividing {H}, "
                    f"e.g. 384,180,4096,32; got {args.cases}")
    if not torch.cuda.is_available():
        sys.exit("sweep_decode_attention.py needs a CUDA GPU")
    from dist_llm.kernels import decode_attention as da

    info = header()
    b = Bench("cuda", small=False)
    b.rep_s = 0.05
    src = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy_gb_s = 2 * src.nbytes / b.time_us(lambda: dst.copy_(src)) / 1e3
    print(f"# {info['gpu']}  torch {info['torch']}  triton {info['triton']}; copy {copy_gb_s:.0f} GB/s; "
          f"KV layout {args.kv_layout}", flush=True)
    configs = [None] + list(itertools.product([16, 32, 64], [2, 4, 8], [1, 2, 3]))
    if args.configs:
        configs = [None] + [tuple(int(x) for x in c.split(",")) for c in args.configs]
    configs += [f"programs={n}" for n in args.programs]  # the rule's config, another partition count
    kv_dtype = torch.float8_e4m3fn if args.kv_cache_dtype == "fp8" else torch.bfloat16
    base_rule, base_programs = da._launch_config, da.TARGET_PROGRAMS
    results = {}
    for case in cases:
        batch, ctx, width, hk = case
        q, kc, vc, bt, sl = make_case(*case, kv_dtype, args.kv_layout)
        ws = da.DecodeWorkspace.allocate(max(batch, 64), H, D, width, q.device)
        out = torch.empty_like(q)
        call = functools.partial(da.paged_decode_attention, q, kc, vc, bt, sl, D**-0.5, out, ws)
        ref = da.paged_decode_attention(q, kc, vc, bt, sl, D**-0.5, out, ws).clone()
        kv_bytes = batch * ctx * hk * D * 2 * kc.element_size()
        for cfg in configs:
            da.TARGET_PROGRAMS = base_programs
            if cfg is None:
                da._launch_config = base_rule
            elif isinstance(cfg, str):
                da._launch_config = base_rule
                da.TARGET_PROGRAMS = int(cfg.split("=")[1])
            else:
                da._launch_config = fixed_config(base_rule, cfg)
            try:
                us = graph_time_us(b, [call])
            except Exception as e:  # out of shared memory and the like
                print(f"  {case} {cfg}: {type(e).__name__}", flush=True)
                continue
            diff = (out.float() - ref.float()).abs().max().item()
            results.setdefault(str(cfg), {})[str(case)] = {"us": us, "gb_s": kv_bytes / us / 1e3, "max_diff": diff}
        da._launch_config, da.TARGET_PROGRAMS = base_rule, base_programs
        cur = results["None"][str(case)]
        best = min((per[str(case)]["us"], cfg) for cfg, per in results.items() if str(case) in per)
        print(f"batch {batch} ctx {ctx} table {width} Hk {hk}: current {cur['us']:.1f} us ({cur['gb_s']:.0f} GB/s, "
              f"{cur['gb_s'] / copy_gb_s:.0%} of copy); best {best[1]} {best[0]:.1f} us", flush=True)
    ranked = []
    for cfg, per in results.items():
        if len(per) < len(cases):
            continue
        ratios = [results["None"][c]["us"] / per[c]["us"] for c in per]
        ranked.append((math.exp(sum(map(math.log, ratios)) / len(ratios)), cfg, ratios))
    ranked.sort(reverse=True)
    print("\nconfig (BLOCK_N, warps, stages): geometric-mean speed-up over the current rule, then per case")
    for gm, cfg, ratios in ranked[:12]:
        print(f"  {cfg:>14}: {gm:.3f}  " + " ".join(f"{r:.2f}" for r in ratios))
    if ranked:  # "BLOCK_N,warps,stages" of the best, for DIST_LLM_DECODE_ATTN_CONFIG in A/B runs
        best = ranked[0][1] if ranked[0][1] != "None" else ranked[1][1]
        print("best:", best.strip("()").replace(" ", ""))
    write_json(args.output_dir, f"attn_sweep_{args.kv_cache_dtype}_{args.kv_layout}.json",
               {**info, "copy_gb_s": copy_gb_s, "cases": cases, "results": results})


if __name__ == "__main__":
    main()
