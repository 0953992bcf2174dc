"""The control plane's rate: rank 0 broadcasts decode step plans (`comm.broadcast_object`, gloo on CPU
tensors) as fast as it can and the other ranks receive them, as `serve_worker` does every step. A rank
that takes longer to receive a plan than the GPU takes to run a step starves its GPU, so this per-plan
time is a floor under every multi-rank decode step. Runs on the CPU; launch it like the model:

    mpirun -n 2 --bind-to none python benchmarks/bench_control_plane.py --output_dir bench_out/control
"""

from __future__ import annotations

import argparse
import pickle
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import header, write_json  # noqa: E402


def decode_plan(batch: int, blocks: int):
    from dist_llm.runtime.plan import StepPlan

    ints = lambda dt: torch.arange(batch, dtype=dt)  # noqa: E731
    return StepPlan(
        input_ids=ints(torch.int64), positions=ints(torch.int64), slot_mapping=ints(torch.int64),
        block_tables=torch.arange(batch * blocks, dtype=torch.int32).view(batch, blocks), seq_lens=ints(torch.int32),
        cu_seqlens_q=torch.arange(batch + 1, dtype=torch.int32), max_seqlen_q=1, is_decode=True,
        temperature=torch.zeros(batch), top_k=ints(torch.int32), top_p=torch.ones(batch), seeds=ints(torch.int64),
        offsets=ints(torch.int64), sampling_mode="greedy", prev_index=ints(torch.int64),
    )  # fmt: skip


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", required=True)
    p.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 64, 256])
    p.add_argument("--blocks", type=int, default=64, help="block-table width (4,096 tokens of 64)")
    p.add_argument("--plans", type=int, default=1000)
    args = p.parse_args()

    from dist_llm.parallel import comm
    from dist_llm.parallel.discovery import discover
    from dist_llm.parallel.state import destroy, get_state, init_distributed

    init_distributed(tp_size=discover().world_size, pp_size=1, backend="gloo", device="cpu")
    rank = get_state().mapping.rank
    rows = []
    for batch in args.batch_sizes:
        plan = decode_plan(batch, args.blocks)
        t0 = time.perf_counter()
        for _ in range(50):
            blob = pickle.dumps(plan)
            pickle.loads(blob)
        pickle_us = (time.perf_counter() - t0) / 50 * 1e6
        comm.barrier()
        t0 = time.perf_counter()
        for _ in range(args.plans):
            comm.broadcast_object(plan if rank == 0 else None)
        if rank == 0:
            comm.flush_broadcasts()
        comm.barrier()
        rows.append({"batch": batch, "bytes": len(blob), "pickle_round_trip_us": pickle_us,
                     "us_per_plan": (time.perf_counter() - t0) / args.plans * 1e6})
    if rank == 0:
        info = {**header(), "ranks": get_state().mapping.world_size, "command": "python " + " ".join(sys.argv)}
        write_json(args.output_dir, "control_plane.json", {**info, "rows": rows})
        print(f"# control plane, {info['ranks']} ranks, gloo; {info['date']}")
        print("| batch | plan bytes | pickle + unpickle µs | µs per plan, broadcast to every rank |")
        print("| --- | --- | --- | --- |")
        for r in rows:
            print(f"| {r['batch']} | {r['bytes']:,} | {r['pickle_round_trip_us']:.0f} | {r['us_per_plan']:.0f} |")
    destroy()


if __name__ == "__main__":
    main()
