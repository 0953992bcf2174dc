"""Can a step's decode rows and its prompt tokens run side by side on one GPU?

A 128/128 run's decode step is two kinds of work: decode attention, which streams the KV cache (memory-bound), and
the matmuls, which are compute-bound from ~256 rows on. Run one after the other, their sum bounds the step
(docs/performance.md, fifteenth session). The prompt tokens of newly admitted requests do not depend on the decode
rows at all, so their forward could run on a second stream while the decode step (its CUDA graph) runs on the first.
This measures, with synthetic plans on a Llama-2-7B-shaped engine with random weights, the GPU time of:

* the decode graph alone (D rows at context C), the prefill alone (P prompts of L tokens), and both one after the
  other on one stream;
* the current mixed step: one eager forward over the D decode rows and the P prompts together;
* the graph and the prefill on two streams at once, with each stream priority, and with the decode graph's stream
  confined to a green context of N SMs (where this torch has `GreenContext.Stream`).

    python benchmarks/bench_overlap.py --output_dir OUT/overlap [--decode_rows 384] [--context 192] [--prompts 3 6]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import copy_bandwidth_gbs, header, write_json  # noqa: E402


def _plan(rows: list[tuple[int, int, list[int]]], is_decode: bool, num_decode_rows: int, block_size: int):
    """rows: (query tokens, context length, blocks) per sequence; its query tokens are its last positions."""
    from dist_llm.runtime.plan import StepPlan

    positions, slots, tables, cu = [], [], [], [0]
    width = max(len(b) for _, _, b in rows)
    for q, ctx, blocks in rows:
        for p in range(ctx - q, ctx):
            positions.append(p)
            slots.append(blocks[p // block_size] * block_size + p % block_size)
        tables.append(blocks + [0] * (width - len(blocks)))
        cu.append(cu[-1] + q)
    n = len(rows)
    return StepPlan(
        input_ids=torch.randint(3, 300, (len(positions),)),
        positions=torch.tensor(positions),
        slot_mapping=torch.tensor(slots),
        block_tables=torch.tensor(tables, dtype=torch.int32),
        seq_lens=torch.tensor([c for _, c, _ in rows], dtype=torch.int32),
        cu_seqlens_q=torch.tensor(cu, dtype=torch.int32),
        max_seqlen_q=max(q for q, _, _ in rows),
        is_decode=is_decode,
        temperature=torch.zeros(n),
        top_k=torch.zeros(n, dtype=torch.int32),
        top_p=torch.ones(n),
        seeds=torch.arange(n),
        offsets=torch.zeros(n, dtype=torch.int64),
        sampling_mode="greedy",
        num_decode_rows=num_decode_rows,
    )


def sequences(count: int, q: int, ctx: int, block_size: int, first: int) -> tuple[list, int]:
    per = -(-ctx // block_size)
    rows = [(q, ctx, list(range(first + i * per, first + (i + 1) * per))) for i in range(count)]
    return rows, first + count * per


def gpu_ms(fn, iters: int) -> float:
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def side_by_side(worker, decode, prefill, decode_stream, prefill_stream):
    main = torch.cuda.current_stream()

    def run():
        decode_stream.wait_stream(main)
        prefill_stream.wait_stream(main)
        with torch.cuda.stream(decode_stream):
            worker.execute(decode)  # one graph launch: it goes first, the eager prefill's launches follow
        with torch.cuda.stream(prefill_stream):
            worker.execute(prefill)
        main.wait_stream(decode_stream)
        main.wait_stream(prefill_stream)

    return run


def measure(w, dplan, pplan, mplan, iters: int, greens: dict) -> dict:
    """GPU ms of each arrangement. An eager prefill of a few prompts is bound by its host launches when run alone
    (~15 ms for 32 layers): `prefill_gpu_ms` is its share of the one-stream pair, where the graph keeps the GPU busy
    while the host launches it."""
    r = {
        "decode_ms": gpu_ms(lambda: w.execute(dplan), iters),
        "prefill_ms": gpu_ms(lambda: w.execute(pplan), iters),
        "one_stream_ms": gpu_ms(lambda: (w.execute(dplan), w.execute(pplan)), iters),
        "mixed_step_ms": gpu_ms(lambda: w.execute(mplan), iters),
    }
    r["prefill_gpu_ms"] = r["one_stream_ms"] - r["decode_ms"]
    for name, dp, pp in (("equal", 0, 0), ("prefill_first", 0, -1), ("decode_first", -1, 0)):
        ds, ps = torch.cuda.Stream(priority=dp), torch.cuda.Stream(priority=pp)
        r[f"two_streams_{name}_ms"] = gpu_ms(side_by_side(w, dplan, pplan, ds, ps), iters)
    for n, (ctx, stream) in greens.items():
        try:
            if ctx is None:
                raise RuntimeError(stream)
            r[f"green_{n}_ms"] = gpu_ms(side_by_side(w, dplan, pplan, stream, torch.cuda.Stream()), iters)
        except Exception as e:
            r[f"green_{n}_ms"] = f"{type(e).__name__}: {e}"
    return r


def green_stream(num_sms: int):
    try:
        from torch.cuda.green_contexts import GreenContext

        ctx = GreenContext.create(num_sms=num_sms, device_id=torch.cuda.current_device())
        return ctx, ctx.Stream()
    except Exception as e:  # beta API: absent or different in this torch
        return None, f"{type(e).__name__}: {e}"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", required=True)
    p.add_argument("--model", default="llama-2-7b")
    p.add_argument("--decode_rows", type=int, nargs="+", default=[384])
    p.add_argument("--context", type=int, default=192)
    p.add_argument("--prompts", type=int, nargs="+", default=[3, 6])
    p.add_argument("--prompt_len", type=int, default=128)
    p.add_argument("--green_sms", type=int, nargs="*", default=[64, 96])
    p.add_argument("--iters", type=int, default=10)
    args = p.parse_args()

    from dist_llm.checkpoint.builder import build_dummy
    from dist_llm.config import BuildConfig
    from dist_llm.runtime import ModelRunner

    info, bw = header(), copy_bandwidth_gbs()
    max_bs = max(args.decode_rows) + max(args.prompts)
    engine = build_dummy(
        args.model,
        f"{args.output_dir}/engine_{args.model}",
        BuildConfig(max_bs, 2048, 4096, 8192, 64),
        1,
        1,
        "bfloat16",
        overwrite=True,
    )
    runner = ModelRunner.from_dir(engine, device="cuda", cuda_graphs="on")
    w = runner.executor.worker
    bs = 64
    results = []
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    greens = {n: green_stream(n) for n in args.green_sms if n < sms}
    for d in args.decode_rows:
        drows, nxt = sequences(d, 1, args.context, bs, 0)
        for k in args.prompts:
            prows, _ = sequences(k, args.prompt_len, args.prompt_len, bs, nxt)
            r = {"decode_rows": d, "context": args.context, "prompts": k, "prompt_len": args.prompt_len}
            r.update(
                measure(
                    w,
                    _plan(drows, True, 0, bs),
                    _plan(prows, False, 0, bs),
                    _plan(drows + prows, False, d, bs),
                    args.iters,
                    greens,
                )
            )
            results.append(r)
            print(" ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()), flush=True)
    runner.shutdown()
    write_json(args.output_dir, "overlap.json", {**info, "copy_gb_s": bw, "sms": sms, "results": results})
    sys.stdout.flush()
    os._exit(0)  # torch 2.11 tears a green context down before the tensors whose streams were in it, and aborts


if __name__ == "__main__":
    main()
