"""Offline throughput with in-flight batching: N requests per (input, output) length, all queued at
once, on a Llama-2-7B-shaped bf16 model with random weights made on the GPU. vLLM's metric names:
output tok/s, req/s, TTFT, TPOT (time per output token after the first) and ITL (inter-token latency).
HF transformers static batching (batch 64, 128/128) runs in the same process as the baseline.

    python benchmarks/bench_throughput.py --output_dir bench_out/throughput [--grid 128/128 128/2048 2048/128 1000/1000]
    # the H100 headline (15,535 output tok/s at 128/128, 2026-12-05): the fp8 KV cache at the default batch 512
    python benchmarks/bench_throughput.py --output_dir OUT --grid 128/128 --num_requests 1000 --kv_cache_dtype fp8
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time

import torch
from tqdm import tqdm

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import (  # noqa: E402
    copy_bandwidth_gbs,
    header,
    hf_generate_tok_s,
    kernel_table,
    print_kernels,
    triton_compiles,
    write_json,
)


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))] if xs else float("nan")


def step_breakdown(log: list[tuple[float, int, int]], t0: float) -> dict:
    """Where a run's wall time went, from the executor's step log [(completion time, prefill tokens, decode
    rows)]: each step is charged the time since the previous completion (with overlap the host waits on the
    GPU, so that is the GPU's time for the step). Steps that carry prefill tokens against decode-only ones."""
    mixed = dict(steps=0, seconds=0.0, prefill_tokens=0, decode_rows=0)
    decode = dict(steps=0, seconds=0.0, decode_rows=0)
    prev = t0
    for t, prefill, rows in log:
        part = mixed if prefill else decode
        part["steps"] += 1
        part["seconds"] += t - prev
        part["decode_rows"] += rows
        if prefill:
            part["prefill_tokens"] += prefill
        prev = t
    for part in (mixed, decode):
        part["ms_per_step"] = 1e3 * part["seconds"] / part["steps"] if part["steps"] else float("nan")
        part["rows_per_step"] = part["decode_rows"] / part["steps"] if part["steps"] else float("nan")
    return {"mixed": mixed, "decode_only": decode}


def gpu_timeline(steps: list[tuple[float, float, bool]]) -> dict:
    """Where the GPU's time went, from the worker's per-step events as [(gap ms, span ms, is_decode)]: the gap
    is the GPU's idle time before the step (the host launched it late), the span the time from the step's first
    work to its last (for an eager step it includes waits for the host's launches). Summed by kind of step."""
    out = {}
    for kind, decode in (("mixed", False), ("decode_only", True)):
        mine = [(g, s) for g, s, d in steps if d == decode]
        out[kind] = {"steps": len(mine), "idle_s": sum(g for g, _ in mine) / 1e3,
                     "busy_s": sum(s for _, s in mine) / 1e3}
    return out


def _timeline_ms(events: list) -> list[tuple[float, float, bool]]:
    torch.cuda.synchronize()
    out, prev = [], None
    for start, end, decode in events:
        out.append((prev.elapsed_time(start) if prev is not None else 0.0, start.elapsed_time(end), decode))
        prev = end
    return out


def run_grid_point(runner, n: int, in_len: int, out_len: int) -> dict:
    ex = runner.executor
    seqs = random_requests(runner, n, in_len, out_len, seed=in_len * 7 + out_len)
    ex.step_log = []
    cuda = ex.worker.device.type == "cuda"
    ex.worker.timeline = [] if cuda else None
    t0 = time.perf_counter()
    for s in seqs:
        s.arrival_time = t0
        ex.enqueue(s)
    with tqdm(total=n * out_len, desc=f"{in_len}/{out_len}", unit="tok", mininterval=2) as bar, \
            triton_compiles() as compiled:
        done = 0
        while ex.has_unfinished():
            ex.step()
            now = sum(s.num_generated for s in seqs)
            bar.update(now - done)
            done = now
    elapsed = time.perf_counter() - t0
    timeline = gpu_timeline(_timeline_ms(ex.worker.timeline)) if cuda else None
    ex.worker.timeline = None
    ttft = [s.first_token_time - s.arrival_time for s in seqs]
    tpot = [(s.token_times[-1] - s.first_token_time) / max(1, len(s.token_times) - 1) for s in seqs]
    itl = [b - a for s in seqs for a, b in zip(s.token_times, s.token_times[1:])]
    steps = step_breakdown(ex.step_log, t0)
    ex.step_log = None
    return {
        "input_len": in_len, "output_len": out_len, "num_requests": n, "elapsed_s": elapsed,
        "output_tok_s": n * out_len / elapsed, "req_s": n / elapsed,
        "ttft_ms_p50": 1e3 * percentile(ttft, 50), "ttft_ms_p99": 1e3 * percentile(ttft, 99),
        "tpot_ms_p50": 1e3 * percentile(tpot, 50), "tpot_ms_p99": 1e3 * percentile(tpot, 99),
        "itl_ms_mean": 1e3 * statistics.fmean(itl) if itl else float("nan"),
        "preemptions": ex.scheduler.num_preemptions, "steps": steps, "gpu_timeline": timeline,
        # kernels compiled (or loaded from Triton's disk cache) inside the timed run: the warm-up should have
        # done them all, else the figure carries compile time
        "triton_compiles": compiled,
    }


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def random_requests(runner, n: int, in_len: int, out_len: int, seed: int) -> list:
    """n requests of distinct random prompts: no two share a KV block (prefix reuse would put one block under all
    of them, and its reads would come from L2 instead of HBM)."""
    from dist_llm.runtime.sequence import SamplingParams, Sequence

    gen = torch.Generator().manual_seed(seed)
    vocab = runner.engine.model.vocab_size
    return [Sequence(torch.randint(3, vocab, (in_len,), generator=gen).tolist(),
                     SamplingParams(max_new_tokens=out_len, ignore_eos=True)) for _ in range(n)]


def profile_full_load(runner, batch: int, in_len: int = 128, steps: int = 5) -> tuple[float, float, list[dict]]:
    """GPU time per decode step with `batch` requests decoding (profiled), the wall time per step of the steps
    just before (not profiled: with overlap it is the GPU's time unless the host falls behind), the coordinator's
    seconds by phase over those steps, and the top kernels."""
    from torch.profiler import ProfilerActivity, profile

    ex = runner.executor
    seqs = random_requests(runner, batch, in_len, 96, seed=1)
    for s in seqs:
        ex.enqueue(s)
    while any(s.num_generated < 8 for s in seqs):  # everyone is past prefill
        ex.step()
    # wall time per step without the profiler (its start-up would be charged to the steps), then the kernels
    host0 = dict(ex.host_seconds)
    t0 = time.perf_counter()
    for _ in range(2 * steps):
        ex.step()
    wall_ms = (time.perf_counter() - t0) * 1e3 / (2 * steps)
    host_ms = {k: (v - host0[k]) * 1e3 / (2 * steps) for k, v in ex.host_seconds.items()}
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            ex.step()
        torch.cuda.synchronize()
    while ex.has_unfinished():
        ex.step()
    rows = kernel_table(prof, steps)
    return sum(r["us_per_step"] for r in rows) / 1e3, wall_ms, host_ms, rows[:15]


def profile_mixed_step(runner, batch: int, max_num_tokens: int, in_len: int = 128) -> dict:
    """One step that carries a full token budget of prefill (max_num_tokens // in_len new prompts) beside the
    decode rows of the other requests, as a 128/128 run's mixed steps do: its wall time (unprofiled, from the
    step log) and, in a second such step under the profiler, its GPU kernels by name."""
    from torch.profiler import ProfilerActivity, profile

    ex = runner.executor
    new = max(1, min(batch - 1, max_num_tokens // in_len))
    out = {"decode_rows": batch - new, "prefill_tokens": new * in_len}
    for trial in ("wall", "profile"):
        base = random_requests(runner, batch - new, in_len, 64, seed=2 if trial == "wall" else 3)
        for s in base:
            ex.enqueue(s)
        while any(s.num_generated < 4 for s in base):
            ex.step()
        fresh = random_requests(runner, new, in_len, 4, seed=4 if trial == "wall" else 5)
        _sync()
        ex.step_log = [(time.perf_counter(), 0, 0)]
        # (the CPU tests profile CPU ops: there is no CUDA activity to record there)
        activity = ProfilerActivity.CUDA if torch.cuda.is_available() else ProfilerActivity.CPU
        prof = profile(activities=[activity]) if trial == "profile" else None
        with prof if prof is not None else contextlib.nullcontext():
            for s in fresh:
                ex.enqueue(s)
            while any(s.num_generated < 1 for s in fresh):
                ex.step()
            _sync()
        log, ex.step_log = ex.step_log, None
        mixed = [(b - a) * 1e3 for (a, _, _), (b, p, _) in zip(log, log[1:]) if p]
        out[f"{trial}_steps"] = [(p, r) for _, p, r in log]
        out[f"{trial}_mixed_ms"] = mixed
        if prof:
            rows = kernel_table(prof, 1)
            out["window_kernels_ms"] = sum(r["us_per_step"] for r in rows) / 1e3
            out["top"] = rows[:14]
        while ex.has_unfinished():
            ex.step()
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", required=True)
    p.add_argument("--model", default="llama-2-7b")
    p.add_argument("--grid", nargs="+", default=["128/128", "128/2048", "2048/128", "1000/1000"])
    p.add_argument("--num_requests", type=int, default=1000)
    # 512: the best of 256/384/448/512 at 128/128 with the fp8 cache on an H100 (2026-12-05: 15,535 output tok/s,
    # against 14,799 at 384 and 13,796 at 256); with a bf16 cache 384 did best (12,712; 12,330 at 512)
    p.add_argument("--max_batch_size", type=int, default=512)
    p.add_argument("--max_num_tokens", type=int, default=8192)
    p.add_argument("--skip_hf", action="store_true")
    p.add_argument("--cuda_graphs", default="on", choices=["off", "on"])
    p.add_argument("--profile", action="store_true", help="also profile decode steps at max_batch_size")
    p.add_argument("--piecewise_graph_max_tokens", type=int, default=512,
                   help="prefill and mixed steps of up to this many tokens replay piecewise CUDA graphs; 0: eager")
    p.add_argument("--capacity_scheduler_policy", default="max_utilization",
                   choices=["max_utilization", "guaranteed_no_evict"])
    p.add_argument("--kv_cache_dtype", default="auto", choices=["auto", "fp8"])
    args = p.parse_args()

    from dist_llm.checkpoint.builder import build_dummy
    from dist_llm.config import BuildConfig
    from dist_llm.runtime import ModelRunner

    info = header()
    bw = copy_bandwidth_gbs()
    hf = None if args.skip_hf else hf_generate_tok_s(args.model, 64, 128, 128)
    engine = build_dummy(args.model, f"{args.output_dir}/engine_{args.model}",
                         BuildConfig(args.max_batch_size, 2048, 4096, args.max_num_tokens, 64), 1, 1, "bfloat16",
                         overwrite=True)
    runner = ModelRunner.from_dir(engine, device="cuda", cuda_graphs=args.cuda_graphs,
                                  capacity_scheduler_policy=args.capacity_scheduler_policy,
                                  kv_cache_dtype=args.kv_cache_dtype,
                                  piecewise_graph_max_tokens=args.piecewise_graph_max_tokens)
    # warm-up: Triton compiles, the first steps' allocations; more prompts than one step's token budget holds,
    # so that it also runs mixed steps (prompt chunks beside decode rows)
    run_grid_point(runner, args.max_num_tokens // 128 + 8, 128, 8)
    rows = []
    for point in args.grid:
        in_len, out_len = map(int, point.split("/"))
        rows.append(run_grid_point(runner, args.num_requests, in_len, out_len))
    num_blocks = runner.executor.block_manager.num_blocks
    # at context ~192, the mean of a 128/128 request's decode steps
    prof = profile_full_load(runner, args.max_batch_size, in_len=176) if args.profile else None
    mixed = profile_mixed_step(runner, args.max_batch_size, args.max_num_tokens) if args.profile else None
    runner.shutdown()
    result = {**info, "model": args.model, "cuda_graphs": args.cuda_graphs, "kv_cache_dtype": args.kv_cache_dtype,
              "piecewise_graph_max_tokens": args.piecewise_graph_max_tokens,
              "copy_gb_s": bw, "hf_static_batch64_128_128_tok_s": hf,
              "kv_blocks": num_blocks, "max_batch_size": args.max_batch_size, "rows": rows, "profile_full_load": prof,
              "profile_mixed_step": mixed,
              "capacity_scheduler_policy": args.capacity_scheduler_policy,
              "command": "python " + " ".join(sys.argv)}
    write_json(args.output_dir, "throughput.json", result)
    print(f"# {info['gpu']}  torch {info['torch']}  {info['date']}; copy {bw:.0f} GB/s; KV blocks {num_blocks}; "
          f"HF static batch 64 128/128: {hf and round(hf)} output tok/s")
    print("| in/out | requests | output tok/s | req/s | TTFT p50/p99 ms | TPOT p50/p99 ms | ITL mean ms | preempt |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['input_len']}/{r['output_len']} | {r['num_requests']} | {r['output_tok_s']:.0f} | "
              f"{r['req_s']:.2f} | {r['ttft_ms_p50']:.0f}/{r['ttft_ms_p99']:.0f} | "
              f"{r['tpot_ms_p50']:.1f}/{r['tpot_ms_p99']:.1f} | {r['itl_ms_mean']:.1f} | {r['preemptions']} |")
    for r in rows:
        m, d = r["steps"]["mixed"], r["steps"]["decode_only"]
        print(f"{r['input_len']}/{r['output_len']}: {m['steps']} steps with prefill, {m['seconds']:.2f} s "
              f"({m['ms_per_step']:.1f} ms each, {m['prefill_tokens'] / max(m['seconds'], 1e-9):.0f} prefill tok/s, "
              f"{m['rows_per_step']:.0f} decode rows); {d['steps']} decode-only steps, {d['seconds']:.2f} s "
              f"({d['ms_per_step']:.2f} ms each at {d['rows_per_step']:.0f} rows)")
        if r["gpu_timeline"]:
            print("  GPU timeline: " + "; ".join(f"{k} steps busy {v['busy_s']:.2f} s, idle before them "
                                                 f"{v['idle_s']:.2f} s" for k, v in r["gpu_timeline"].items()))
        if r["triton_compiles"]:
            print(f"  Triton compiled {len(r['triton_compiles'])} kernels during the timed run: "
                  f"{sorted(set(r['triton_compiles']))}")
    if prof:
        gpu_ms, wall_ms, host_ms, top = prof
        print(f"\ndecode at batch {args.max_batch_size}, context ~192: GPU kernels {gpu_ms:.1f} ms per step, "
              f"wall {wall_ms:.1f} ms (unprofiled); "
              "coordinator ms per step: " + ", ".join(f"{k} {v:.2f}" for k, v in host_ms.items()))
        print_kernels(top)
    if mixed:
        print(f"\na step with {mixed['prefill_tokens']} prefill tokens beside {mixed['decode_rows']} decode rows: "
              f"wall {', '.join(f'{t:.1f}' for t in mixed['wall_mixed_ms'])} ms (unprofiled; steps (prefill, rows): "
              f"{mixed['wall_steps']}); profiled window: GPU kernels {mixed['window_kernels_ms']:.1f} ms, "
              f"mixed steps {', '.join(f'{t:.1f}' for t in mixed['profile_mixed_ms'])} ms")
        print_kernels(mixed["top"])


if __name__ == "__main__":
    main()
