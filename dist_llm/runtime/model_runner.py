"""`ModelRunner`: the Python entry point, in the TensorRT-LLM spelling.

    runner = ModelRunner.from_dir("ENGINE")
    outputs = runner.generate(input_texts=["Explain quantum computing:"], max_new_tokens=256)

Contract under `mpirun -n N` (N = tp × pp of the engine): every rank runs the same script.
* On rank 0, `from_dir` returns the coordinator: `generate` returns the outputs.
* On every other rank, `from_dir` serves the coordinator (executes its step plans) until rank 0
  shuts down, then returns a runner with `is_leader == False` whose `generate` returns None
  at once. So `if runner.is_leader: print(outputs)` is the only rank-dependent line a script needs.
* Rank 0 shuts the workers down on `runner.shutdown()`, on leaving a `with` block, or at exit.
In one process, a 1-rank engine needs no launcher at all.
"""

from __future__ import annotations

import atexit
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from dist_llm.config import EngineConfig
from dist_llm.errors import DistLLMError
from dist_llm.parallel.state import destroy, init_distributed, is_initialized
from dist_llm.runtime.beam_search import run_beam_search
from dist_llm.runtime.detokenizer import TextStream, output_text
from dist_llm.runtime.executor import Executor, serve_worker
from dist_llm.runtime.kv_sizing import decide_num_blocks
from dist_llm.runtime.piecewise_graphs import MIN_BUCKET
from dist_llm.runtime.scheduler import POLICIES, SCHEDULING_POLICIES
from dist_llm.runtime.sequence import SamplingParams, Sequence, Status, fan_out
from dist_llm.runtime.speculative import SpeculativeConfig
from dist_llm.runtime.stats import RequestMetrics
from dist_llm.runtime.worker import Worker

log = logging.getLogger("dist_llm")


@dataclass
class GenerationOutput:
    request_id: int
    input_text: str | None
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    output_text: str | None
    finish_reason: str | None
    num_cached_tokens: int = 0
    logprobs: list[float] = field(default_factory=list)
    # with top_logprobs = k: per output token, the k most likely (id, log-prob) pairs, most likely first
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    first_logits: torch.Tensor | None = None
    error: str | None = None
    padded_output_token_ids: list[int] | None = None  # with pad_id: max_new_tokens long, padded at the end
    sequence_index: int | None = None  # with n > 1: which of the prompt's n sequences this is (0..n-1)
    stop_string: str | None = None  # the stop string that ended it (vLLM's stop_reason)
    score: float | None = None  # beam search: sum of log-probabilities / length ** length_penalty
    # with prompt_logprobs: per prompt token, its log-probability given the ones before (None for the first: vLLM's)
    prompt_logprobs: list[float | None] | None = None
    # its timeline: arrival, first scheduled, first token, finished (wall clock), time in queue, TTFT, TPOT, latency
    metrics: RequestMetrics | None = None

    def to_json(self, metrics: bool = False) -> dict:
        """The output as JSON; `metrics`: with its timeline (`RequestMetrics.to_json`)."""
        out = {
            "input_text": self.input_text,
            "output_text": self.output_text,
            "output_token_ids": self.output_token_ids,
            "finish_reason": self.finish_reason,
        }
        if self.sequence_index is not None:
            out["sequence_index"] = self.sequence_index
        if self.score is not None:
            out["score"] = self.score
        if self.prompt_logprobs is not None:
            out["prompt_logprobs"] = self.prompt_logprobs
        if self.padded_output_token_ids is not None:
            out["padded_output_token_ids"] = self.padded_output_token_ids
        if metrics and self.metrics is not None:
            out["metrics"] = self.metrics.to_json()
        if self.logprobs:
            out["logprobs"] = self.logprobs
        if self.top_logprobs:
            out["top_logprobs"] = [[list(pair) for pair in step] for step in self.top_logprobs]
        return out


@dataclass
class StreamChunk:
    index: int  # position of the prompt in the call
    request_id: int
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None = None
    sequence_index: int = 0  # with n > 1: which of the prompt's n sequences
    # the text these tokens add (None without a tokenizer): the pieces of a sequence add up to its output_text
    # (docs: runtime/detokenizer.py; text that may begin a stop string waits for the next piece)
    text: str | None = None


class ModelRunner:
    tokenizer_dir: str | None = None  # where the tokenizer was looked for (for error messages)

    def __init__(self, engine: EngineConfig, executor: Executor | None, tokenizer, is_leader: bool):
        self.engine, self.executor, self.tokenizer, self.is_leader = engine, executor, tokenizer, is_leader
        self._closed = not is_leader

    @classmethod
    def from_dir(cls, engine_dir: str, *, device: str = "auto", backend: str = "auto",
                 kernel_backend: str = "auto", tokenizer_dir: str | None = None,
                 kv_cache_free_gpu_mem_fraction: float = 0.9, num_kv_blocks: int | None = None,
                 cuda_graphs: str = "auto", overlap: bool = True,
                 capacity_scheduler_policy: str = "max_utilization", kv_cache_dtype: str = "auto",
                 piecewise_graph_max_tokens: int = 512, scheduling_policy: str = "fcfs",
                 log_stats_interval: float = 0.0, speculative_config: SpeculativeConfig | None = None
                 ) -> ModelRunner:  # fmt: skip
        """`cuda_graphs`: "on" (decode steps replayed from CUDA graphs: GPU, one rank or NCCL), "off" (eager),
        "auto" (on where it can be, else off) or "static" (the graphs' static-buffer path run eagerly, for
        testing on the CPU). `overlap`: schedule step N+1 while step N runs (one pipeline stage).
        `capacity_scheduler_policy`: "max_utilization" (preempt when blocks run out) or
        "guaranteed_no_evict" (admit only what can run to max_new_tokens; see runtime/scheduler.py).
        `scheduling_policy`: "fcfs" (arrival order) or "priority" (each request's `priority`, lower first; the
        request preempted when blocks run out is the one of the highest value).
        `kv_cache_dtype`: "auto" (the model's dtype) or "fp8" (e4m3, scales 1.0: half the KV bytes).
        `piecewise_graph_max_tokens`: with graphs on (or static), prefill and mixed steps of up to this many tokens
        replay graphs cut at attention (runtime/piecewise_graphs.py); 0: they run eagerly.
        `log_stats_interval`: log throughput, queue, KV usage and prefix-hit figures every this many seconds while
        there is work (vLLM's stats line; 0: never). `runner.executor.stats()` gives them at any time.
        `speculative_config`: speculative decoding (runtime/speculative.py), by n-gram lookup or with a draft model
        (runtime/draft_model.py, which runs on rank 0): the same tokens, greedy or seeded sampling, several a step
        where the drafts are right; None: off."""
        if piecewise_graph_max_tokens and piecewise_graph_max_tokens < MIN_BUCKET:
            raise DistLLMError(f"--piecewise_graph_max_tokens must be 0 (off) or at least {MIN_BUCKET}, got "
                               f"{piecewise_graph_max_tokens}")
        if not log_stats_interval >= 0:
            raise DistLLMError(f"--log_stats_interval must be >= 0 seconds (0: off), got {log_stats_interval}")
        if capacity_scheduler_policy not in POLICIES:
            raise DistLLMError(f"unknown --capacity_scheduler_policy {capacity_scheduler_policy!r}; "
                               f"choose one of {', '.join(POLICIES)}")
        if scheduling_policy not in SCHEDULING_POLICIES:
            raise DistLLMError(f"unknown --scheduling_policy {scheduling_policy!r}; "
                               f"choose one of {', '.join(SCHEDULING_POLICIES)}")
        engine = EngineConfig.load(engine_dir)
        pstate = init_distributed(engine.mapping.tp_size, engine.mapping.pp_size, backend, device)
        if kernel_backend == "auto":
            kernel_backend = "triton" if pstate.device.type == "cuda" else "torch"
        worker = Worker(engine_dir, engine, pstate, kernel_backend, kv_cache_dtype)
        if cuda_graphs == "auto":
            cuda_graphs = "on" if graphs_possible(pstate) else "off"
        if cuda_graphs != "off":
            check_cuda_graphs(cuda_graphs, pstate)
        graphs = {"on": "capture", "static": "static"}.get(cuda_graphs, "off")  # (Worker.start's modes)
        drafter = None
        if speculative_config is not None and speculative_config.method == "draft_model" and pstate.mapping.rank == 0:
            from dist_llm.runtime.draft_model import DraftModel

            # (before the KV pool is sized: the draft's weights and its own pool take their memory first)
            drafter = DraftModel(speculative_config.draft_engine_dir, engine, kernel_backend,
                                 speculative_config.num_speculative_tokens, graphs, piecewise_graph_max_tokens)
        num_blocks = decide_num_blocks(worker, kv_cache_free_gpu_mem_fraction, num_kv_blocks)
        worker.start(num_blocks, graphs, piecewise_graph_max_tokens)
        if pstate.mapping.rank != 0:
            serve_worker(worker)
            worker.close()
            destroy()
            return cls(engine, None, None, is_leader=False)
        tokenizer = load_tokenizer(tokenizer_dir or engine_dir)
        executor = Executor(worker, engine, num_blocks, tokenizer, overlap=overlap,
                            capacity_scheduler_policy=capacity_scheduler_policy, scheduling_policy=scheduling_policy,
                            log_stats_interval=log_stats_interval, speculative=speculative_config, drafter=drafter)
        bs = engine.build.tokens_per_block
        log.info("KV cache: %d blocks of %d tokens = %d tokens in flight at most (%s)", num_blocks, bs,
                 num_blocks * bs, str(worker.kv_dtype).removeprefix("torch."))
        runner = cls(engine, executor, tokenizer, is_leader=True)
        runner.tokenizer_dir = tokenizer_dir or engine_dir
        atexit.register(runner.shutdown)
        return runner

    # ---- generation -----------------------------------------------------------------------------

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        if self.tokenizer is None:
            raise DistLLMError(f"no tokenizer in {self.tokenizer_dir or 'the engine directory'}; pass tokenizer_dir "
                               "(--tokenizer_dir) or token ids (batch_input_ids, --input_ids)")
        return [self.tokenizer(t)["input_ids"] for t in texts]

    def _prompts(self, input_texts, batch_input_ids) -> tuple[list[str] | None, list[list[int]]]:
        if (input_texts is None) == (batch_input_ids is None):
            raise DistLLMError("give exactly one of input_texts or batch_input_ids")
        if input_texts is not None:
            if isinstance(input_texts, str):
                input_texts = [input_texts]
            return input_texts, self.tokenize(list(input_texts))
        return None, [list(map(int, p.tolist() if torch.is_tensor(p) else p)) for p in batch_input_ids]

    @staticmethod
    def _priorities(priority, num_prompts: int) -> list[int]:
        priorities = [priority] * num_prompts if isinstance(priority, int) else list(priority)
        if len(priorities) != num_prompts or not all(isinstance(p, int) for p in priorities):
            raise DistLLMError(f"priority must be an int or a list of one int per prompt ({num_prompts}), "
                               f"got {priority!r}")
        return priorities

    def _submit(self, input_texts, batch_input_ids, params: SamplingParams, priority=0):
        input_texts, prompts = self._prompts(input_texts, batch_input_ids)
        priorities = self._priorities(priority, len(prompts))
        # prompt by prompt, n sequences each
        seqs = [s for p, prio in zip(prompts, priorities) for s in fan_out(p, params, prio)]
        for s in seqs:
            try:
                self.executor.enqueue(s)
            except DistLLMError as e:  # refused at admission; the others run on
                s.status, s.finish_reason, s.error = Status.FINISHED, "rejected", str(e)
                s.finished_time = time.perf_counter()
                log.error("request %d rejected: %s", s.request_id, e)
        return input_texts, seqs

    def generate(self, input_texts: list[str] | None = None, batch_input_ids=None, max_new_tokens: int = 16,
                 priority: int | list[int] = 0, **sampling) -> list[GenerationOutput] | None:
        """Generate for a batch of prompts (texts or token ids); returns outputs in input order.

        `sampling` takes the SamplingParams fields: n, temperature, top_k, top_p, min_p, seed, stop, stop_token_ids,
        end_id, pad_id, ignore_eos, include_stop_str_in_output, skip_special_tokens, repetition_penalty,
        presence_penalty, frequency_penalty, min_tokens, logit_bias, bad_words_ids, return_logprobs, top_logprobs,
        prompt_logprobs, return_first_logits, num_beams, length_penalty, early_stopping. With pad_id, each output also
        has `padded_output_token_ids`: max_new_tokens ids, padded with pad_id after the request stopped.
        A seed applies to every prompt of the call.
        With `n` > 1, each prompt is sampled n times (sequence j with seed + j): the outputs come prompt by prompt,
        n each (outputs[i * n + j] is sequence j of prompt i, its `sequence_index` j). Sequences 1..n-1 reuse the
        prompt's KV through the prefix cache.
        With `num_beams` > 1 (greedy only; `length_penalty`, `early_stopping`), a beam search as transformers runs
        it (runtime/beam_search.py): outputs prompt by prompt, its n best hypotheses each (n <= num_beams), best
        first, each with its `score`.
        Stops work as in vLLM: a stop token (stop_token_ids, EOS or end_id) ends the output and stays in
        output_token_ids, but its text is not in output_text; a stop string is cut from output_text, with
        whatever follows it, while output_token_ids keep every token up to the one that completed it.
        A prompt that can never fit the engine comes back with finish_reason "rejected" and `error` set.
        `priority` (one int, or one per prompt) orders the queue under the engine's "priority" scheduling policy.
        """
        if not self.is_leader:
            return None
        params = SamplingParams(max_new_tokens=max_new_tokens, **sampling)
        if params.num_beams > 1:
            return self._beam_search(input_texts, batch_input_ids, params, priority)
        texts, seqs = self._submit(input_texts, batch_input_ids, params, priority)
        while any(not s.is_finished for s in seqs):
            self.executor.step()
        return [self._output(s, texts[i // params.n] if texts else None) for i, s in enumerate(seqs)]

    def generate_stream(self, input_texts: list[str] | None = None, batch_input_ids=None, max_new_tokens: int = 16,
                        priority: int | list[int] = 0, **sampling) -> Iterator[StreamChunk]:
        """Like `generate`, but yields each token as soon as it is sampled (in-flight batching underneath), with the
        text it adds (`StreamChunk.text`)."""
        if not self.is_leader:
            return
        params = SamplingParams(max_new_tokens=max_new_tokens, **sampling)
        if params.num_beams > 1:
            raise DistLLMError("streaming takes no beam search (num_beams > 1): use generate")
        texts, seqs = self._submit(input_texts, batch_input_ids, params, priority)
        index = {s.request_id: i // params.n for i, s in enumerate(seqs)}
        for s in seqs:
            if s.finish_reason == "rejected":
                yield StreamChunk(index[s.request_id], s.request_id, [], True, "rejected", s.sequence_index)
        by_id = {s.request_id: s for s in seqs}
        streams = {s.request_id: TextStream(self.tokenizer, s.params.stop, s.params.skip_special_tokens)
                   for s in seqs if self.tokenizer is not None}
        while any(not s.is_finished for s in seqs):
            for ev in self.executor.step():
                if ev.request_id in index:
                    seq, text = by_id[ev.request_id], None
                    if streams:
                        stream = streams[ev.request_id]
                        text = stream.finish(output_text(self.tokenizer, seq)) if ev.finished else \
                            stream.push(ev.new_token_ids)
                    yield StreamChunk(index[ev.request_id], ev.request_id, ev.new_token_ids, ev.finished,
                                      ev.finish_reason, seq.sequence_index, text)

    def _beam_search(self, input_texts, batch_input_ids, params: SamplingParams, priority) -> list[GenerationOutput]:
        texts, prompts = self._prompts(input_texts, batch_input_ids)
        priorities = self._priorities(priority, len(prompts))
        outputs = []
        for i, (prompt, found) in enumerate(zip(prompts, run_beam_search(self.executor, prompts, params, priorities))):
            if isinstance(found, str):
                log.error("prompt %d rejected: %s", i, found)
            for j in range(params.n):
                seq = Sequence(prompt, params)
                seq.status, seq.sequence_index = Status.FINISHED, j
                if isinstance(found, str):
                    seq.finish_reason, seq.error = "rejected", found
                else:
                    seq.token_ids += found[j].tokens
                    seq.stopped_on_token = found[j].stopped
                    seq.finish_reason = "stop" if seq.stopped_on_token else "length"
                out = self._output(seq, texts[i] if texts else None)
                out.score = None if isinstance(found, str) else found[j].score
                outputs.append(out)
        return outputs

    def _output(self, seq: Sequence, text: str | None) -> GenerationOutput:
        out_text = None if self.tokenizer is None else output_text(self.tokenizer, seq)
        return GenerationOutput(
            request_id=seq.request_id,
            input_text=text,
            prompt_token_ids=seq.token_ids[: seq.prompt_len],
            output_token_ids=seq.output_token_ids,
            output_text=out_text,
            stop_string=seq.stop_string,
            finish_reason=seq.finish_reason,
            num_cached_tokens=seq.reported_cached_tokens,
            logprobs=seq.logprobs,
            top_logprobs=seq.top_logprobs,
            first_logits=seq.first_logits,
            error=seq.error,
            sequence_index=seq.sequence_index if seq.params.n > 1 else None,
            prompt_logprobs=[None, *seq.prompt_logprobs] if seq.params.prompt_logprobs else None,
            # (none for a beam search's hypotheses, which are not requests of their own)
            metrics=None if seq.first_scheduled_time is None and seq.finish_reason != "rejected" else
            self.executor.request_metrics(seq),
            padded_output_token_ids=None if seq.params.pad_id is None else
            seq.output_token_ids + [seq.params.pad_id] * (seq.params.max_new_tokens - seq.num_generated),
        )

    def shutdown(self) -> None:
        """Finish: cancel what is in flight and release the worker ranks (rank 0 only; idempotent)."""
        atexit.unregister(self.shutdown)  # which would keep the engine's memory alive until exit
        if self._closed or not is_initialized():  # at exit after an explicit destroy(): nothing to release
            return
        self._closed = True
        self.executor.shutdown()
        self.executor.worker.close()
        if self.executor.drafter is not None:
            self.executor.drafter.close()
        destroy()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()


def graphs_possible(pstate) -> bool:
    return pstate.device.type == "cuda" and (not pstate.distributed or pstate.backend == "nccl")


def check_cuda_graphs(mode: str, pstate) -> None:
    if mode not in ("on", "static"):
        raise DistLLMError(f"cuda_graphs must be auto, off, on or static, got {mode!r}")
    if mode == "on" and pstate.device.type != "cuda":
        raise DistLLMError("--cuda_graphs on needs --device cuda (use --cuda_graphs static to test the path)")
    if mode == "on" and pstate.distributed and pstate.backend != "nccl":
        raise DistLLMError("--cuda_graphs on with several ranks needs --backend nccl (gloo cannot be captured)")


def has_tokenizer(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer.model", "vocab.json"))


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    if not has_tokenizer(path):
        log.warning("no tokenizer files in %s: only token-id input will work", path)
        return None
    return AutoTokenizer.from_pretrained(path)
