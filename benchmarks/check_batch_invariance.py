"""How far greedy decoding of a random-weight model agrees with itself when only the kernels' path changes.

The same prompt is decoded alone twice (the second time its prompt blocks come from the prefix cache, so its last
prompt token goes through the decode kernels instead of the prefill ones), then beside one and four other prompts
(batch 2 and 5). Each run reports the first output position where its tokens part from the first run's. Then the
gap between the two most likely tokens' log-probabilities over 64 steps: where it is near zero, any rounding
difference (another batch shape, a speculative verification chunk) can flip the argmax. On random bf16 weights the
logits are flat, so such near-ties are common and comparisons of token streams across paths are not meaningful;
a trained model's margins are wider.

    python benchmarks/check_batch_invariance.py --output_dir bench_out/invariance [--model llama-2-7b]
"""

from __future__ import annotations

import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import batch1_parser, dummy_engine, header, write_json  # noqa: E402


def main():
    args = batch1_parser(__doc__).parse_args()

    from dist_llm.checkpoint.presets import preset_config
    from dist_llm.runtime import ModelRunner
    from dist_llm.runtime.sequence import SamplingParams, Sequence

    info = header()
    engine = dummy_engine(args.model, args.output_dir)
    runner = ModelRunner.from_dir(engine, device="cuda", kv_cache_free_gpu_mem_fraction=0.3)
    ex, gen = runner.executor, torch.Generator().manual_seed(0)
    vocab = preset_config(args.model)["vocab_size"]
    prompt, other = (torch.randint(3, vocab, (args.input_len,), generator=gen).tolist() for _ in range(2))

    def decode(prompts, **kw) -> Sequence:
        seqs = [Sequence(x, SamplingParams(max_new_tokens=args.output_len, ignore_eos=True, **kw)) for x in prompts]
        for s in seqs:
            ex.enqueue(s)
        while ex.has_unfinished():
            ex.step()
        return seqs[0]

    def parts(a: list[int], b: list[int]) -> int | None:
        return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)

    first = decode([prompt]).output_token_ids
    rows = {"alone again (prompt from the prefix cache)": parts(first, decode([prompt]).output_token_ids),
            "beside 1 other prompt": parts(first, decode([prompt, other]).output_token_ids),
            "beside 4 other prompts": parts(first, decode([prompt] + [other] * 4).output_token_ids)}
    seq = decode([prompt], return_logprobs=True, top_logprobs=2)
    gaps = sorted(top[0][1] - top[1][1] for top in seq.top_logprobs[:64])
    runner.shutdown()
    result = {**info, "model": args.model, "first_difference": rows, "top2_gap_median": gaps[len(gaps) // 2],
              "top2_gap_min": gaps[0], "top2_gaps_below_0.01": sum(g < 0.01 for g in gaps),
              "command": "python " + " ".join(sys.argv)}
    write_json(args.output_dir, "batch_invariance.json", result)
    print(f"# {info['gpu']}  {info['date']}; {args.model} bf16 random weights, greedy, {args.output_len} tokens")
    for name, at in rows.items():
        print(f"{name}: {'the same tokens' if at is None else f'first different token at output position {at}'}")
    print(f"top-2 log-prob gap over 64 steps: median {gaps[len(gaps) // 2]:.4f}, min {gaps[0]:.5f}, "
          f"{result['top2_gaps_below_0.01']} below 0.01")


if __name__ == "__main__":
    main()
