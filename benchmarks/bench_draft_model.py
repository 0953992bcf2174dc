"""Speculative decoding with a draft model at batch 1 (runtime/draft_model.py): what the draft costs a step, and
what a step gives.

Random weights make every draft model useless as a predictor, so the runs are:
* plain decoding (the reference tokens and tok/s);
* the target as its own draft (a dummy engine of the same preset has the same random weights): every draft is
  kept, 1 + K tokens a step, at the price of K forwards of the full model: the mechanics, end to end;
* small drafts of real draft shapes (llama-68m, TinyLlama-1.1B): their drafts are all wrong on random weights, so
  each step gives one token and costs what a step with K drafts costs, draft and check; from that step time the
  table projects tok/s at acceptance rates a real draft reaches, (1 - a^(K+1)) / (1 - a) tokens a step.
Every run checks that its tokens are the plain run's.

    python benchmarks/bench_draft_model.py --output_dir bench_out/draft [--model llama-2-7b] [--ks 2 4]
"""

from __future__ import annotations

import gc
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import batch1_parser, dummy_engine, header, write_json  # noqa: E402

ACCEPTANCE = (0.5, 0.7, 0.9)


def run(runner, prompt: list[int], new_tokens: int) -> tuple[list[int], float, int, float]:
    """(tokens, decode tok/s after the first token, steps, the draft's ms a step) of one greedy request."""
    from dist_llm.runtime.sequence import SamplingParams, Sequence

    ex = runner.executor
    seq = Sequence(prompt, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True))
    torch.cuda.synchronize()
    steps, draft_s = ex.steps, ex.host_seconds["draft"]
    ex.enqueue(seq)
    while not seq.is_finished:
        ex.step()
    end = time.perf_counter()
    n = ex.steps - steps
    return seq.output_token_ids, (new_tokens - 1) / (end - seq.first_token_time), n, \
        1e3 * (ex.host_seconds["draft"] - draft_s) / n


def measure(engine: str, prompt: list[int], new_tokens: int, spec=None) -> dict:
    from dist_llm.parallel.state import destroy
    from dist_llm.runtime import ModelRunner

    runner = ModelRunner.from_dir(engine, device="cuda", kv_cache_free_gpu_mem_fraction=0.3, speculative_config=spec)
    try:
        ex = runner.executor
        run(runner, prompt, 24)  # warm-up: Triton compiles, the K step sizes' graphs
        before = ex.num_draft_tokens, ex.num_accepted_tokens
        tokens, tok_s, steps, draft_ms = run(runner, prompt, new_tokens)
        row = dict(tokens=tokens, tok_s=tok_s, steps=steps, draft_ms=draft_ms,
                   drafted=ex.num_draft_tokens - before[0], accepted=ex.num_accepted_tokens - before[1])
        runner.shutdown()
    finally:
        destroy()
        gc.collect()
        torch.cuda.empty_cache()
    return row


def main():
    p = batch1_parser(__doc__)
    p.add_argument("--drafts", nargs="+", default=["llama-68m", "tinyllama-1.1b"])
    p.add_argument("--ks", type=int, nargs="+", default=[2, 4])
    p.add_argument("--skip_self", action="store_true", help="leave out the target as its own draft")
    args = p.parse_args()

    from dist_llm.checkpoint.presets import preset_config
    from dist_llm.runtime.speculative import SpeculativeConfig

    info = header()
    engine = dummy_engine(args.model, args.output_dir)
    drafts = {d: dummy_engine(d, args.output_dir, name=f"engine_draft_{d}")
              for d in ([] if args.skip_self else [args.model]) + args.drafts}
    vocab = preset_config(args.model)["vocab_size"]
    prompt = torch.randint(3, vocab, (args.input_len,), generator=torch.Generator().manual_seed(0)).tolist()
    plain = measure(engine, prompt, args.output_len)
    rows = [dict(draft="off (plain decode)", k=0, **plain)]
    for name, path in drafts.items():
        for k in args.ks:
            spec = SpeculativeConfig("draft_model", num_speculative_tokens=k, draft_engine_dir=path)
            r = measure(engine, prompt, args.output_len, spec)
            label = f"{name} (the target itself)" if name == args.model else name
            rows.append(dict(draft=label, k=k, **r))
            print(rows[-1]["draft"], k, f"{r['tok_s']:.1f} tok/s", flush=True)
    for r in rows:
        r["same"] = r.pop("tokens") == plain["tokens"]
        if r["k"] and not r["draft"].endswith("itself)"):  # one token a step: its step time is 1 / tok/s
            k, step_s = r["k"], 1 / r["tok_s"]
            r["projected"] = {a: (1 - a ** (k + 1)) / (1 - a) / step_s for a in ACCEPTANCE}
    write_json(args.output_dir, "draft_model.json", {**info, "model": args.model, "rows": rows,
                                                      "command": "python " + " ".join(sys.argv)})
    print(f"# {info['gpu']}  torch {info['torch']}  {info['date']}; {args.model}, batch 1, {args.input_len} in, "
          f"{args.output_len} out, greedy")
    cols = " | ".join(f"projected tok/s at {a:.0%}" for a in ACCEPTANCE)
    print(f"| draft | K | decode tok/s | x plain | steps | kept / drafted | draft ms a step | {cols} | "
          "tokens = plain |")
    print("| --- " * (8 + len(ACCEPTANCE)) + "|")
    for r in rows:
        proj = " | ".join(f"{v:.0f}" for v in r["projected"].values()) if "projected" in r else \
            " | ".join("—" for _ in ACCEPTANCE)
        print(f"| {r['draft']} | {r['k']} | {r['tok_s']:.1f} | {r['tok_s'] / plain['tok_s']:.2f} | {r['steps']} | "
              f"{r['accepted']} / {r['drafted']} | {r['draft_ms']:.2f} | {proj} | {r['same']} |")


if __name__ == "__main__":
    main()
