"""One scheduling decision per step: who runs, with how many tokens, and who is preempted.

Running requests go first (a decode token each, or their next prefill chunk), then waiting requests
are admitted while KV blocks, `max_batch_size` and the token budget `max_num_tokens` allow. Decode
tokens and prefill chunks share one forward (chunked prefill), so a long prompt never stalls decoders.
When blocks run out, the newest running request is preempted (its blocks freed, recomputed later).
With the "priority" scheduling policy (vLLM's), the waiting queue is ordered by (priority, arrival), lower values
first, and the running request preempted is the one of the highest priority value (the newest among equals).
A prompt sampled n times is n requests; sequences 1..n-1 keep their place in the queue, without blocking
the requests behind them, until sequence 0 has computed the prompt, and then take its blocks from the
prefix cache (`Sequence.prefix_source`).

Two capacity policies, as TensorRT-LLM names them:
* "max_utilization" (the default): admit whatever fits now, preempt when decoding runs out of blocks;
* "guaranteed_no_evict": admit a request only if the pool can hold it and every running request up to
  their max_new_tokens (counting blocks not yet taken), so nothing is ever preempted; fewer requests run
  at once, but no prompt is computed twice (long outputs on a small pool preempt a lot otherwise).

Several steps can be in flight at once. With pipeline parallelism `schedule(busy)` leaves out the
requests of the micro-batches still in the pipeline. With overlap scheduling (one stage) the next step
takes the same requests again, one token further, while the current one runs. Neither ever preempts a
request that is in flight (`protected`), nor one already taken into the batch being built.
"""

from __future__ import annotations

import bisect
import time
from collections import deque
from dataclasses import dataclass

from dist_llm.runtime.block_manager import BlockManager
from dist_llm.runtime.sequence import Sequence, Status


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]
    num_new_tokens: list[int]
    preempted: list[Sequence]

    @property
    def is_decode(self) -> bool:
        return all(n == 1 and s.num_computed_tokens == len(s) - 1 for s, n in zip(self.seqs, self.num_new_tokens))

    def __len__(self) -> int:
        return len(self.seqs)


POLICIES = ("max_utilization", "guaranteed_no_evict")
SCHEDULING_POLICIES = ("fcfs", "priority")


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_batch_size: int, max_num_tokens: int,
                 policy: str = "max_utilization", max_seq_len: int | None = None,
                 scheduling_policy: str = "fcfs", propose=None):  # fmt: skip
        """`propose(seq) -> list[int]`: speculative draft tokens for a decoding request (runtime/speculative.py),
        or None (no speculation)."""
        if policy not in POLICIES:
            raise ValueError(f"unknown capacity scheduler policy {policy!r}; choose one of {', '.join(POLICIES)}")
        if scheduling_policy not in SCHEDULING_POLICIES:
            raise ValueError(f"unknown scheduling policy {scheduling_policy!r}; choose one of "
                             f"{', '.join(SCHEDULING_POLICIES)}")
        self.by_priority = scheduling_policy == "priority"
        self.bm = block_manager
        self.max_batch_size = max_batch_size
        self.max_num_tokens = max_num_tokens
        self.no_evict = policy == "guaranteed_no_evict"
        self.max_seq_len = max_seq_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.propose = propose

    @staticmethod
    def _rank(seq: Sequence) -> tuple:
        """The "priority" policy's order: lower priority value first, then earlier arrival."""
        return seq.priority, seq.arrival_time, seq.request_id

    def _queue(self, seq: Sequence, front: bool) -> None:
        """Into the waiting queue: by rank under the "priority" policy; else at the back, or the front (preempted)."""
        if self.by_priority:
            self.waiting.insert(bisect.bisect(self.waiting, self._rank(seq), key=self._rank), seq)
        elif front:
            self.waiting.appendleft(seq)
        else:
            self.waiting.append(seq)

    def add(self, seq: Sequence) -> None:
        self._queue(seq, front=False)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _blocks_to_come(self, seq: Sequence) -> int:
        """Blocks `seq` may still take before it finishes: its longest length, less the blocks it holds."""
        longest = seq.prompt_len + seq.params.max_new_tokens
        if self.max_seq_len is not None:
            longest = min(longest, self.max_seq_len)
        return max(0, -(-longest // self.bm.block_size) - len(seq.block_table))

    def _awaits_prefix(self, seq: Sequence) -> bool:
        """Whether `seq` (sequence j > 0 of a prompt sampled n times) should wait until sequence 0 has computed
        the prompt, so that the prefix cache serves it the prompt's full blocks instead of computing them again."""
        src = seq.prefix_source
        return (src is not None and self.bm.enable_prefix_caching and seq.reuses_prefix and not src.is_finished
                and src.num_generated == 0  # (nothing to wait for when the cache will not serve it, below)
                and seq.prompt_len > self.bm.block_size)  # (a prompt of one partial block has nothing to share)

    def _draft(self, seq: Sequence, most: int) -> int:
        """Append up to `most` speculative draft tokens to a decoding request (runtime/speculative.py): as many as
        `propose` gives, leave room for the token the step adds after them within max_new_tokens, and fit in the
        free blocks (drafts never preempt anything). Returns how many."""
        most = min(most, seq.params.max_new_tokens - seq.num_sampled - 1)
        drafts = self.propose(seq)[:most] if most > 0 else []
        while drafts and self.bm.blocks_needed(len(seq) + len(drafts)) - len(seq.block_table) > \
                self.bm.num_free_blocks:
            drafts.pop()
        seq.token_ids += drafts
        seq.num_drafts = len(drafts)
        return len(drafts)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.bm.free(seq)
        seq.num_computed_tokens = 0
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self._queue(seq, front=True)

    def _make_room(self, seq: Sequence, protected: set[int], preempted: list[Sequence]) -> bool:
        """Preempt the newest running requests (never one in flight) until `seq` can take a slot.
        False when `seq` itself was preempted or must wait for in-flight steps to come back."""
        while not self.bm.can_append(seq):
            victims = [s for s in self.running if s.request_id not in protected]
            if not victims:
                return False
            victim = max(victims, key=self._rank) if self.by_priority else victims[-1]
            if victim is seq and len(victims) < len(self.running):
                return False  # wait for the in-flight micro-batches to finish instead
            self._preempt(victim)
            preempted.append(victim)
            if victim is seq:
                return False
        return True

    def schedule(self, busy: set[int] | None = None, protected: set[int] | None = None) -> ScheduledBatch:
        """`busy`: request ids to leave out (their previous micro-batch has not come back yet);
        `protected`: request ids that must not be preempted (in flight); defaults to `busy`."""
        busy = busy or set()
        # never preempt a request in flight, nor one this batch already took (its slot is in the plan)
        protected = set(busy if protected is None else protected)
        seqs, counts, preempted = [], [], []
        budget = self.max_num_tokens
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not Status.RUNNING or seq.request_id in busy:
                continue  # preempted while making room for an older request, or still in the pipeline
            if seq.num_sampled >= seq.params.max_new_tokens:
                continue  # its last token is in flight: it finishes when that step comes back
            remaining = len(seq) - seq.num_computed_tokens
            if remaining == 1:  # decode: the newest token needs a slot
                if self.propose is not None and seq.spec_skip:
                    seq.spec_skip -= 1  # (drafting backs off after misses: see runtime/speculative.py)
                elif self.propose is not None and budget > 1 and not seq.num_pending:
                    remaining += self._draft(seq, budget - 1)
                if not self.bm.can_append(seq) and not self._make_room(seq, protected, preempted):
                    continue
                self.bm.append_slot(seq)
            n = min(remaining, budget)
            seqs.append(seq)
            counts.append(n)
            protected.add(seq.request_id)
            budget -= n
        reserved = sum(self._blocks_to_come(s) for s in self.running) if self.no_evict and self.waiting else 0
        held = []  # sequences waiting for their prompt's KV from a sibling (they keep their place in the queue)
        while self.waiting and budget > 0 and len(self.running) < self.max_batch_size:
            seq = self.waiting[0]
            if self._awaits_prefix(seq):
                held.append(self.waiting.popleft())
                continue
            if not self.bm.can_allocate(seq):
                break
            if self.no_evict:  # its whole life must fit beside what the running requests may still take
                if self.bm.num_free_blocks - reserved < self._blocks_to_come(seq):
                    break
            self.waiting.popleft()
            self.bm.allocate(seq)
            if self.no_evict:
                reserved += self._blocks_to_come(seq)  # what it may take beyond the blocks it got
            seq.num_computed_tokens = seq.num_cached_tokens
            if seq.num_preemptions == 0:
                seq.reported_cached_tokens = seq.num_cached_tokens
                seq.first_scheduled_time = time.perf_counter()
            seq.status = Status.RUNNING
            self.running.append(seq)
            n = min(len(seq) - seq.num_computed_tokens, budget)
            seqs.append(seq)
            counts.append(n)
            budget -= n
        self.waiting.extendleft(reversed(held))
        # rows of one query token first (a stable partition): a mixed step's attention serves them with the decode
        # kernel and the prompt chunks after them with the context kernel
        order = sorted(range(len(seqs)), key=lambda i: counts[i] != 1)
        return ScheduledBatch([seqs[i] for i in order], [counts[i] for i in order], preempted)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Remove a request at once and free its blocks (finished or cancelled)."""
        if seq in self.running:
            self.running.remove(seq)
            self.bm.free(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        seq.finished_time = time.perf_counter()
