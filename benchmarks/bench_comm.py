"""Tensor-parallel all-reduce: time per call at decode sizes (8-64 KB) and prefill sizes, with the
nccl-tests bus bandwidth (algbw × 2(n-1)/n), through the same `dist_llm.parallel.comm.tp_all_reduce` the
model uses. Run one process per GPU:

    mpirun -n 8 python benchmarks/bench_comm.py --output_dir bench_out/comm            # NCCL on GPUs
    mpirun -n 2 python benchmarks/bench_comm.py --device cpu --output_dir /tmp/comm    # gloo on the CPU
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import header, write_json  # noqa: E402

DECODE_BYTES = [8 << 10, 16 << 10, 32 << 10, 64 << 10]  # batch 1-8 × hidden 4096-8192 × bf16
PREFILL_BYTES = [1 << 20, 8 << 20, 64 << 20, 256 << 20]


def time_all_reduce(nbytes: int, dtype: torch.dtype, device: torch.device, iters: int) -> float:
    from dist_llm.parallel import comm

    x = torch.ones(nbytes // torch.empty(0, dtype=dtype).element_size(), dtype=dtype, device=device)
    for _ in range(5):
        comm.tp_all_reduce(x)
    comm.barrier()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        comm.tp_all_reduce(x)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", required=True)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    p.add_argument("--backend", default="auto", choices=["auto", "nccl", "gloo"])
    p.add_argument("--sizes", type=int, nargs="+", help="bytes (default: decode and prefill sizes)")
    p.add_argument("--iters", type=int, default=200)
    args = p.parse_args()

    from dist_llm.parallel.discovery import discover
    from dist_llm.parallel.state import get_state, init_distributed

    world = discover().world_size
    init_distributed(tp_size=world, pp_size=1, backend=args.backend, device=args.device)
    s = get_state()
    sizes = args.sizes or (DECODE_BYTES + PREFILL_BYTES if args.device == "cuda" else DECODE_BYTES + [1 << 20])
    rows = []
    for nbytes in sizes:
        iters = args.iters if nbytes <= (1 << 20) else max(10, args.iters // 10)
        sec = time_all_reduce(nbytes, torch.bfloat16 if args.device == "cuda" else torch.float32, s.device, iters)
        algbw = nbytes / sec / 1e9
        rows.append({"bytes": nbytes, "us": sec * 1e6, "algbw_gb_s": algbw,
                     "busbw_gb_s": algbw * 2 * (world - 1) / world})
    if s.mapping.rank == 0:
        info = {**header(), "ranks": world, "backend": s.backend, "command": "python " + " ".join(sys.argv)}
        write_json(args.output_dir, f"comm_{world}ranks_{s.backend}.json", {**info, "rows": rows})
        print(f"# all-reduce over {world} ranks ({s.backend}, {info['gpu']}), {info['date']}")
        print("| bytes | µs per call | algbw GB/s | busbw GB/s |")
        print("| --- | --- | --- | --- |")
        for r in rows:
            print(f"| {r['bytes']:,} | {r['us']:.1f} | {r['algbw_gb_s']:.2f} | {r['busbw_gb_s']:.2f} |")
    from dist_llm.parallel.state import destroy

    destroy()


if __name__ == "__main__":
    main()
