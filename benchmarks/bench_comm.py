"""Tensor-parallel all-reduce: time per call at decode sizes (8-64 KB) and prefill sizes, with the
nccl-tests bus bandwidth (algbw × 2(n-1)/n), through the same `dist_llm.parallel.comm.tp_all_reduce` the
model uses. Run one process per GPU:

    mpirun -n 8 python benchmarks/bench_comm.py --output_dir bench_out/comm            # NCCL on GPUs
    mpirun -n 2 python benchmarks/bench_comm.py --device cpu --output_dir /tmp/comm    # gloo on the CPU

On GPUs the paths are timed side by side, NCCL and both one-shot peer-memory kernels of
`parallel/custom_all_reduce.py` (turned on here unless DIST_LLM_CUSTOM_AR=0): "barrier" (`kernels/all_reduce.py`)
and "lamport" (`kernels/lamport_all_reduce.py`, bf16/fp16 only), each eagerly and as GRAPH_CALLS calls captured
in one CUDA graph (how the decode step runs them). Sizes a one-shot kernel takes are also checked: its
result must equal the fp32 rank-order sum of every rank's input bit for bit, and is compared with NCCL's.
`us`/`graph_us` and the bandwidths are the model's path (`tp_all_reduce`: the kernel DIST_LLM_CUSTOM_AR_ALGO
picks, where it fits, else NCCL).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import header, write_json  # noqa: E402

DECODE_BYTES = [8 << 10, 16 << 10, 32 << 10, 64 << 10]  # batch 1-8 × hidden 4096-8192 × bf16
PREFILL_BYTES = [1 << 20, 8 << 20, 64 << 20, 256 << 20]
GRAPH_CALLS = 64  # all-reduces per decode step of a 32-layer model
GRAPH_MAX_BYTES = 1 << 20  # graphs are timed at decode sizes only (prefill runs eagerly)
ONE_SHOT = ("barrier", "lamport")  # custom_all_reduce.ALGOS, in table order


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def eager_us(fn, device: torch.device, iters: int) -> float:
    from dist_llm.parallel import comm

    for _ in range(5):
        fn()
    _sync(device)
    comm.barrier()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / iters * 1e6


def graph_us(fn, iters: int) -> float:
    """µs per call of GRAPH_CALLS calls captured in one CUDA graph and replayed back to back."""
    from dist_llm.parallel import comm

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(GRAPH_CALLS):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    comm.barrier()
    replays = max(3, iters // GRAPH_CALLS)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    del graph
    return start.elapsed_time(end) * 1e3 / (replays * GRAPH_CALLS)


def check_one_shot(numel: int, dtype: torch.dtype, algo: str) -> dict:
    """Random inputs, different on every rank: the one-shot kernel `algo`'s result against the exact
    reference (all inputs gathered, summed in fp32 in rank order) and against NCCL's."""
    import torch.distributed as dist

    from dist_llm.kernels.reference import all_reduce_ref
    from dist_llm.parallel.state import get_state

    s = get_state()
    gen = torch.Generator(device=s.device).manual_seed(1234 + s.mapping.rank)
    x = torch.randn(numel, generator=gen, device=s.device).to(dtype)
    inputs = [torch.empty_like(x) for _ in range(s.mapping.tp_size)]
    dist.all_gather(inputs, x, group=s.tp_group)
    ours, nccl = x.clone(), x.clone()
    s.custom_ar(ours, algo)
    dist.all_reduce(nccl, group=s.tp_group)
    return {
        f"{algo}_exact": bool(torch.equal(ours, all_reduce_ref(inputs))),
        f"{algo}_max_diff_vs_nccl": (ours.float() - nccl.float()).abs().max().item(),
    }


def measure(nbytes: int, dtype: torch.dtype, iters: int) -> dict:
    import torch.distributed as dist

    from dist_llm.parallel import comm
    from dist_llm.parallel.state import get_state

    s = get_state()
    x = torch.zeros(nbytes // dtype.itemsize, dtype=dtype, device=s.device)
    if s.device.type != "cuda":
        return {"bytes": nbytes, "us": eager_us(lambda: comm.tp_all_reduce(x), s.device, iters), "graph_us": None}
    graphs = nbytes <= GRAPH_MAX_BYTES
    row = {"bytes": nbytes}
    paths = {"nccl": lambda: dist.all_reduce(x, group=s.tp_group)}
    for algo in ONE_SHOT if s.custom_ar is not None else ():
        if s.custom_ar.fits(x, algo):  # every rank decides alike: same size, dtype and object
            paths[algo] = lambda algo=algo: s.custom_ar(x, algo)
            row.update(check_one_shot(x.numel(), dtype, algo))
    for name, fn in paths.items():
        row[f"{name}_us"] = eager_us(fn, s.device, iters)
        row[f"{name}_graph_us"] = graph_us(fn, iters) if graphs else None
    # what comm.tp_all_reduce calls for x
    model_path = s.custom_ar.algo if s.custom_ar is not None and s.custom_ar.fits(x) else "nccl"
    row["path"], row["us"], row["graph_us"] = model_path, row[f"{model_path}_us"], row[f"{model_path}_graph_us"]
    return row


def _fmt(v) -> str:
    return "—" if v is None else f"{v:.1f}"


def print_table(rows: list[dict], world: int, info: dict) -> None:
    print(f"# all-reduce over {world} ranks ({info['backend']}, {info['gpu']}), {info['date']}")
    if not any("nccl_us" in r for r in rows):
        print("| bytes | µs per call | algbw GB/s | busbw GB/s |")
        print("| --- | --- | --- | --- |")
        for r in rows:
            print(f"| {r['bytes']:,} | {r['us']:.1f} | {r['algbw_gb_s']:.2f} | {r['busbw_gb_s']:.2f} |")
        return
    print(
        f"µs per call; graph = {GRAPH_CALLS} calls in one CUDA graph; speedup = NCCL / the model's one-shot kernel "
        "in graphs; exact = bit-exact vs the fp32 rank-order sum (barrier, lamport); busbw from the model's path "
        "(graph where timed)"
    )
    print(
        "| bytes | NCCL eager | NCCL graph | barrier eager | barrier graph | Lamport eager | Lamport graph | path "
        "| speedup | exact | busbw GB/s |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    exact = {True: "yes", False: "NO", None: "—"}
    for r in rows:
        a, b = r.get("nccl_graph_us"), r.get(f"{r['path']}_graph_us") if r["path"] != "nccl" else None
        speedup = f"{a / b:.2f}x" if a and b else "—"
        times = " | ".join(f"{_fmt(r.get(f'{k}_us'))} | {_fmt(r.get(f'{k}_graph_us'))}" for k in ("nccl",) + ONE_SHOT)
        checks = ", ".join(exact[r.get(f"{k}_exact")] for k in ONE_SHOT)
        print(f"| {r['bytes']:,} | {times} | {r['path']} | {speedup} | {checks} | {r['busbw_gb_s']:.2f} |")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", required=True)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    p.add_argument("--backend", default="auto", choices=["auto", "nccl", "gloo"])
    p.add_argument("--sizes", type=int, nargs="+", help="bytes (default: decode and prefill sizes)")
    p.add_argument("--iters", type=int, default=200)
    args = p.parse_args()

    from dist_llm.parallel.discovery import discover
    from dist_llm.parallel.state import destroy, get_state, init_distributed

    world = discover().world_size
    os.environ.setdefault("DIST_LLM_CUSTOM_AR", "1")  # on by default at tp=2 only; time both kernels here at any tp
    init_distributed(tp_size=world, pp_size=1, backend=args.backend, device=args.device)
    s = get_state()
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    sizes = args.sizes or (DECODE_BYTES + PREFILL_BYTES if args.device == "cuda" else DECODE_BYTES + [1 << 20])
    rows = []
    for nbytes in sizes:
        row = measure(nbytes, dtype, args.iters if nbytes <= (1 << 20) else max(10, args.iters // 10))
        algbw = nbytes / (row["graph_us"] or row["us"]) / 1e3
        rows.append({**row, "algbw_gb_s": algbw, "busbw_gb_s": algbw * 2 * (world - 1) / world})
    if s.mapping.rank == 0:
        info = {
            **header(),
            "ranks": world,
            "backend": s.backend,
            "one_shot": s.custom_ar.algo if s.custom_ar is not None else None,
            "graph_calls": GRAPH_CALLS,
            "command": "python " + " ".join(sys.argv),
        }
        write_json(args.output_dir, f"comm_{world}ranks_{s.backend}.json", {**info, "rows": rows})
        print_table(rows, world, info)
    destroy()


if __name__ == "__main__":
    main()
