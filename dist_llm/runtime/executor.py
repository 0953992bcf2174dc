"""The coordinator's loop on rank 0: requests in, one scheduled step at a time, tokens out.

Each step: schedule -> build a StepPlan -> broadcast it -> run this rank's shard -> receive the
sampled ids from the last stage -> append them, check stops, free finished requests' blocks.

With pipeline parallelism up to pp_size micro-batches (of disjoint requests) are in flight: rank 0
launches the next one into stage 0 while later stages still work on earlier ones, and completes them
in launch order.
"""

from __future__ import annotations

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
from dist_llm.runtime.plan import SHUTDOWN, StepPlan, StepResult
from dist_llm.runtime.scheduler import ScheduledBatch, Scheduler
from dist_llm.runtime.sequence import Sequence
from dist_llm.runtime.worker import Worker


@dataclass
class TokenEvent:
    """One step's news about one request (the unit of streaming)."""

    request_id: int
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None = None


class Executor:
    def __init__(self, worker: Worker, engine: EngineConfig, num_blocks: int, tokenizer=None):
        self.worker, self.engine, self.tokenizer = worker, engine, tokenizer
        b = engine.build
        self.block_manager = BlockManager(num_blocks, b.tokens_per_block)
        self.scheduler = Scheduler(self.block_manager, b.max_batch_size, b.max_num_tokens)
        self.requests: dict[int, Sequence] = {}  # unfinished requests only
        self.eos_ids = set(engine.model.eos_token_ids)
        self.mapping = worker.mapping
        self.steps = 0
        self.depth = self.mapping.pp_size  # micro-batches in flight at most
        self.inflight: deque[tuple[ScheduledBatch, StepResult | None]] = deque()
        self.max_inflight_seen = 0

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

    def enqueue(self, seq: Sequence) -> int:
        self.check_admissible(seq)
        if seq.seed is None:
            seq.seed = random.getrandbits(62) if seq.params.temperature > 0 else 0
        self.requests[seq.request_id] = seq
        self.scheduler.add(seq)
        return seq.request_id

    def cancel(self, request_id: int) -> None:
        seq = self.requests.pop(request_id, None)
        if seq is not None and not seq.is_finished:
            self.scheduler.finish(seq, "cancelled")

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work() or bool(self.inflight)

    def stream(self) -> Iterator[TokenEvent]:
        """Run steps while there is work, yielding every token as it is produced."""
        while self.has_unfinished():
            yield from self.step()

    # ---- one step -------------------------------------------------------------------------------

    def _plan(self, batch: ScheduledBatch) -> StepPlan:
        """Plain lists, one tensor per field at the end: this runs every step, for every request."""
        bs = self.engine.build.tokens_per_block
        ids, pos, slots, seq_lens, cu, rows = [], [], [], [], [0], []
        max_blocks = max(len(s.block_table) for s in batch.seqs)
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            start, end, table = seq.num_computed_tokens, seq.num_computed_tokens + n, seq.block_table
            ids += seq.token_ids[start:end]
            if n == 1:  # decode: the common case
                pos.append(start)
                slots.append(table[start // bs] * bs + start % bs)
            else:
                pos += range(start, end)
                slots += [table[p // bs] * bs + p % bs for p in range(start, end)]
            seq_lens.append(end)
            cu.append(cu[-1] + n)
            rows.append(table + [0] * (max_blocks - len(table)))
        params = [s.params for s in batch.seqs]
        return StepPlan(
            input_ids=torch.tensor(ids, dtype=torch.int64),
            positions=torch.tensor(pos, dtype=torch.int64),
            slot_mapping=torch.tensor(slots, dtype=torch.int64),
            block_tables=torch.tensor(rows, dtype=torch.int32),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
            cu_seqlens_q=torch.tensor(cu, dtype=torch.int32),
            max_seqlen_q=max(batch.num_new_tokens),
            is_decode=batch.is_decode,
            temperature=torch.tensor([p.temperature for p in params], dtype=torch.float32),
            top_k=torch.tensor([p.top_k for p in params], dtype=torch.int32),
            top_p=torch.tensor([p.top_p for p in params], dtype=torch.float32),
            seeds=torch.tensor([s.seed for s in batch.seqs], dtype=torch.int64),
            offsets=torch.tensor([s.num_generated for s in batch.seqs], dtype=torch.int64),
            sampling_mode=sampling_mode(params),
            return_logits=any(p.return_first_logits and s.num_generated == 0 for p, s in zip(params, batch.seqs)),
            return_logprobs=any(p.return_logprobs for p in params),
        )

    def _launch(self, batch: ScheduledBatch) -> None:
        plan = self._plan(batch)
        comm.broadcast_object(plan)
        result = self.worker.execute(plan)  # the result itself when rank 0 is also the last stage
        self.inflight.append((batch, result))
        self.max_inflight_seen = max(self.max_inflight_seen, len(self.inflight))

    def step(self) -> list[TokenEvent]:
        """Launch micro-batches until the pipeline is full, then complete the oldest one."""
        while len(self.inflight) < self.depth:
            busy = {s.request_id for b, _ in self.inflight for s in b.seqs}
            batch = self.scheduler.schedule(busy)
            if not batch.seqs:
                break
            self._launch(batch)
        if not self.inflight:
            if self.scheduler.has_work():
                raise RuntimeError("scheduler made no progress with requests pending (a bug: please report)")
            return []
        batch, result = self.inflight.popleft()
        if result is None:
            result = comm.recv_object(self.mapping.sampler_rank)
        self.steps += 1
        return self._complete(batch, result)

    def _complete(self, batch: ScheduledBatch, result: StepResult) -> list[TokenEvent]:
        now = time.perf_counter()
        events = []
        tokens = result.token_ids.tolist()  # one conversion, not one tensor index per request
        logprobs = result.logprobs.tolist() if result.logprobs is not None else None
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            if seq.is_finished:  # cancelled while its micro-batch was in the pipeline
                continue
            seq.num_computed_tokens += n
            self.block_manager.commit(seq, seq.num_computed_tokens)
            if seq.num_computed_tokens < len(seq):
                continue  # a prefill chunk that does not reach the end yet: its sample is not used
            token = tokens[i]
            if result.logits is not None and seq.num_generated == 0 and seq.params.return_first_logits:
                seq.first_logits = result.logits[i].clone()
            seq.token_ids.append(token)
            if logprobs is not None and seq.params.return_logprobs:
                seq.logprobs.append(logprobs[i])
            seq.token_times.append(now)
            if seq.first_token_time is None:
                seq.first_token_time = now
            reason = self._stop_reason(seq)
            if reason:
                self.scheduler.finish(seq, reason)
                del self.requests[seq.request_id]
            events.append(TokenEvent(seq.request_id, [token], reason is not None, reason))
        return events

    def _stop_reason(self, seq: Sequence) -> str | None:
        p, token = seq.params, seq.token_ids[-1]
        eos = self.eos_ids if p.end_id is None else ({p.end_id} if p.end_id >= 0 else set())
        if token in p.stop_token_ids or (not p.ignore_eos and token in eos):
            seq.stopped_on_token = True
            return "stop"
        if p.stop and self.tokenizer is not None:
            tail = self.tokenizer.decode(seq.output_token_ids[-32:], skip_special_tokens=True)
            if any(s in tail for s in p.stop):
                return "stop"
        if seq.num_generated >= p.max_new_tokens:
            return "length"
        return None

    def shutdown(self, drain: bool = False) -> None:
        """Stop the worker ranks: first finish what is in flight (drain) or cancel it."""
        while drain and self.has_unfinished():
            self.step()
        for request_id in list(self.requests):
            self.cancel(request_id)
        while self.inflight:  # let the pipeline empty, so no rank is left mid-step
            _, result = self.inflight.popleft()
            if result is None:
                comm.recv_object(self.mapping.sampler_rank)
        self.worker.wait_sends()
        comm.broadcast_object(SHUTDOWN)
        comm.flush_broadcasts()
        comm.barrier()


def sampling_mode(params) -> str:
    if all(p.temperature == 0 for p in params):
        return "greedy"
    if all(p.temperature == 0 or (p.top_k == 0 and p.top_p >= 1) for p in params):
        return "plain"
    return "full"


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
            comm.send_object(result, 0)
