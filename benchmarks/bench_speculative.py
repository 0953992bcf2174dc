"""Speculative decoding at batch 1 (runtime/speculative.py): what a step that checks K drafts costs, and what it
gives at a known acceptance.

A random-weight model's text says nothing about how often real text repeats its context, so the drafts here are
made to measure: after a plain greedy run (the reference tokens and the plain tok/s), each K is run with
* "right" drafts: the next K reference tokens (every draft accepted: the ceiling, 1 + K tokens a step);
* "half" drafts: the next K with the one at K // 2 wrong (K // 2 + 1 tokens a step);
* "wrong" drafts: every draft wrong (one token a step: what speculation costs when the lookup misleads);
and once with the n-gram lookup itself on the random model's own text (acceptance as it comes). Every run checks
that its tokens are the reference tokens. A made-to-measure run never backs off after a step that keeps no draft,
so each of its steps checks K drafts: the "wrong" rows price the verification step.

On random bf16 weights the logits are flat and near-ties common, so a verification chunk, whose kernels round
otherwise than a one-row decode step, soon picks the other token of a tie; from there the reference's drafts are
for another text and are rejected (H200, 2026-12-07: "right" kept almost none). `check_batch_invariance.py` shows
the same flips between plain runs; `bench_draft_model.py` with the target as its own draft follows the run's own
text instead.

    python benchmarks/bench_speculative.py --output_dir bench_out/spec [--model llama-2-7b] [--ks 1 2 4 8]
"""

from __future__ import annotations

import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import batch1_parser, dummy_engine, header, write_json  # noqa: E402


def run(runner, prompt: list[int], new_tokens: int, propose=None, spec=None) -> tuple[list[int], float, int]:
    """(tokens, decode tok/s after the first token, steps) of one greedy request; `propose` gives the drafts, None:
    speculation off (overlap scheduling on)."""
    from dist_llm.runtime.sequence import SamplingParams, Sequence

    ex = runner.executor
    ex.speculative, ex.scheduler.propose = (spec, propose) if propose is not None else (None, None)
    seq = Sequence(prompt, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True))
    torch.cuda.synchronize()
    steps = ex.steps
    ex.enqueue(seq)
    while not seq.is_finished:
        ex.step()
    end = time.perf_counter()
    return seq.output_token_ids, (new_tokens - 1) / (end - seq.first_token_time), ex.steps - steps


def made_drafts(truth: list[int], prompt_len: int, k: int, kind: str):
    def propose(seq):
        done = len(seq) - prompt_len
        drafts = list(truth[done : done + k])
        for j in range(len(drafts)):
            if kind == "wrong" or (kind == "half" and j == k // 2):
                drafts[j] = (drafts[j] + 1) % 32000
        return drafts
    return propose


def main():
    p = batch1_parser(__doc__)
    p.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8])
    args = p.parse_args()

    from dist_llm.runtime import ModelRunner
    from dist_llm.runtime.speculative import SpeculativeConfig

    info = header()
    engine = dummy_engine(args.model, args.output_dir, max_num_tokens=8192)
    runner = ModelRunner.from_dir(engine, device="cuda",
                                  speculative_config=SpeculativeConfig(num_speculative_tokens=max(args.ks)))
    ex, ngram, spec = runner.executor, runner.executor.scheduler.propose, runner.executor.speculative
    prompt = torch.randint(3, runner.engine.model.vocab_size, (args.input_len,),
                           generator=torch.Generator().manual_seed(0)).tolist()
    run(runner, prompt, 16)  # warm-up: Triton compiles
    truth, plain_tok_s, plain_steps = run(runner, prompt, args.output_len)
    rows = [dict(k=0, drafts="off (plain decode)", tok_s=plain_tok_s, steps=plain_steps, same=True)]
    tokens, tok_s, steps = run(runner, prompt, args.output_len, lambda s: [], spec)
    rows.append(dict(k=0, drafts="on, none found, no back-off (no overlap)", tok_s=tok_s, steps=steps,
                     same=tokens == truth))

    def missing(seq):  # every lookup misses, and the request backs off as after real misses
        type(ex)._missed(seq)
        return []

    tokens, tok_s, steps = run(runner, prompt, args.output_len, missing, spec)
    rows.append(dict(k=0, drafts="on, every lookup misses (backs off)", tok_s=tok_s, steps=steps,
                     same=tokens == truth))
    ex._missed = lambda seq: None  # made-to-measure drafts: every step checks K of them, however many it keeps
    for k in args.ks:
        for kind in ("right", "half", "wrong"):
            drafts = made_drafts(truth, args.input_len, k, kind)
            run(runner, prompt, 16, drafts, spec)  # (this K's step sizes compile)
            tokens, tok_s, steps = run(runner, prompt, args.output_len, drafts, spec)
            rows.append(dict(k=k, drafts=kind, tok_s=tok_s, steps=steps, same=tokens == truth))
    del ex._missed  # (the n-gram run backs off as it does in use)
    before = (ex.num_draft_tokens, ex.num_accepted_tokens)
    spec4 = SpeculativeConfig(num_speculative_tokens=4)
    ex.speculative = spec4  # (what the n-gram proposer reads)
    tokens, tok_s, steps = run(runner, prompt, args.output_len, ngram, spec4)
    drafted, accepted = ex.num_draft_tokens - before[0], ex.num_accepted_tokens - before[1]
    rows.append(dict(k=4, drafts=f"ngram ({accepted}/{drafted} accepted)", tok_s=tok_s, steps=steps,
                     same=tokens == truth))
    runner.shutdown()
    write_json(args.output_dir, "speculative.json", {**info, "model": args.model, "rows": rows,
                                                      "command": "python " + " ".join(sys.argv)})
    print(f"# {info['gpu']}  torch {info['torch']}  {info['date']}; batch 1, {args.input_len} in, "
          f"{args.output_len} out, greedy")
    print("| K | drafts | decode tok/s | steps | x plain | tokens = plain |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['k']} | {r['drafts']} | {r['tok_s']:.1f} | {r['steps']} | {r['tok_s'] / plain_tok_s:.2f} | "
              f"{r['same']} |")


if __name__ == "__main__":
    main()
