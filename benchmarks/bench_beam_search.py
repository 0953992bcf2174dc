"""Beam search and n > 1 against greedy, Llama-2-7B-shaped bf16 with random weights: one prompt of 128 tokens,
64 new tokens; wall time of `ModelRunner.generate` and search steps per second. Each beam step is a request
resumed at the beam's end (runtime/beam_search.py), so its cost against a decode step is the point.

    python benchmarks/bench_beam_search.py --output_dir bench_out/beams [--widths 2 4] [--output_len 64]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_latency import build_runner  # noqa: E402
from common import header, write_json  # noqa: E402


def timed(runner, prompt: list[int], new_tokens: int, **kw) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    runner.generate(batch_input_ids=[prompt], max_new_tokens=new_tokens, end_id=-1, **kw)
    return time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--output_dir", required=True)
    p.add_argument("--model", default="llama-2-7b")
    p.add_argument("--input_len", type=int, default=128)
    p.add_argument("--output_len", type=int, default=64)
    p.add_argument("--widths", type=int, nargs="+", default=[2, 4])
    args = p.parse_args()

    info = header()
    runner, startup_s = build_runner(args.model, 8, args.output_dir, "on", True, "auto")
    prompt = torch.randint(3, runner.engine.model.vocab_size, (args.input_len,),
                           generator=torch.Generator().manual_seed(0)).tolist()
    cases = [("greedy", {})] + [(f"n={w}, temperature 1", dict(n=w, temperature=1.0, seed=1)) for w in args.widths]
    cases += [(f"beams={w}", dict(num_beams=w, n=w)) for w in args.widths]
    for _, kw in cases:  # warm-up: compiles, lazily captured graph variants
        timed(runner, prompt, 4, **kw)
    rows = []
    for name, kw in cases:
        s = min(timed(runner, prompt, args.output_len, **kw) for _ in range(2))
        rows.append({"case": name, "seconds": s, "steps_per_s": args.output_len / s})
    runner.shutdown()
    write_json(args.output_dir, "beam_search.json", {**info, "model": args.model, "startup_s": startup_s,
                                                      "input_len": args.input_len, "output_len": args.output_len,
                                                      "rows": rows, "command": "python " + " ".join(sys.argv)})
    print(f"# {info['gpu']}  torch {info['torch']}  triton {info['triton']}  {info['date']}")
    print(f"| case ({args.input_len} in, {args.output_len} out, batch 1) | seconds (best of 2) | steps/s |")
    print("| --- | --- | --- |")
    for r in rows:
        print(f"| {r['case']} | {r['seconds']:.3f} | {r['steps_per_s']:.1f} |")


if __name__ == "__main__":
    main()
