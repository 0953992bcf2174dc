"""The coordinator's loop on rank 0: requests in, one scheduled step at a time, tokens out.

Each step: schedule -> build a StepPlan -> broadcast it -> run this rank's shard -> receive the
sampled ids from the last stage -> resolve them, check stops, free finished requests' blocks.

Several steps are in flight at once, and a request's state moves forward when its step is launched
(its KV is then as good as written); the sampled token is a PENDING placeholder until the step comes
back, and is resolved, in launch order, by `_complete`.

* Overlap scheduling (one pipeline stage, the default): rank 0 schedules and launches step N+1 while
  the GPU still runs step N. Step N+1 reads the tokens of step N from the device (`prev_index`), so
  the host never waits for the GPU before launching. A request that stops at step N has had one more
  token computed for nothing; that token is dropped.
* Pipeline parallelism: up to pp_size micro-batches of disjoint requests are in flight; rank 0
  launches the next one into stage 0 while later stages still work on earlier ones.
"""

from __future__ import annotations

import itertools
import random
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from dist_llm.config import EngineConfig
from dist_llm.errors import DistLLMError
from dist_llm.parallel import comm
from dist_llm.runtime.block_manager import BlockManager
from dist_llm.runtime.detokenizer import stop_string_at
from dist_llm.runtime.logits_processing import build_logits_inputs
from dist_llm.runtime.plan import SHUTDOWN, StepPlan, StepResult, mixed_decode_split, paged_inputs, sampling_inputs
from dist_llm.runtime.scheduler import ScheduledBatch, Scheduler
from dist_llm.runtime.sequence import PENDING, SamplingParams, Sequence, Status
from dist_llm.runtime.speculative import MAX_SPEC_SKIP, SpeculativeConfig, accept, can_draft, ngram_draft
from dist_llm.runtime.stats import IterationStats, KvCacheStats, RequestMetrics, StatsLogger, WallClock
from dist_llm.runtime.worker import Worker


@dataclass
class TokenEvent:
    """One step's news about one request (the unit of streaming)."""

    request_id: int
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None = None


@dataclass
class InFlight:
    batch: ScheduledBatch
    result: StepResult | None  # None: it comes from the sampler rank
    computed: list[int]  # each request's num_computed_tokens once this step is done
    token_index: list[int | None]  # where each request's sampled token goes in token_ids (None: no sample)
    sample_row: list[int] | None = None  # each row's (last) row of the sampled ids; None: row i's is i
    drafts: list[int] | None = None  # each row's speculative draft tokens (runtime/speculative.py); None: none
    launch_time: float = 0.0
    context_rows: int = 0  # rows computing prompt tokens (prefill chunks, recomputations), and their tokens
    context_tokens: int = 0


class Executor:
    def __init__(self, worker: Worker, engine: EngineConfig, num_blocks: int, tokenizer=None,
                 overlap: bool = True, capacity_scheduler_policy: str = "max_utilization",
                 scheduling_policy: str = "fcfs", log_stats_interval: float = 0.0,
                 speculative: SpeculativeConfig | None = None, drafter=None):  # fmt: skip
        """`log_stats_interval`: seconds between vLLM-style stats lines while there is work (0: none).
        `speculative`: speculative decoding (runtime/speculative.py); None: off. `drafter`: with the "draft_model"
        method, the draft engine on this rank (runtime/draft_model.py: DraftModel)."""
        self.worker, self.engine, self.tokenizer = worker, engine, tokenizer
        b = engine.build
        self.block_manager = BlockManager(num_blocks, b.tokens_per_block)
        self.speculative, self.drafter = speculative, drafter
        if speculative is not None and (speculative.method == "draft_model") != (drafter is not None):
            raise ValueError("a draft model goes with the draft_model speculative method, and only with it")
        self.proposals: dict[int, list[int]] = {}  # the draft model's drafts for the step being scheduled
        self.scheduler = Scheduler(self.block_manager, b.max_batch_size, b.max_num_tokens,
                                   capacity_scheduler_policy, b.max_seq_len, scheduling_policy,
                                   propose=self._propose if speculative else None)
        self.num_draft_tokens = self.num_accepted_tokens = 0  # speculative drafts proposed and accepted, in all
        self.num_drafting_steps = 0  # steps of a request that checked drafts
        self.accepted_per_position = [0] * (speculative.num_speculative_tokens if speculative else 0)
        self.requests: dict[int, Sequence] = {}  # unfinished requests only
        self.eos_ids = set(engine.model.eos_token_ids)
        self.decode_split = mixed_decode_split()
        self.mapping = worker.mapping
        self.steps = 0
        # overlap: the next step of the same requests is launched before this one comes back
        self.overlap = overlap and self.mapping.pp_size == 1
        self.depth = 2 if self.overlap else self.mapping.pp_size  # steps in flight at most
        self.inflight: deque[InFlight] = deque()
        self.launches = 0
        self.max_inflight_seen = 0
        # the coordinator's own seconds, by phase (benchmarks read them: is the host hidden behind the GPU?)
        self.host_seconds = dict(schedule=0.0, launch=0.0, wait=0.0, complete=0.0, draft=0.0)
        # set to a list to record (completion time, prefill tokens, decode rows) per completed step: benchmarks
        # split a run's time between prefill-carrying and decode-only steps with it
        self.step_log: list[tuple[float, int, int]] | None = None
        # runtime/stats.py: totals since start-up and the last completed step
        self.prompt_tokens = self.generation_tokens = self.num_finished = 0
        self.last_step: InFlight | None = None
        self.last_step_latency = 0.0
        self.stats_logger = StatsLogger(log_stats_interval) if log_stats_interval > 0 else None
        self.wall_clock = WallClock()

    def request_metrics(self, seq: Sequence) -> RequestMetrics:
        """A request's timeline in wall-clock time (runtime/stats.py)."""
        wall = self.wall_clock
        return RequestMetrics(wall(seq.arrival_time), wall(seq.first_scheduled_time), wall(seq.first_token_time),
                              wall(seq.finished_time), seq.num_preemptions, seq.num_generated)

    # ---- requests -------------------------------------------------------------------------------

    def check_admissible(self, seq: Sequence) -> None:
        b, bm = self.engine.build, self.block_manager
        total = seq.prompt_len + seq.params.max_new_tokens
        if seq.prompt_len == 0:
            raise DistLLMError("empty prompt: give at least one token")
        if seq.prompt_len > b.max_input_len:
            raise DistLLMError(
                f"prompt of {seq.prompt_len} tokens exceeds the engine's max_input_len {b.max_input_len}"
            )
        if total > b.max_seq_len:
            raise DistLLMError(
                f"prompt ({seq.prompt_len}) + max_new_tokens ({seq.params.max_new_tokens}) = {total} exceeds the "
                f"engine's max_seq_len {b.max_seq_len}; lower max_new_tokens or rebuild with a larger --max_seq_len"
            )
        if bm.blocks_needed(total) > bm.num_blocks:
            raise DistLLMError(
                f"prompt + max_new_tokens = {total} tokens needs {bm.blocks_needed(total)} KV blocks but the pool "
                f"has {bm.num_blocks}; give the KV cache more memory or lower max_new_tokens"
            )
        vocab = self.engine.model.vocab_size
        bad = [t for t in seq.token_ids if not 0 <= t < vocab]
        if bad:
            raise DistLLMError(f"token id {bad[0]} is outside the vocabulary [0, {vocab})")
        p = seq.params
        for name, ids in (("logit_bias", p.logit_bias), ("stop_token_ids", p.stop_token_ids),
                          ("bad_words_ids", [t for w in p.bad_words_ids for t in w]),
                          ("end_id", [] if p.end_id is None else [p.end_id])):
            bad = [t for t in ids if t >= vocab or (t < 0 and name != "end_id")]  # (end_id -1: no EOS)
            if bad:  # (the logits processing indexes the vocabulary with them)
                raise DistLLMError(f"{name} token id {bad[0]} is outside the vocabulary [0, {vocab})")

    def _propose(self, seq: Sequence) -> list[int]:
        """Draft tokens for a decoding request (the scheduler's `propose`): the draft model's, made for the step
        beforehand (`_run_draft_model`), or by n-gram lookup in its tokens."""
        c = self.speculative
        if not can_draft(seq) or not self._speculating():
            return []
        if self.drafter is not None:
            drafts = self.proposals.pop(seq.request_id, [])
        else:
            drafts = ngram_draft(seq.token_ids, c.num_speculative_tokens, c.prompt_lookup_min, c.prompt_lookup_max)
        if not drafts:
            self._missed(seq)
        return drafts

    def _run_draft_model(self) -> None:
        """The draft model's drafts for every running request that the next schedule may let draft (decoding,
        its newest token known, not backing off), in one batch."""
        d, k = self.drafter, self.speculative.num_speculative_tokens
        if not self._speculating():
            self.proposals = {}
            return
        seqs = [s for s in self.scheduler.running if s.status is Status.RUNNING and not s.num_pending
                and not s.spec_skip and len(s) - s.num_computed_tokens == 1 and can_draft(s)]
        ks = [min(k, s.params.max_new_tokens - s.num_sampled - 1) for s in seqs]
        self.proposals = dict(zip((s.request_id for s in seqs), d.propose(seqs, ks))) if seqs else {}

    @staticmethod
    def _missed(seq: Sequence) -> None:
        """A lookup found nothing, or a drafting step kept no draft: the request decodes the next 1, 2, 4, then 8
        steps (while the misses go on) without drafting, and with overlap scheduling, before it looks again."""
        seq.spec_misses += 1
        seq.spec_skip = min(2 ** (seq.spec_misses - 1), MAX_SPEC_SKIP)

    def enqueue(self, seq: Sequence) -> int:
        self.check_admissible(seq)
        if seq.seed is None:
            seq.seed = random.getrandbits(62) if seq.params.temperature > 0 else 0
        self.requests[seq.request_id] = seq
        self.scheduler.add(seq)
        return seq.request_id

    def cancel(self, request_id: int) -> None:
        seq = self.requests.get(request_id)
        if seq is not None and not seq.is_finished:
            self._finish(seq, "cancelled")

    def _finish(self, seq: Sequence, reason: str) -> None:
        """A request leaves: its blocks (and its draft model state) go at once; tokens still in flight are dropped."""
        self.scheduler.finish(seq, reason)
        seq.drop_pending()
        del self.requests[seq.request_id]
        if self.drafter is not None:
            self.drafter.release(seq.request_id)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work() or bool(self.inflight)

    def stream(self) -> Iterator[TokenEvent]:
        """Run steps while there is work, yielding every token as it is produced."""
        while self.has_unfinished():
            yield from self.step()

    # ---- one step -------------------------------------------------------------------------------

    def _plan(self, batch: ScheduledBatch) -> StepPlan:
        """Plain lists, one tensor per field at the end: this runs every step, for every request."""
        ids, pos, slots, seq_lens, cu, rows, waiting = paged_inputs(batch.seqs, batch.num_new_tokens,
                                                                    self.engine.build.tokens_per_block, PENDING)
        prev = [-1] * len(ids) if waiting else None
        for i in waiting:  # sampled by the step in flight: the device fills it in
            launch, row = batch.seqs[i].feed
            assert launch == self.launches - 1, "a PENDING token must come from the previous launch"
            prev[cu[i + 1] - 1] = row
        params, seqs, counts = [s.params for s in batch.seqs], batch.seqs, batch.num_new_tokens
        sample_index, offsets, samples = None, [s.num_sampled for s in batch.seqs], None
        drafts = [s.num_drafts for s in batch.seqs]
        if any(drafts):  # a drafting row samples at its last 1 + d tokens, every other row at its last one
            sample_index = [cu[i + 1] - 1 - d + j for i, d in enumerate(drafts) for j in range(d + 1)]
            params = [p for p, d in zip(params, drafts) for _ in range(d + 1)]
            seqs = [s for s, d in zip(batch.seqs, drafts) for _ in range(d + 1)]
            # each sampled row draws the noise of the output position it samples (seed, offset), as decoding one
            # token at a time would: a kept draft is the token that sampling gives there
            offsets = [o - d + j for o, d in zip(offsets, drafts) for j in range(d + 1)]
            # the logits processing's rows: a drafting request's row j sees its tokens up to draft j
            counts = [m for n, d in zip(counts, drafts) for m in (range(1, d + 2) if d else [n])]
            samples = [bool(d) or s.num_computed_tokens + n == len(s) for s, n, d in zip(batch.seqs,
                       batch.num_new_tokens, drafts) for _ in range(d + 1)]
        index, targets = [], []
        if any(p.prompt_logprobs for p in params):
            starts = [s.num_computed_tokens for s in batch.seqs]
            for row, first, count in prompt_logprob_spans(batch.seqs, starts, batch.num_new_tokens):
                index += range(cu[row], cu[row] + count)  # the chunk's tokens at positions first - 1, ...
                targets += batch.seqs[row].token_ids[first : first + count]
        return StepPlan(
            input_ids=torch.tensor(ids, dtype=torch.int64),
            positions=torch.tensor(pos, dtype=torch.int64),
            slot_mapping=torch.tensor(slots, dtype=torch.int64),
            block_tables=torch.tensor(rows, dtype=torch.int32),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
            cu_seqlens_q=torch.tensor(cu, dtype=torch.int32),
            max_seqlen_q=max(batch.num_new_tokens),
            is_decode=batch.is_decode,
            **sampling_inputs(params, [s.seed for s in seqs], offsets),
            return_logits=any(p.return_first_logits and s.num_sampled == 0 for p, s in zip(params, seqs)),
            return_logprobs=any(p.return_logprobs for p in params),
            top_logprobs=max(p.top_logprobs for p in params),
            prompt_logprob_index=torch.tensor(index, dtype=torch.int64) if index else None,
            prompt_logprob_targets=torch.tensor(targets, dtype=torch.int64) if index else None,
            prev_index=None if prev is None else torch.tensor(prev, dtype=torch.int64),
            # the scheduler lists rows of one query token first
            num_decode_rows=next((i for i, n in enumerate(batch.num_new_tokens) if n != 1), len(batch))
            if self.decode_split else 0,
            logits_inputs=build_logits_inputs(seqs, counts, self.stop_token_ids, samples)
            if any(p.processes_logits for p in params) else None,
            sample_index=None if sample_index is None else torch.tensor(sample_index, dtype=torch.int64),
        )

    def _launch(self, batch: ScheduledBatch) -> None:
        plan = self._plan(batch)
        comm.broadcast_object(plan)
        result = self.worker.execute(plan)  # the result itself when rank 0 is also the last stage
        computed, token_index, context_rows, context_tokens = [], [], 0, 0
        drafts = [s.num_drafts for s in batch.seqs] if plan.sample_index is not None else None
        # each row's (last) row of the sampled ids: a drafting row has 1 + d of them
        last_row = [r - 1 for r in itertools.accumulate(d + 1 for d in drafts)] if drafts else None
        for row, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            if seq.num_drafts:  # the newest token and its drafts: what comes back is settled in _complete
                seq.num_computed_tokens += n
                computed.append(seq.num_computed_tokens)
                token_index.append(None)
                continue
            if n > 1 or seq.num_computed_tokens < seq.prompt_len:  # (a decode row: one token after the prompt)
                context_rows, context_tokens = context_rows + 1, context_tokens + n
            seq.num_computed_tokens += n
            computed.append(seq.num_computed_tokens)
            if seq.num_computed_tokens == len(seq):  # this step samples the request's next token
                token_index.append(len(seq))
                seq.token_ids.append(PENDING)
                seq.num_pending += 1
                seq.feed = (self.launches, row if last_row is None else last_row[row])
            else:  # a prefill chunk that does not reach the end yet: its sample is not used
                token_index.append(None)
        self.launches += 1
        self.inflight.append(InFlight(batch, result, computed, token_index, last_row, drafts, time.perf_counter(),
                                      context_rows, context_tokens))
        self.max_inflight_seen = max(self.max_inflight_seen, len(self.inflight))

    def step(self) -> list[TokenEvent]:
        """Launch steps until `depth` are in flight, then complete the oldest one."""
        t, clock = self.host_seconds, time.perf_counter
        while len(self.inflight) < self.depth:
            if self.overlap and self.speculative and self._drafting_in_flight():
                break  # its next input depends on what the step accepts: the whole batch waits for it, not half
            t0 = clock()
            if self.drafter is not None:
                self._run_draft_model()
                t["draft"] += clock() - t0
                t0 = clock()
            in_flight = {s.request_id for f in self.inflight for s in f.batch.seqs}
            batch = self.scheduler.schedule(busy=set() if self.overlap else in_flight, protected=in_flight)
            t1 = clock()
            t["schedule"] += t1 - t0
            if not batch.seqs:
                break
            self._launch(batch)
            t["launch"] += clock() - t1
        if not self.inflight:
            if self.scheduler.has_work():
                raise RuntimeError("scheduler made no progress with requests pending (a bug: please report)")
            return []
        t0 = clock()
        done = self.inflight.popleft()
        result = done.result if done.result is not None else comm.recv_object(self.mapping.sampler_rank)
        result.wait()
        t1 = clock()
        self.steps += 1
        if self.step_log is not None:
            decode_rows = done.batch.num_new_tokens.count(1)  # a one-token prefill chunk costs what a decode row does
            self.step_log.append((t1, sum(done.batch.num_new_tokens) - decode_rows, decode_rows))
        events = self._complete(done, result)
        self.last_step, self.last_step_latency = done, t1 - done.launch_time
        self.prompt_tokens += done.context_tokens
        self.generation_tokens += sum(len(ev.new_token_ids) for ev in events)
        self.num_finished += sum(ev.finished for ev in events)  # (stopped or at their length; not cancelled)
        t["wait"] += t1 - t0
        t["complete"] += clock() - t1
        if self.stats_logger is not None:
            self.stats_logger.maybe_log(self.stats, force=not self.has_unfinished())
        return events

    def stats(self) -> IterationStats:
        """The scheduler, the KV pool and the last completed step now (runtime/stats.py)."""
        bm, last = self.block_manager, self.last_step
        rows = len(last.batch) if last else 0
        return IterationStats(
            iteration=self.steps, timestamp=time.time(),
            num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
            num_in_flight_steps=len(self.inflight), num_scheduled_requests=rows,
            num_context_requests=last.context_rows if last else 0,
            num_context_tokens=last.context_tokens if last else 0,
            num_generation_requests=rows - (last.context_rows if last else 0),
            iter_latency_ms=1e3 * self.last_step_latency,
            prompt_tokens=self.prompt_tokens, generation_tokens=self.generation_tokens,
            num_finished=self.num_finished, num_preemptions=self.scheduler.num_preemptions,
            kv=KvCacheStats(
                max_num_blocks=bm.num_blocks, free_num_blocks=bm.num_free_blocks, used_num_blocks=bm.num_used_blocks,
                tokens_per_block=bm.block_size, cached_num_blocks=bm.num_cached_blocks,
                reused_blocks=bm.reused_blocks, missed_blocks=bm.missed_blocks,
                prefix_queried_tokens=bm.queried_tokens, prefix_hit_tokens=bm.hit_tokens),
            num_draft_tokens=self.num_draft_tokens, num_accepted_tokens=self.num_accepted_tokens,
            num_drafting_steps=self.num_drafting_steps, accepted_per_position=list(self.accepted_per_position),
        )

    def _speculating(self) -> bool:
        """Whether requests draft now: speculative decoding is on, and no more requests run than its
        disable_by_batch_size."""
        c = self.speculative
        return c is not None and (c.disable_by_batch_size is None or
                                  len(self.scheduler.running) <= c.disable_by_batch_size)

    def _drafting_in_flight(self) -> bool:
        """Whether a step in flight holds a request that may draft next (runtime/speculative.py): overlap
        scheduling then waits for it, since what the step accepts is that request's next input. (Leaving such
        requests out of an overlapped step instead splits a full batch into two halves that take turns.) A request
        whose drafts are in flight is waited for in any case: its tokens are not known until they are checked."""
        may_draft = self._speculating()
        return any(s.num_drafts or (may_draft and s.num_computed_tokens >= s.prompt_len and not s.spec_skip
                                    and not s.is_finished and can_draft(s))
                   for f in self.inflight for s in f.batch.seqs)  # (a prompt chunk short of the end: no wait)

    def _complete(self, done: InFlight, result: StepResult) -> list[TokenEvent]:
        now = time.perf_counter()
        events = []
        tokens = result.token_ids.tolist()  # one conversion, not one tensor index per request
        logprobs = result.logprobs.tolist() if result.logprobs is not None else None
        top = None
        if result.top_logprobs is not None:
            top = list(zip(result.top_logprob_ids.tolist(), result.top_logprobs.tolist()))
        if result.prompt_logprobs is not None:
            self._take_prompt_logprobs(done, result.prompt_logprobs.tolist())
        for i, seq in enumerate(done.batch.seqs):
            if seq.is_finished:  # cancelled or stopped while this step was in flight
                continue
            r = i if done.sample_row is None else done.sample_row[i]  # its (last) row of the sampled ids
            if done.drafts and done.drafts[i]:
                first = r - done.drafts[i]
                event = self._settle_drafts(seq, done.drafts[i], tokens[first : r + 1], now)
                if logprobs is not None and seq.params.return_logprobs:  # of each token kept, from its own row
                    for j in range(len(event.new_token_ids)):
                        self._take_logprobs(seq, logprobs[first + j], top and top[first + j])
                events.append(event)
                continue
            self.block_manager.commit(seq, done.computed[i])
            idx = done.token_index[i]
            if idx is None:
                continue
            token = tokens[r]
            seq.token_ids[idx] = token
            seq.num_pending -= 1
            if seq.num_pending == 0:
                seq.feed = None
            if result.logits is not None and idx == seq.prompt_len and seq.params.return_first_logits:
                seq.first_logits = result.logits[r].clone()
            if logprobs is not None and seq.params.return_logprobs:
                self._take_logprobs(seq, logprobs[r], top and top[r])
            seq.token_times.append(now)
            if seq.first_token_time is None:
                seq.first_token_time = now
            reason = self._stop_reason(seq, idx)
            if reason:
                self._finish(seq, reason)  # (tokens sampled after the stop, still in flight, are dropped)
            events.append(TokenEvent(seq.request_id, [token], reason is not None, reason))
        return events

    @staticmethod
    def _take_logprobs(seq: Sequence, logprob: float, top: tuple[list[int], list[float]] | None) -> None:
        seq.logprobs.append(logprob)
        if top is not None and seq.params.top_logprobs:
            k = seq.params.top_logprobs
            seq.top_logprobs.append(list(zip(top[0][:k], top[1][:k])))

    def _settle_drafts(self, seq: Sequence, num_drafts: int, sampled: list[int], now: float) -> TokenEvent:
        """A drafting request's step is back (runtime/speculative.py): keep the drafts that the step's sampling
        confirms and the token after them, stop where a stop condition says, move its computed length back to the
        kept tokens and give back the blocks it no longer needs."""
        start = len(seq) - num_drafts  # its first draft; the tokens before it have their KV now
        new = accept(seq.token_ids[start:], sampled)
        del seq.token_ids[start:]
        seq.num_drafts = 0
        self.num_draft_tokens += num_drafts
        self.num_accepted_tokens += len(new) - 1
        self.num_drafting_steps += 1
        kept = self.accepted_per_position
        kept += [0] * (len(new) - 1 - len(kept))  # (a proposer replaced in tests may draft more than K)
        for j in range(len(new) - 1):
            kept[j] += 1
        if len(new) == 1 and self.drafter is None:  # (a draft model's miss is one of its usual misses: no back-off)
            self._missed(seq)
        else:
            seq.spec_misses = 0
        reason = None
        for token in new:  # one at a time, as decoding would have given them
            seq.token_ids.append(token)
            seq.token_times.append(now)
            if seq.first_token_time is None:
                seq.first_token_time = now
            reason = self._stop_reason(seq, len(seq) - 1)
            if reason:
                break
        seq.num_computed_tokens = len(seq) - 1  # the accepted drafts' KV is written; the last token's is not
        self.block_manager.commit(seq, seq.num_computed_tokens)
        if reason:
            self._finish(seq, reason)
        else:
            self.block_manager.trim(seq)
        return TokenEvent(seq.request_id, seq.token_ids[start:], reason is not None, reason)

    @staticmethod
    def _take_prompt_logprobs(done: InFlight, values: list[float]) -> None:
        """Append each row's prompt log-probabilities in position order (a recomputation after preemption
        computes them again: those already taken are skipped)."""
        counts = done.batch.num_new_tokens
        starts = [c - n for c, n in zip(done.computed, counts)]  # each row's num_computed_tokens at launch
        at = 0
        for row, first, count in prompt_logprob_spans(done.batch.seqs, starts, counts):
            seq = done.batch.seqs[row]
            for pos in range(first, first + count):
                if pos == len(seq.prompt_logprobs) + 1:
                    seq.prompt_logprobs.append(values[at + pos - first])
            at += count

    def _eos_ids(self, p) -> set[int]:
        """EOS for a request: the engine's, or its end_id (-1: none)."""
        return self.eos_ids if p.end_id is None else ({p.end_id} if p.end_id >= 0 else set())

    def stop_token_ids(self, p: SamplingParams) -> set[int]:
        """The token ids that end a request with these settings: its stop_token_ids, and EOS unless ignore_eos
        (_stop_reason's test)."""
        return set(p.stop_token_ids) | (set() if p.ignore_eos else self._eos_ids(p))

    def _stop_reason(self, seq: Sequence, idx: int) -> str | None:
        """Whether the token at token_ids[idx] (just resolved) ends the request."""
        p, token = seq.params, seq.token_ids[idx]
        # (below min_tokens these were masked out of the logits: see stop_token_ids)
        if token in p.stop_token_ids or (not p.ignore_eos and token in self._eos_ids(p)):
            seq.stopped_on_token = True
            return "stop"
        if p.stop and self.tokenizer is not None and idx + 1 - seq.prompt_len >= p.min_tokens:  # (vLLM's rule)
            # only a stop string that this token completes: one in the text before it did not stop the request
            hit = stop_string_at(self.tokenizer, seq.token_ids[max(seq.prompt_len, idx - 31) : idx + 1], p.stop,
                                 p.skip_special_tokens)
            if hit is not None:
                seq.stop_string = hit[0]
                return "stop"
        if idx + 1 - seq.prompt_len >= p.max_new_tokens:
            return "length"
        return None

    def shutdown(self, drain: bool = False) -> None:
        """Stop the worker ranks: first finish what is in flight (drain) or cancel it."""
        while drain and self.has_unfinished():
            self.step()
        for request_id in list(self.requests):
            self.cancel(request_id)
        while self.inflight:  # let the pipeline empty, so no rank is left mid-step
            done = self.inflight.popleft()
            if done.result is None:
                comm.recv_object(self.mapping.sampler_rank)
            else:
                done.result.wait()
        self.worker.wait_sends()
        comm.broadcast_object(SHUTDOWN)
        comm.flush_broadcasts()
        comm.barrier()


def prompt_logprob_spans(seqs: list[Sequence], starts: list[int], counts: list[int]) -> list[tuple[int, int, int]]:
    """For each row of a step whose request asks for prompt log-probabilities: (row, position of the first prompt
    token its chunk predicts, how many). The token at position p predicts prompt token p + 1, so a chunk of
    positions [start, start + n) predicts tokens start + 1 .. min(start + n, prompt_len - 1)."""
    spans = []
    for row, (seq, start, n) in enumerate(zip(seqs, starts, counts)):
        last = min(start + n, seq.prompt_len - 1)
        if seq.params.prompt_logprobs and last > start:
            spans.append((row, start + 1, last - start))
    return spans


def serve_worker(worker: Worker) -> None:
    """The loop of every rank but 0: execute plans until the coordinator says shutdown."""
    m = worker.mapping
    while True:
        plan = comm.broadcast_object()
        if plan == SHUTDOWN:
            worker.wait_sends()
            comm.barrier()
            return
        result = worker.execute(plan)
        if m.rank == m.sampler_rank:
            comm.send_object(result.wait(), 0)
