"""The host's launch time and the GPU's time of one prefill or mixed step, eager against piecewise CUDA graphs.

An eager step launches every kernel of every layer from Python; a piecewise step replays one graph per layer and
launches only the attention kernels between them (`runtime/piecewise_graphs.py`). For synthetic plans on a
Llama-2-7B-shaped engine with random weights, each way, this reports:

* host ms: the time `Worker.execute` takes to return while the GPU is still busy with earlier work (a sleep
  kernel queued first), so it is the launch cost alone;
* GPU ms: CUDA events around that step, which ran with no host gaps (all of it queued behind the sleep);
* wall ms: steps back to back, as a serving loop runs them: the larger of the two, plus what does not overlap;
* the greedy tokens against the eager step's, and against the same bucket-padded forward run eagerly ("static"):
  padding a step to its bucket changes the matmuls' row count, and cuBLAS may then round otherwise; where a token
  differs, the eager logits' top-2 margin at that row says whether it was a near-tie.

    python benchmarks/bench_step_host.py --output_dir OUT/step_host
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_overlap import _plan, sequences  # noqa: E402
from common import header, write_json  # noqa: E402

# name: (decode rows at context 192, prompts, prompt length)
SHAPES = {
    "prefill 1x128": (0, 1, 128),
    "prefill 4x128": (0, 4, 128),
    "prefill 1x512": (0, 1, 512),
    "mixed 16 + 1x128": (16, 1, 128),
    "mixed 64 + 1x128": (64, 1, 128),
    "mixed 255 + 1x128": (255, 1, 128),  # a full batch: the engine takes 256 rows
}


def shape_plan(decode_rows: int, prompts: int, length: int, block_size: int):
    drows, nxt = sequences(decode_rows, 1, 192, block_size, 0)
    prows, _ = sequences(prompts, length, length, block_size, nxt)
    return _plan(drows + prows, False, decode_rows, block_size)


def time_step(worker, plan, iters: int, sleep_cycles: int) -> dict:
    host, gpu = [], []
    for i in range(iters + 2):
        torch.cuda.synchronize()
        torch.cuda._sleep(sleep_cycles)  # the GPU is busy while the host launches the step
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        t0 = time.perf_counter()
        result = worker.execute(plan)
        t1 = time.perf_counter()
        end.record()
        torch.cuda.synchronize()
        if i >= 2:  # two warm-up steps
            host.append(1e3 * (t1 - t0))
            gpu.append(start.elapsed_time(end))
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        result = worker.execute(plan)
    torch.cuda.synchronize()
    wall = 1e3 * (time.perf_counter() - t0) / iters
    result.wait()
    return {"host_ms": sorted(host)[len(host) // 2], "gpu_ms": sorted(gpu)[len(gpu) // 2], "wall_ms": wall,
            "tokens": result.token_ids.tolist()}


def compare(worker, plan, static_runner) -> dict:
    """Greedy tokens and logits of one step: eager, piecewise graphs, and the graphs' padded forward run eagerly."""
    from dataclasses import replace

    plan = replace(plan, return_logits=True)
    saved = worker.piecewise_runner
    out = {}
    for name, runner in (("eager", None), ("static", static_runner), ("graphs", saved)):
        worker.piecewise_runner = runner
        r = worker.execute(plan)
        r.wait()
        out[name] = (r.token_ids.clone(), r.logits.clone())
    worker.piecewise_runner = saved
    (et, el), (st, sl), (gt, gl) = out["eager"], out["static"], out["graphs"]
    top2 = el.topk(2, dim=-1).values
    differ = (et != gt).nonzero().flatten().tolist()
    return {"differ_eager": len(differ), "differ_static": int((st != gt).sum()),
            "max_logit_diff_eager": float((el - gl).abs().max()), "max_logit_diff_static": float((sl - gl).abs().max()),
            "eager_top2_margin_where_differ": [float(top2[i, 0] - top2[i, 1]) for i in differ],
            "rows": len(et)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", required=True)
    p.add_argument("--model", default="llama-2-7b")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--num_kv_blocks", type=int, default=1024)
    p.add_argument("--sleep_ms", type=float, default=40.0, help="the GPU's head start, in ms at ~1.7 GHz")
    args = p.parse_args()

    from dist_llm.checkpoint.builder import build_dummy
    from dist_llm.config import BuildConfig
    from dist_llm.runtime import ModelRunner

    info = header()
    engine = build_dummy(args.model, f"{args.output_dir}/engine_{args.model}", BuildConfig(256, 2048, 4096, 8192, 64),
                         1, 1, "bfloat16", overwrite=True)
    runner = ModelRunner.from_dir(engine, device="cuda", cuda_graphs="on", num_kv_blocks=args.num_kv_blocks)
    w = runner.executor.worker
    piecewise = w.piecewise_runner
    from dist_llm.runtime.piecewise_graphs import PiecewiseGraphRunner

    static = PiecewiseGraphRunner(w, "static", piecewise.max_tokens)
    cycles = int(args.sleep_ms * 1.7e6)
    rows = []
    for name, shape in SHAPES.items():
        plan = shape_plan(*shape, runner.engine.build.tokens_per_block)
        w.piecewise_runner = None
        eager = time_step(w, plan, args.iters, cycles)
        w.piecewise_runner = piecewise
        graphs = time_step(w, plan, args.iters, cycles)
        rows.append({"shape": name, "tokens": plan.num_tokens, "eager": eager, "piecewise": graphs,
                     "same_tokens": eager.pop("tokens") == graphs.pop("tokens"), **compare(w, plan, static)})
    runner.shutdown()
    write_json(args.output_dir, "step_host.json", {**info, "rows": rows, "command": "python " + " ".join(sys.argv)})
    print(f"# {info['gpu']}  torch {info['torch']}  triton {info['triton']}  {info['date']}")
    print("| step | tokens | eager: host / GPU / wall ms | piecewise graphs: host / GPU / wall ms | tokens differing "
          "from eager / from static (rows) | max logit diff from eager / static | eager top-2 margin there |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        e, g = r["eager"], r["piecewise"]
        print(f"| {r['shape']} | {r['tokens']} | {e['host_ms']:.2f} / {e['gpu_ms']:.2f} / {e['wall_ms']:.2f} | "
              f"{g['host_ms']:.2f} / {g['gpu_ms']:.2f} / {g['wall_ms']:.2f} | "
              f"{r['differ_eager']} / {r['differ_static']} ({r['rows']}) | "
              f"{r['max_logit_diff_eager']:.3f} / {r['max_logit_diff_static']:.3f} | "
              f"{', '.join(f'{m:.4f}' for m in r['eager_top2_margin_where_differ']) or '-'} |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
