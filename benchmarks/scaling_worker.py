"""One tp×pp layout for bench_scaling.py, run under `mpirun -n tp*pp`: every rank loads the dummy-weight
engine; rank 0 warms up, measures batch-1 decode latency and the throughput of each batch size (all of a
batch's requests queued at once, run to completion), writes JSON, then shuts the other ranks down.

    mpirun -n 2 python benchmarks/scaling_worker.py ENGINE OUT.json --batch_sizes 1 8 --input_len 128 --output_len 128
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from dist_llm.runtime import ModelRunner  # noqa: E402
from dist_llm.runtime.sequence import SamplingParams, Sequence  # noqa: E402


def run_batch(runner, batch: int, input_len: int, output_len: int, seed: int) -> dict:
    ex, vocab = runner.executor, runner.engine.model.vocab_size
    gen = torch.Generator().manual_seed(seed)  # a fresh seed per run: no prefix-cache hits between runs
    seqs = [Sequence(torch.randint(3, vocab, (input_len,), generator=gen).tolist(),
                     SamplingParams(max_new_tokens=output_len, ignore_eos=True)) for _ in range(batch)]
    if ex.worker.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for s in seqs:
        s.arrival_time = t0
        ex.enqueue(s)
    while any(not s.is_finished for s in seqs):
        ex.step()
    wall = time.perf_counter() - t0
    assert all(s.num_generated == output_len for s in seqs), [s.finish_reason for s in seqs]
    ttft = [s.first_token_time - t0 for s in seqs]
    decode_s = max(s.token_times[-1] for s in seqs) - max(s.first_token_time for s in seqs)
    return {"batch": batch, "elapsed_s": wall, "output_tok_s": batch * output_len / wall,
            "ttft_ms_mean": 1e3 * sum(ttft) / batch, "ttft_ms_max": 1e3 * max(ttft),
            "decode_ms_per_token": 1e3 * decode_s / max(1, output_len - 1)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("engine_dir")
    p.add_argument("output_json")
    p.add_argument("--device", default="auto")
    p.add_argument("--backend", default="auto")
    p.add_argument("--batch_sizes", type=int, nargs="+", required=True)
    p.add_argument("--input_len", type=int, required=True)
    p.add_argument("--output_len", type=int, required=True)
    p.add_argument("--profile_steps", type=int, default=0, help="also profile this many batch-1 decode steps on "
                   "rank 0: its kernels, and wall and host time per step")
    p.add_argument("--kv_cache_dtype", default="auto", choices=["auto", "fp8"])
    args = p.parse_args()

    t0 = time.perf_counter()
    runner = ModelRunner.from_dir(args.engine_dir, device=args.device, backend=args.backend,
                                  kv_cache_dtype=args.kv_cache_dtype)
    if not runner.is_leader:
        return  # served rank 0's steps until it shut down
    startup_s = time.perf_counter() - t0
    model = runner.executor.worker.model
    rank0_weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())

    for b in sorted({1, max(args.batch_sizes)}):  # warm-up: Triton compiles, allocator settles
        run_batch(runner, b, args.input_len, min(4, args.output_len), seed=10_000 + b)
    latency = run_batch(runner, 1, args.input_len, args.output_len, seed=1)
    rows = [latency if b == 1 else run_batch(runner, b, args.input_len, args.output_len, seed=100 + b)
            for b in args.batch_sizes]
    result = {"startup_s": startup_s, "rank0_weight_bytes": rank0_weight_bytes,
              "num_kv_blocks": runner.executor.block_manager.num_blocks,
              "kv_dtype": str(runner.executor.worker.kv_dtype).removeprefix("torch."),
              "latency": {"decode_ms_per_token": latency["decode_ms_per_token"],
                          "decode_tok_s": 1e3 / latency["decode_ms_per_token"],
                          "ttft_ms": latency["ttft_ms_max"]},
              "throughput": rows}
    if args.profile_steps:
        from common import profile_decode

        result["profile_batch1_rank0"] = profile_decode(runner, args.profile_steps)
    runner.shutdown()
    with open(args.output_json, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
