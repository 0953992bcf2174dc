"""Scheduler decisions that the end-to-end batching tests reach only by chance."""

from __future__ import annotations

import pytest

from dist_llm.runtime.block_manager import BlockManager
from dist_llm.runtime.scheduler import Scheduler
from dist_llm.runtime.sequence import SamplingParams, Sequence, Status


def _decoding_pair(num_blocks: int):
    """Two requests A (older) and B, each past its 4-token prompt with one new token that needs a new
    block, and one free block between them."""
    bm = BlockManager(num_blocks, 4, enable_prefix_caching=False)
    sched = Scheduler(bm, max_batch_size=8, max_num_tokens=64)
    a = Sequence([1, 2, 3, 4], SamplingParams(max_new_tokens=8))
    b = Sequence([5, 6, 7, 8], SamplingParams(max_new_tokens=8))
    for seq in (a, b):
        sched.add(seq)
    assert sched.schedule().seqs == [a, b]
    for seq in (a, b):
        seq.num_computed_tokens = 4
        seq.token_ids.append(9)
    assert bm.num_free_blocks == num_blocks - 2
    return sched, a, b


def test_a_request_taken_into_the_batch_is_never_preempted_for_a_later_one():
    """Overlap scheduling: B is in flight (protected), A is not. A takes the last free block; B then finds
    none, and the only request it could preempt is A, already in this batch: B must wait instead (the
    bug was a plan holding A with its blocks freed, an IndexError on the GPU at 128/2048)."""
    sched, a, b = _decoding_pair(num_blocks=3)
    batch = sched.schedule(busy=set(), protected={b.request_id})
    assert batch.seqs == [a] and batch.preempted == []
    for seq in batch.seqs:
        assert seq.status is Status.RUNNING
        assert len(seq.block_table) * 4 >= len(seq.token_ids)
    assert b.status is Status.RUNNING and sched.num_preemptions == 0


def test_newest_unprotected_request_is_preempted_to_make_room():
    """Without protection, A (older) needs the block: B, the newest, is preempted and recomputed later."""
    sched, a, b = _decoding_pair(num_blocks=2)
    batch = sched.schedule(busy=set(), protected=set())
    assert batch.seqs == [a] and batch.preempted == [b]
    assert b.status is Status.WAITING and b.block_table == [] and b.num_computed_tokens == 0
    assert sched.waiting[0] is b and sched.num_preemptions == 1


def _policy_scheduler(policy: str, num_blocks: int, max_new_tokens: int):
    bm = BlockManager(num_blocks, 4, enable_prefix_caching=False)
    sched = Scheduler(bm, max_batch_size=8, max_num_tokens=64, policy=policy)
    seqs = [Sequence([1, 2, 3, 4], SamplingParams(max_new_tokens=max_new_tokens)) for _ in range(3)]
    for seq in seqs:
        sched.add(seq)
    return sched, seqs


def _decode_to_the_end(sched: Scheduler) -> None:
    """Run decode steps (every computed token gets a new one) until no request is left."""
    for _ in range(100):
        if not sched.has_work():
            return
        batch = sched.schedule()
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed_tokens += n
            if seq.num_computed_tokens == len(seq):
                seq.token_ids.append(7)
        for seq in list(sched.running):
            if seq.num_generated >= seq.params.max_new_tokens:
                sched.finish(seq, "length")
    raise AssertionError("requests did not finish")


def test_guaranteed_no_evict_admits_only_what_can_finish():
    """Each request lives 4 + 8 tokens = 3 blocks: a pool of 7 holds two lifetimes, not three. Max
    utilization admits all three at once (1 block each) and preempts later; no-evict admits two, then the
    third when one finishes, and never preempts."""
    sched, seqs = _policy_scheduler("guaranteed_no_evict", 7, 8)
    assert sched.schedule().seqs == seqs[:2]
    _decode_to_the_end(sched)
    assert sched.num_preemptions == 0 and all(s.num_generated == 8 for s in seqs)
    assert sched.bm.num_free_blocks == 7

    sched, seqs = _policy_scheduler("max_utilization", 7, 8)
    assert sched.schedule().seqs == seqs
    _decode_to_the_end(sched)
    assert sched.num_preemptions > 0 and all(s.num_generated == 8 for s in seqs)


def test_unknown_policy_is_refused():
    import pytest

    with pytest.raises(ValueError, match="guaranteed_no_evict"):
        Scheduler(BlockManager(4, 4), 8, 64, policy="fifo")


def test_one_token_rows_come_first_in_a_mixed_batch():
    """A mixed batch lists its rows of one query token first (a stable partition), so that the step's attention
    serves rows [0, n) with the decode kernel. Running requests are scheduled oldest first, so a newer decoder
    follows an older request still prefilling when, as under pipeline parallelism, the older one was busy
    (in flight) at the step that admitted the newer one."""
    bm = BlockManager(64, 4, enable_prefix_caching=False)
    sched = Scheduler(bm, max_batch_size=8, max_num_tokens=12)
    a = Sequence(list(range(1, 21)), SamplingParams(max_new_tokens=4))
    sched.add(a)
    assert sched.schedule().num_new_tokens == [12]
    a.num_computed_tokens = 12
    b = Sequence([1, 2, 3], SamplingParams(max_new_tokens=4))
    c = Sequence([4, 5, 6], SamplingParams(max_new_tokens=4))
    sched.add(b)
    assert sched.schedule(busy={a.request_id}).seqs == [b]  # a is in flight: b is admitted beside it
    b.num_computed_tokens = 3
    b.token_ids.append(7)
    sched.add(c)
    batch = sched.schedule()  # a: its last 8 prompt tokens; b: one decode token; c: the 3 left in the budget
    assert batch.seqs == [b, a, c] and batch.num_new_tokens == [1, 8, 3]


def test_priority_policy_orders_the_queue():
    """"priority": the waiting queue by (priority, arrival), lower first, and a preempted request goes back by
    its rank, not to the front. "fcfs" (the default) keeps arrival order and puts a preempted request first."""
    for policy in ("priority", "fcfs"):
        sched = Scheduler(BlockManager(16, 4), max_batch_size=2, max_num_tokens=64, scheduling_policy=policy)
        low_old, high, low_new, mid = (Sequence([1, 2, 3, 4], SamplingParams(max_new_tokens=8), priority=p)
                                       for p in (5, 0, 5, 1))
        for seq in (low_old, high, low_new, mid):
            sched.add(seq)
        if policy == "fcfs":
            assert list(sched.waiting) == [low_old, high, low_new, mid]
            continue
        assert list(sched.waiting) == [high, mid, low_old, low_new]
        assert sched.schedule().seqs == [high, mid]
        urgent = Sequence([7, 8], SamplingParams(max_new_tokens=8), priority=0)
        sched.add(urgent)
        sched._preempt(mid)
        assert list(sched.waiting) == [urgent, mid, low_old, low_new]


@pytest.mark.parametrize("policy", ["fcfs", "priority"])
def test_priority_victim_is_the_highest_value_even_when_older(policy):
    """Two requests, the low-priority one admitted first, each needing a block with none free: fcfs preempts the
    newest (the high-priority one), "priority" the low-priority one, though it is older and decodes first."""
    bm = BlockManager(2, 4, enable_prefix_caching=False)
    sched = Scheduler(bm, max_batch_size=8, max_num_tokens=64, scheduling_policy=policy)
    low = Sequence([1, 2, 3, 4], SamplingParams(max_new_tokens=8), priority=9)
    high = Sequence([5, 6, 7, 8], SamplingParams(max_new_tokens=8), priority=0)
    sched.add(low)
    assert sched.schedule().seqs == [low]
    sched.add(high)
    assert sched.schedule(busy={low.request_id}).seqs == [high]  # (low's step in flight)
    for seq in (low, high):
        seq.num_computed_tokens = 4
        seq.token_ids.append(9)
    batch = sched.schedule(busy=set(), protected=set())
    kept, preempted = (low, high) if policy == "fcfs" else (high, low)
    assert batch.seqs == [kept] and batch.preempted == [preempted]
