"""python -m dist_llm.run: generate with an engine, on one process or under `mpirun -n tp*pp`.

Rank 0 tokenizes, schedules, prints and writes --output_json; the other ranks serve it.
"""

from __future__ import annotations

import argparse
import json
import os

from dist_llm.cli import run_main


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m dist_llm.run", description=__doc__)
    p.add_argument("--engine_dir", required=True)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input_text", nargs="+", help="one or more prompts")
    src.add_argument("--input_file", help="one prompt per line, or JSONL with a 'prompt' (and 'priority') field")
    src.add_argument("--input_ids", nargs="+", help="prompts as comma-separated token ids, e.g. 1,15043,29892")
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--num_return_sequences", "--n", dest="n", type=int, default=1,
                   help="sequences sampled per prompt, sharing its KV; with --seed S, sequence j uses seed S + j")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (the default) is greedy")
    p.add_argument("--num_beams", type=int, default=1,
                   help="beam search of this width (greedy; transformers' rules); --n of its best come back")
    p.add_argument("--length_penalty", type=float, default=1.0, help="beam score = sum of log-probs / length ** this")
    p.add_argument("--early_stopping", default="false", choices=["false", "true", "never"],
                   help="beam search: stop once num_beams hypotheses are done (true), by a heuristic (false) or never")
    p.add_argument("--top_k", type=int, default=0)
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--min_p", type=float, default=0.0,
                   help="keep tokens at least this fraction as likely as the likeliest (0..1; 0: off)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", nargs="*", default=[], help="stop strings")
    p.add_argument("--end_id", type=int, default=None, help="override EOS id (-1: never stop on EOS)")
    p.add_argument("--stop_token_ids", type=int, nargs="*", default=[], help="more token ids that end a request")
    p.add_argument("--repetition_penalty", type=float, default=1.0,
                   help="> 1 discourages tokens already in the prompt or output (transformers' meaning; 1: off)")
    p.add_argument("--presence_penalty", type=float, default=0.0, help="OpenAI's, over output tokens (-2..2; 0: off)")
    p.add_argument("--frequency_penalty", type=float, default=0.0, help="OpenAI's, over output tokens (-2..2; 0: off)")
    p.add_argument("--min_tokens", type=int, default=0, help="no stop token or stop string before this many tokens")
    p.add_argument("--logit_bias", type=json.loads, default={},
                   help="added to the logits of token ids, as JSON, e.g. '{\"17\": 2.5, \"42\": -100}' (OpenAI's)")
    p.add_argument("--bad_words_ids", type=json.loads, default=[],
                   help="token sequences never to generate, as JSON, e.g. '[[15043], [450, 29892]]' (transformers')")
    p.add_argument("--return_logprobs", action="store_true",
                   help="the log-probability of each output token (in --output_json: logprobs)")
    p.add_argument("--top_logprobs", type=int, default=0,
                   help="with --return_logprobs, also each step's k most likely [id, log-prob] pairs (0..20)")
    p.add_argument("--prompt_logprobs", action="store_true",
                   help="the log-probability of each prompt token given the ones before (in --output_json)")
    p.add_argument("--pad_id", type=int, default=None,
                   help="also write padded_output_token_ids: max_new_tokens ids, padded with this id")
    p.add_argument("--output_json", help="write [{input_text, output_text, output_token_ids, finish_reason}] (and "
                   "padded_output_token_ids, logprobs, top_logprobs, sequence_index when asked for), n per prompt")
    p.add_argument("--output_first_logits", help="debugging: save the first-step logits [batch, vocab] (torch.save)")
    p.add_argument("--backend", default="auto", choices=["auto", "nccl", "gloo"], help="auto: NCCL on GPU, gloo on CPU")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--attention_backend", "--kernel_backend", dest="kernel_backend", default="auto",
                   choices=["auto", "triton", "torch"], help="auto: Triton on GPU, torch on CPU")
    p.add_argument("--tokenizer_dir", help="tokenizer files (default: the engine directory)")
    p.add_argument("--kv_cache_free_gpu_mem_fraction", type=float, default=0.9)
    p.add_argument("--num_kv_blocks", type=int, default=None, help="KV pool size in blocks (default: from memory)")
    p.add_argument("--kv_cache_dtype", default="auto", choices=["auto", "fp8"],
                   help="auto: the model's dtype; fp8: e4m3 with scales of 1.0, half the KV bytes (GPU: sm_89+)")
    p.add_argument("--cuda_graphs", default="auto", choices=["auto", "off", "on", "static"],
                   help="replay decode steps from CUDA graphs; auto: on with a GPU (and NCCL), off otherwise; "
                   "static: their static-buffer path run eagerly (testing)")
    p.add_argument("--enforce_eager", action="store_true", help="no CUDA graphs (the same as --cuda_graphs off)")
    p.add_argument("--piecewise_graph_max_tokens", type=int, default=512,
                   help="with graphs on, prefill and mixed steps of up to this many tokens replay CUDA graphs cut at "
                   "attention (their host launch is ~10x shorter); 0: they run eagerly")
    p.add_argument("--disable_overlap_scheduler", action="store_true",
                   help="wait for each step's tokens before scheduling the next (debugging)")
    p.add_argument("--capacity_scheduler_policy", default="max_utilization",
                   choices=["max_utilization", "guaranteed_no_evict"],
                   help="max_utilization: admit what fits now and preempt when blocks run out; guaranteed_no_evict: "
                   "admit a request only if it and every running request can reach max_new_tokens")
    p.add_argument("--scheduling_policy", default="fcfs", choices=["fcfs", "priority"],
                   help="fcfs: arrival order; priority: --input_file JSONL's 'priority' field, lower first")
    p.add_argument("--speculative_method", choices=["ngram", "draft_model"], default=None,
                   help="speculative decoding: ngram drafts the tokens that followed the last "
                   "occurrence of the newest n tokens; draft_model drafts with a small model (--draft_engine_dir). "
                   "One step checks all the drafts: the same output, faster where the drafts are right")
    p.add_argument("--draft_engine_dir", default=None,
                   help="draft_model: a draft engine of the same vocabulary, built with --tp_size 1 --pp_size 1; it "
                   "runs whole on rank 0")
    p.add_argument("--num_speculative_tokens", type=int, default=4, help="the most draft tokens a step (1..16)")
    p.add_argument("--speculative_disable_by_batch_size", type=int, default=None,
                   help="no drafting while more than this many requests run (a full batch gains nothing from it)")
    p.add_argument("--prompt_lookup_min", type=int, default=1, help="ngram: the shortest suffix looked up")
    p.add_argument("--prompt_lookup_max", type=int, default=4, help="ngram: the longest suffix looked up")
    p.add_argument("--log_stats_interval", type=float, default=0.0,
                   help="log throughput, running/waiting requests, KV cache usage and prefix-cache hit rate every "
                   "this many seconds (0, the default: off)")
    p.add_argument("--output_metrics", action="store_true",
                   help="in --output_json, each output's timeline: arrival, first scheduled, first token, finished, "
                   "time in queue, TTFT, TPOT, latency")
    p.add_argument("--quiet", action="store_true", help="do not print the outputs")
    return p.parse_args(argv)


def read_inputs(args) -> tuple[list[str] | None, list[list[int]] | None, list[int]]:
    """(texts, token ids, priorities): one of the first two, and a priority per prompt (JSONL's 'priority', else 0)."""
    from dist_llm.errors import DistLLMError

    if args.input_text:
        return args.input_text, None, [0] * len(args.input_text)
    if args.input_ids:
        try:
            ids = [[int(t) for t in s.replace(" ", "").split(",") if t] for s in args.input_ids]
        except ValueError:
            raise DistLLMError("--input_ids takes comma-separated integers per prompt, e.g. 1,2,3 4,5") from None
        return None, ids, [0] * len(ids)
    if not os.path.isfile(args.input_file):
        raise DistLLMError(f"--input_file {args.input_file} not found")
    texts, priorities = [], []
    with open(args.input_file) as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            if args.input_file.endswith(".jsonl") or line.lstrip().startswith("{"):
                try:
                    record = json.loads(line)
                    texts.append(record["prompt"])
                    priorities.append(record.get("priority", 0))
                except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
                    raise DistLLMError(f"{args.input_file}:{n}: expected a JSON object with a 'prompt' field") from None
                if not isinstance(priorities[-1], int):
                    raise DistLLMError(f"{args.input_file}:{n}: 'priority' must be an integer, got {priorities[-1]!r}")
            else:
                texts.append(line)
                priorities.append(0)
    if not texts:
        raise DistLLMError(f"--input_file {args.input_file} holds no prompts")
    return texts, None, priorities


def check_tokenizer(args) -> None:
    """Text prompts need a tokenizer: say so before any rank loads weights, naming where it was looked for."""
    from dist_llm.config import EngineConfig
    from dist_llm.errors import DistLLMError
    from dist_llm.runtime.model_runner import has_tokenizer

    EngineConfig.load(args.engine_dir)  # a missing engine is the error to report first
    where = args.tokenizer_dir or args.engine_dir
    if not has_tokenizer(where):
        flag = "--tokenizer_dir " if args.tokenizer_dir else ""
        raise DistLLMError(f"no tokenizer in {flag}{where}; pass --tokenizer_dir or --input_ids")


def main(argv=None):
    args = parse_args(argv)
    from dist_llm.runtime import ModelRunner
    from dist_llm.runtime.sequence import SamplingParams

    texts, ids, priorities = read_inputs(args)  # before start-up, so bad input fails fast on every rank
    sampling = dict(
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p, seed=args.seed,
        stop=args.stop, end_id=args.end_id, pad_id=args.pad_id, repetition_penalty=args.repetition_penalty,
        presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty, min_tokens=args.min_tokens,
        bad_words_ids=args.bad_words_ids, logit_bias=args.logit_bias, stop_token_ids=args.stop_token_ids,
        return_logprobs=args.return_logprobs, top_logprobs=args.top_logprobs, prompt_logprobs=args.prompt_logprobs,
        n=args.n, num_beams=args.num_beams,
        length_penalty=args.length_penalty, early_stopping={"false": False, "true": True}.get(args.early_stopping,
                                                                                            args.early_stopping),
    )
    SamplingParams(max_new_tokens=args.max_new_tokens, **sampling)  # the same: a bad value is named now
    speculative = None
    if args.speculative_method:
        from dist_llm.runtime.speculative import SpeculativeConfig

        speculative = SpeculativeConfig(args.speculative_method, args.num_speculative_tokens, args.prompt_lookup_min,
                                        args.prompt_lookup_max, args.draft_engine_dir,
                                        args.speculative_disable_by_batch_size)
    if texts is not None:
        check_tokenizer(args)
    runner = ModelRunner.from_dir(
        args.engine_dir, device=args.device, backend=args.backend, kernel_backend=args.kernel_backend,
        tokenizer_dir=args.tokenizer_dir, kv_cache_free_gpu_mem_fraction=args.kv_cache_free_gpu_mem_fraction,
        num_kv_blocks=args.num_kv_blocks,
        cuda_graphs="off" if args.enforce_eager else args.cuda_graphs, overlap=not args.disable_overlap_scheduler,
        capacity_scheduler_policy=args.capacity_scheduler_policy, kv_cache_dtype=args.kv_cache_dtype,
        piecewise_graph_max_tokens=args.piecewise_graph_max_tokens, scheduling_policy=args.scheduling_policy,
        log_stats_interval=args.log_stats_interval, speculative_config=speculative,
    )
    if not runner.is_leader:
        return
    with runner:
        outputs = runner.generate(
            input_texts=texts, batch_input_ids=ids, max_new_tokens=args.max_new_tokens, priority=priorities,
            **sampling,
            return_first_logits=bool(args.output_first_logits),
        )
    if not args.quiet:
        for i, o in enumerate(outputs):
            prompt = o.input_text if o.input_text is not None else o.prompt_token_ids
            tag = i if args.n == 1 else f"{i // args.n}.{i % args.n}"  # prompt.sequence
            if i % args.n == 0:
                print(f"[{i // args.n}] prompt: {prompt!r}")
            print(f"[{tag}] output: {o.output_text!r}\n[{tag}] tokens: {o.output_token_ids} ({o.finish_reason})")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump([o.to_json(metrics=args.output_metrics) for o in outputs], f, indent=2)
    if args.output_first_logits:
        import torch

        torch.save(torch.stack([o.first_logits for o in outputs if o.first_logits is not None]),
                   args.output_first_logits)
    rejected = [f"prompt {i // args.n}: {o.error}" for i, o in enumerate(outputs) if o.error and i % args.n == 0]
    if rejected:
        from dist_llm.errors import DistLLMError

        raise DistLLMError("; ".join(rejected))


if __name__ == "__main__":
    run_main(main)
