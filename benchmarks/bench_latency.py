"""Decode latency: batch 1 (and 8, 32, 64), 128 tokens in, 256 out, a Llama-2-7B-shaped bf16 model
with random weights made on the GPU. Reports decode tok/s, TTFT and GB/s beside the roofline
(weight + KV bytes read per step / the copy rate measured in this run), and HF transformers eager
`generate` on the same shapes as the baseline.

    python benchmarks/bench_latency.py --output_dir bench_out/latency [--model llama-2-7b] [--batch_sizes 1 8 32 64]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import (  # noqa: E402
    copy_bandwidth_gbs,
    graph_step_us,
    header,
    hf_generate_tok_s,
    print_kernels,
    print_timeline,
    profile_decode,
    write_json,
)


def build_runner(model: str, max_batch: int, tmp: str, cuda_graphs: str, overlap: bool, kv_cache_dtype: str,
                 piecewise_graph_max_tokens: int = 512):
    from dist_llm.checkpoint.builder import build_dummy
    from dist_llm.config import BuildConfig
    from dist_llm.runtime import ModelRunner

    engine = build_dummy(model, f"{tmp}/engine_{model}", BuildConfig(max_batch, 512, 1024, 8192, 64), 1, 1,
                         "bfloat16", overwrite=True)
    t0 = time.perf_counter()
    runner = ModelRunner.from_dir(engine, device="cuda", cuda_graphs=cuda_graphs, overlap=overlap,
                                  kv_cache_dtype=kv_cache_dtype, piecewise_graph_max_tokens=piecewise_graph_max_tokens)
    return runner, time.perf_counter() - t0


def measure(runner, batch: int, prompt_len: int, new_tokens: int, sampling: dict | None = None) -> dict:
    from dist_llm.runtime.sequence import SamplingParams, Sequence

    ex = runner.executor
    vocab = runner.engine.model.vocab_size
    gen = torch.Generator().manual_seed(batch)
    seqs = [Sequence(torch.randint(3, vocab, (prompt_len,), generator=gen).tolist(),
                     SamplingParams(max_new_tokens=new_tokens, ignore_eos=True, **(sampling or {})))
            for _ in range(batch)]
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for s in seqs:
        ex.enqueue(s)
    while any(not s.is_finished for s in seqs):
        ex.step()
    t_end = time.perf_counter()
    ttft = max(s.first_token_time for s in seqs) - t0
    decode_s = t_end - max(s.first_token_time for s in seqs)
    return {"batch": batch, "ttft_ms": ttft * 1e3, "decode_s": decode_s,
            "decode_tok_s_per_seq": (new_tokens - 1) / decode_s, "decode_tok_s": batch * (new_tokens - 1) / decode_s}


def weight_bytes(runner) -> int:
    return sum(p.numel() * p.element_size() for p in runner.executor.worker.model.parameters())


def kv_bytes_per_step(runner, batch: int, context: int) -> int:
    w = runner.executor.worker
    return w.kv_bytes_per_block() // w.engine.build.tokens_per_block * context * batch


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", required=True)
    p.add_argument("--model", default="llama-2-7b")
    p.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 8, 32, 64])
    p.add_argument("--input_len", type=int, default=128)
    p.add_argument("--output_len", type=int, default=256)
    p.add_argument("--skip_hf", action="store_true")
    p.add_argument("--cuda_graphs", default="on", choices=["off", "on"])
    p.add_argument("--enforce_eager", action="store_true", help="the same as --cuda_graphs off")
    p.add_argument("--disable_overlap_scheduler", action="store_true")
    p.add_argument("--piecewise_graph_max_tokens", type=int, default=512,
                   help="prompts of up to this many tokens replay piecewise CUDA graphs (TTFT); 0: eager prefill")
    p.add_argument("--repeats", type=int, default=3,
                   help="runs per batch size; the table gives the median run, the JSON every run")
    p.add_argument("--kv_cache_dtype", default="auto", choices=["auto", "fp8"],
                   help="fp8: the roofline counts its KV bytes (1 per element)")
    p.add_argument("--sampling", type=json.loads, default={},
                   help='more SamplingParams fields for the timed requests, as JSON: e.g. '
                   '\'{"repetition_penalty": 1.1, "presence_penalty": 0.5}\' (the cost of logits processing)')
    args = p.parse_args()
    if args.enforce_eager:
        args.cuda_graphs = "off"

    gemv = os.environ.get("DIST_LLM_GEMV", "1") != "0"
    tag = f"graphs_{args.cuda_graphs}" + ("" if gemv else "_cublas")
    tag += "_sync" if args.disable_overlap_scheduler else ""
    pdl = os.environ.get("DIST_LLM_PDL", "1") != "0"
    tag += "" if pdl else "_nopdl"
    tag += "_kvfp8" if args.kv_cache_dtype == "fp8" else ""
    tag += "_eagerprefill" if args.piecewise_graph_max_tokens == 0 and args.cuda_graphs == "on" else ""
    tag += "_sampling" if args.sampling else ""

    info = header()
    bw = copy_bandwidth_gbs()
    hf = None if args.skip_hf else hf_generate_tok_s(args.model, 1, args.input_len, args.output_len)
    runner, startup_s = build_runner(args.model, max(args.batch_sizes), args.output_dir, args.cuda_graphs,
                                     not args.disable_overlap_scheduler, args.kv_cache_dtype,
                                     args.piecewise_graph_max_tokens)
    wbytes = weight_bytes(runner)
    measure(runner, 1, args.input_len, 16)  # warm-up: Triton compiles
    for b in args.batch_sizes if args.sampling else ():  # and the graphs that stop at the logits, per bucket
        measure(runner, b, args.input_len, 4, args.sampling)
    rows = []
    for b in args.batch_sizes:
        runs = sorted((measure(runner, b, args.input_len, args.output_len, args.sampling)
                       for _ in range(max(1, args.repeats))), key=lambda x: x["decode_s"])
        r = dict(runs[len(runs) // 2])
        r["runs_tok_s_per_seq"] = [x["decode_tok_s_per_seq"] for x in runs]
        avg_ctx = args.input_len + args.output_len // 2
        step_bytes = wbytes + kv_bytes_per_step(runner, b, avg_ctx)
        step_s = r["decode_s"] / (args.output_len - 1)
        r["gb_s"], r["step_bytes"] = step_bytes / step_s / 1e9, step_bytes
        rows.append(r)
    try:  # the ceiling is the better of two readings, before and after: never flattered
        bw_after = copy_bandwidth_gbs()
    except torch.cuda.OutOfMemoryError:  # the KV pool took the memory: keep the first reading
        bw_after = 0.0
    bw_readings, bw = (bw, bw_after), max(bw, bw_after)
    for r in rows:
        r["roofline_tok_s_per_seq"] = bw * 1e9 / r["step_bytes"]
        r["pct_roofline"] = 100 * r["decode_tok_s_per_seq"] / r["roofline_tok_s_per_seq"]
    profiled = profile_decode(runner)
    prof, timeline = profiled["kernels"], profiled["timeline"]
    graph_us = graph_step_us(runner)
    gpu_us = sum(k["us_per_step"] for k in prof)
    runner.shutdown()
    result = {**info, "model": args.model, "cuda_graphs": args.cuda_graphs, "decode_gemv": gemv, "pdl": pdl,
              "piecewise_graph_max_tokens": args.piecewise_graph_max_tokens,
              "overlap": not args.disable_overlap_scheduler, "sampling": args.sampling,
              "gpu_us_per_step_batch1": gpu_us,
              "copy_gb_s": bw, "copy_gb_s_readings": bw_readings, "weight_gb": wbytes / 1e9, "startup_s": startup_s,
              "hf_eager_tok_s": hf, "rows": rows, "profile_batch1": prof,
              "timeline_batch1": timeline, "graph_step_us_batch1": graph_us,
              "command": "python " + " ".join(sys.argv)}
    write_json(args.output_dir, f"latency_{tag}.json", result)
    print(f"# {info['gpu']}  torch {info['torch']}  triton {info['triton']}  {info['date']}")
    print(f"{tag}: cuda_graphs {args.cuda_graphs}, Triton GEMV {gemv}, PDL {pdl}, "
          f"overlap {not args.disable_overlap_scheduler}; "
          f"copy {bw:.0f} GB/s (better of {bw_readings[0]:.0f}, {bw_readings[1]:.0f}); "
          f"weights {wbytes / 1e9:.2f} GB; start-up {startup_s:.1f} s; "
          f"HF eager batch 1: {hf and round(hf, 1)} tok/s")
    print(f"| batch | decode tok/s/seq (median of {args.repeats}; all runs) | total tok/s | TTFT ms | GB/s | "
          "% of copy roofline |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        runs = ", ".join(f"{x:.1f}" for x in r["runs_tok_s_per_seq"])
        print(f"| {r['batch']} | {r['decode_tok_s_per_seq']:.1f} ({runs}) | {r['decode_tok_s']:.0f} | "
              f"{r['ttft_ms']:.1f} | {r['gb_s']:.0f} | {r['pct_roofline']:.1f}% "
              f"(roofline {r['roofline_tok_s_per_seq']:.0f}) |")
    step_us = 1e6 / rows[0]["decode_tok_s_per_seq"] if rows[0]["batch"] == 1 else float("nan")
    caveat = " (with PDL a kernel's time includes its wait for the one before: times overlap)" if pdl else ""
    print(f"\nbatch 1: GPU kernel time {gpu_us:.0f} us per step of {step_us:.0f} us{caveat}; top kernels:")
    print_kernels(prof[:15])
    if timeline["span_us_per_step"]:
        print_timeline(timeline)
    if graph_us:
        print(f"batch-1 graph replayed back to back: {graph_us['replay_us']:.1f} us/step alone, "
              f"{graph_us['copies_replay_us']:.1f} with the step's two copies; the decode loop: {step_us:.1f}")


if __name__ == "__main__":
    main()
