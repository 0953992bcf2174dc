"""BlockManager: allocation, prefix reuse, eviction, and a random-operation state machine."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from dist_llm.runtime.block_manager import BlockManager

BS = 4


@dataclass(eq=False)
class Seq:
    token_ids: list[int]
    block_table: list[int] = field(default_factory=list)
    num_cached_tokens: int = 0


def snapshot(bm: BlockManager, *seqs: Seq):
    return (
        list(bm._free), list(bm._evictable), list(bm._ref), dict(bm._hash_to_block),
        [(list(s.block_table), s.num_cached_tokens) for s in seqs],
    )  # fmt: skip


def prefill(bm: BlockManager, tokens: list[int]) -> Seq:
    """Allocate and compute the whole prompt."""
    seq = Seq(list(tokens))
    bm.allocate(seq)
    bm.commit(seq, len(tokens))
    bm.check_invariants()
    return seq


def test_validation():
    for bad in [(0, 4), (4, 0), (-1, 4), (4, 2.0)]:
        with pytest.raises(ValueError):
            BlockManager(*bad)
    bm = BlockManager(4, BS)
    with pytest.raises(ValueError, match="no tokens"):
        bm.allocate(Seq([]))
    seq = prefill(bm, [1, 2, 3])
    with pytest.raises(ValueError, match="already"):
        bm.allocate(seq)
    with pytest.raises(ValueError, match="num_computed_tokens"):
        bm.commit(seq, 4)
    with pytest.raises(ValueError, match="not allocated"):
        bm.commit(Seq([1]), 1)


def test_allocate_free_returns_pool():
    bm = BlockManager(8, BS)
    assert (bm.num_blocks, bm.block_size, bm.num_free_blocks) == (8, BS, 8)
    assert [bm.blocks_needed(n) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]
    a, b = Seq(list(range(9))), Seq(list(range(100, 104)))
    bm.allocate(a)
    bm.allocate(b)
    assert len(a.block_table) == 3 and len(b.block_table) == 1
    assert len(set(a.block_table + b.block_table)) == 4
    assert bm.num_free_blocks == 4 and a.num_cached_tokens == 0
    bm.free(a)
    bm.free(b)
    bm.free(b)  # freeing twice is a no-op
    assert a.block_table == [] and bm.num_free_blocks == 8
    bm.check_invariants()


def test_prefix_reuse_same_physical_blocks():
    bm = BlockManager(16, BS)
    prompt = list(range(10))  # 2 full blocks + 2 tokens
    a = prefill(bm, prompt)
    b = Seq(prompt[:8] + [7, 7, 7])
    bm.allocate(b)
    assert b.num_cached_tokens == 2 * BS
    assert b.block_table[:2] == a.block_table[:2]
    assert b.block_table[2] not in a.block_table
    assert bm._ref[a.block_table[0]] == 2
    bm.check_invariants()


def test_reuse_only_after_commit():
    bm = BlockManager(16, BS)
    prompt = list(range(9))
    a = Seq(list(prompt))
    bm.allocate(a)
    b = Seq(list(prompt))
    bm.allocate(b)  # a's KV is not written yet
    assert b.num_cached_tokens == 0 and not set(a.block_table) & set(b.block_table)
    bm.commit(a, 5)  # only block 0 is full and computed
    c = Seq(list(prompt))
    bm.allocate(c)
    assert c.num_cached_tokens == BS and c.block_table[0] == a.block_table[0]
    bm.check_invariants()


def test_partial_last_block_never_shared():
    bm = BlockManager(16, BS)
    a = prefill(bm, list(range(6)))
    b = Seq(list(range(6)) + [9, 9, 9])
    bm.allocate(b)
    assert b.num_cached_tokens == BS
    assert b.block_table[1] != a.block_table[1]
    assert bm.num_cached_blocks == 1


def test_full_prompt_match_leaves_one_token():
    bm = BlockManager(16, BS)
    a = prefill(bm, list(range(8)))  # exactly 2 full blocks, both registered
    assert bm.num_cached_blocks == 2
    b = Seq(list(range(8)))
    bm.allocate(b)
    assert b.num_cached_tokens == BS  # (8 - 1) // 4 blocks, not 2
    assert b.block_table[0] == a.block_table[0] and b.block_table[1] != a.block_table[1]
    bm.commit(b, 8)  # same hash as a's block 1: a keeps it, b's copy stays private
    assert bm._hash_of[b.block_table[1]] is None
    c = Seq(list(range(9)))
    bm.allocate(c)
    assert c.num_cached_tokens == 2 * BS and c.block_table[:2] == a.block_table
    bm.check_invariants()


def test_reuse_stops_at_first_miss():
    bm = BlockManager(16, BS)
    prefill(bm, [0] * 4 + [1] * 4 + [2] * 4 + [3])
    b = Seq([0] * 4 + [5] * 4 + [2] * 4 + [3])  # block 1 differs, so block 2's chain hash differs
    bm.allocate(b)
    assert b.num_cached_tokens == BS


def test_duplicate_hash_commit():
    bm = BlockManager(16, BS)
    prompt = list(range(9))
    a, b = Seq(list(prompt)), Seq(list(prompt))
    bm.allocate(a)
    bm.allocate(b)
    bm.commit(a, 9)
    bm.commit(b, 9)
    assert bm.num_cached_blocks == 2
    assert all(bm._hash_of[blk] is None for blk in b.block_table)
    bm.free(b)
    assert bm.num_free_blocks == 16 - 3  # b's private blocks went to the free list
    assert len(bm._evictable) == 0
    bm.free(a)
    assert len(bm._evictable) == 2 and bm.num_free_blocks == 16
    bm.check_invariants()


def test_free_shared_keeps_other_alive():
    bm = BlockManager(6, BS)
    prompt = list(range(9))
    a = prefill(bm, prompt)
    b = Seq(list(prompt))
    bm.allocate(b)
    shared = b.block_table[:2]
    bm.free(a)
    assert all(bm._ref[blk] == 1 for blk in shared)
    filler = Seq(list(range(50, 50 + 6 * BS)))
    assert not bm.can_allocate(filler)
    other = Seq(list(range(100, 100 + bm.num_free_blocks * BS)))  # takes every remaining block
    bm.allocate(other)
    assert not set(shared) & set(other.block_table)
    assert bm._hash_of[shared[0]] is not None
    bm.check_invariants()


def test_lru_eviction_order():
    bm = BlockManager(4, BS)
    a = prefill(bm, list(range(9)))  # blocks a0 a1 cached, a2 private
    a_blocks = list(a.block_table)
    bm.free(a)  # reverse order: a1 becomes evictable before a0
    assert list(bm._evictable) == [a_blocks[1], a_blocks[0]]
    x = Seq([50] * 12)  # 3 fresh blocks: the two free ones, then the LRU cached one (a1)
    bm.allocate(x)
    assert a_blocks[1] in x.block_table and a_blocks[0] not in x.block_table
    assert list(bm._evictable) == [a_blocks[0]]
    bm.free(x)  # x never committed: its blocks go to the free list
    y = Seq(list(range(9)))
    bm.allocate(y)  # a0 still cached, a1 was evicted
    assert y.num_cached_tokens == BS and y.block_table[0] == a_blocks[0]
    bm.check_invariants()


def test_reused_evictable_block_leaves_evictable_set():
    bm = BlockManager(4, BS)
    a = prefill(bm, list(range(5)))
    a0 = a.block_table[0]
    bm.free(a)
    assert list(bm._evictable) == [a0]
    b = Seq(list(range(5)))
    assert bm.can_allocate(b)
    bm.allocate(b)
    assert b.block_table[0] == a0 and bm._ref[a0] == 1 and not bm._evictable
    assert bm.num_free_blocks == 2
    bm.check_invariants()


def test_exhausted_pool_raises_without_changing_state():
    bm = BlockManager(3, BS)
    a = prefill(bm, list(range(9)))
    bm.free(a)  # 2 evictable + 1 free
    b = Seq(list(range(9)) + [7] * 8)  # 2 hits (both evictable) + 3 fresh > 1 left
    assert not bm.can_allocate(b)
    before = snapshot(bm, b)
    with pytest.raises(RuntimeError, match="3 new blocks"):
        bm.allocate(b)
    assert snapshot(bm, b) == before
    bm.check_invariants()

    c = prefill(bm, [5] * 12)  # takes all three blocks
    c.token_ids.append(5)
    assert not bm.can_append(c)
    before = snapshot(bm, c)
    with pytest.raises(RuntimeError, match="append_slot"):
        bm.append_slot(c)
    assert snapshot(bm, c) == before


def test_append_slot_and_decode_commit():
    bm = BlockManager(8, BS)
    a = prefill(bm, [1, 2, 3])
    for t in range(4, 12):
        a.token_ids.append(t)
        assert bm.can_append(a)
        n_before = len(a.block_table)
        bm.append_slot(a)
        assert len(a.block_table) * BS >= len(a.token_ids)
        assert len(a.block_table) - n_before == (1 if len(a.token_ids) % BS == 1 else 0)
        bm.commit(a, len(a.token_ids) - 1)  # the newest token's KV comes with the next step
    assert bm.num_cached_blocks == 2  # blocks filled during decode are registered
    b = Seq(list(range(1, 12)) + [0])
    bm.allocate(b)
    assert b.num_cached_tokens == 2 * BS and b.block_table[:2] == a.block_table[:2]
    bm.check_invariants()


def test_prefix_caching_disabled_and_reset():
    bm = BlockManager(8, BS, enable_prefix_caching=False)
    a = prefill(bm, list(range(9)))
    b = Seq(list(range(9)))
    bm.allocate(b)
    assert b.num_cached_tokens == 0 and bm.num_cached_blocks == 0
    bm.free(a)
    bm.free(b)
    assert bm.num_free_blocks == 8 and not bm._evictable

    bm = BlockManager(8, BS)
    a = prefill(bm, list(range(13)))
    bm.free(a)
    live = prefill(bm, [9] * 9)
    bm.reset_prefix_cache()
    assert bm.num_cached_blocks == 0 and bm.num_free_blocks == 8 - 3
    bm.check_invariants()
    bm.free(live)
    assert bm.num_free_blocks == 8 and not bm._evictable
    bm.check_invariants()


class BlockManagerMachine(RuleBasedStateMachine):
    """Random allocate / decode / commit / free traffic over a small token alphabet.

    The model `self.kv` maps each physical block to the token prefix whose KV it holds, so a reused
    block is checked to hold exactly the prompt's prefix, and a write is checked to hit a private block.
    """

    @initialize(
        num_blocks=st.integers(1, 24),
        block_size=st.sampled_from([1, 2, 3, 4]),
        caching=st.booleans(),
    )
    def setup(self, num_blocks, block_size, caching):
        self.bm = BlockManager(num_blocks, block_size, enable_prefix_caching=caching)
        self.bs = block_size
        self.seqs: list[Seq] = []
        self.computed: dict[int, int] = {}  # id(seq) -> tokens whose KV is written
        self.kv: dict[int, tuple[int, ...]] = {}
        self.history: list[list[int]] = []  # prompts and decoded sequences seen so far

    def owners(self, block: int) -> int:
        return sum(s.block_table.count(block) for s in self.seqs)

    def write_kv(self, seq: Seq, upto: int) -> None:
        for pos in range(self.computed[id(seq)], upto):
            block = seq.block_table[pos // self.bs]
            assert self.owners(block) == 1, "KV written into a shared block"
            self.kv[block] = tuple(seq.token_ids[: pos + 1])
        self.computed[id(seq)] = max(self.computed[id(seq)], upto)

    @rule(tokens=st.lists(st.integers(0, 3), min_size=1, max_size=12), prefill=st.booleans())
    def add_seq(self, tokens, prefill):
        self._add(tokens, prefill)

    @precondition(lambda self: self.history)
    @rule(
        idx=st.integers(0, 100),
        cut=st.integers(0, 16),
        suffix=st.lists(st.integers(0, 3), max_size=4),
        prefill=st.booleans(),
    )
    def add_related_seq(self, idx, cut, suffix, prefill):
        """A prompt sharing a prefix with an earlier sequence, so that prefix hits are common."""
        base = self.history[idx % len(self.history)]
        if base[:cut] + suffix:
            self._add(base[:cut] + suffix, prefill)

    def _add(self, tokens, prefill):
        """Allocate a new sequence; with `prefill`, also compute and commit its whole prompt."""
        seq = Seq(list(tokens))
        self.history.append(list(tokens))
        if not self.bm.can_allocate(seq):
            before = snapshot(self.bm, seq)
            with pytest.raises(RuntimeError):
                self.bm.allocate(seq)
            assert snapshot(self.bm, seq) == before
            return
        free_before = self.bm.num_free_blocks
        self.bm.allocate(seq)
        cached = seq.num_cached_tokens
        assert cached % self.bs == 0 and cached <= len(tokens) - 1
        n_cached = cached // self.bs
        for i, block in enumerate(seq.block_table):
            if i < n_cached:
                assert self.kv.get(block) == tuple(tokens[: (i + 1) * self.bs]), "reused wrong KV"
            else:
                assert self.owners(block) == 0, "fresh block already in use"
                self.kv.pop(block, None)
        assert len(seq.block_table) == self.bm.blocks_needed(len(tokens))
        shared = sum(1 for block in seq.block_table[:n_cached] if self.owners(block) > 0)
        assert free_before - self.bm.num_free_blocks == len(seq.block_table) - shared
        self.seqs.append(seq)
        self.computed[id(seq)] = cached
        if prefill:
            self.write_kv(seq, len(tokens))
            self.bm.commit(seq, len(tokens))

    @precondition(lambda self: self.seqs)
    @rule(idx=st.integers(0, 100), frac=st.one_of(st.just(1.0), st.floats(0, 1)))
    def commit(self, idx, frac):
        seq = self.seqs[idx % len(self.seqs)]
        done = self.computed[id(seq)]
        upto = done + round(frac * (len(seq.token_ids) - done))
        self.write_kv(seq, upto)
        self.bm.commit(seq, upto)

    @precondition(lambda self: self.seqs)
    @rule(idx=st.integers(0, 100), token=st.integers(0, 3))
    def decode(self, idx, token):
        seq = self.seqs[idx % len(self.seqs)]
        if self.computed[id(seq)] < len(seq.token_ids):
            return  # still prefilling
        seq.token_ids.append(token)
        if self.bm.can_append(seq):
            self.bm.append_slot(seq)
        else:
            before = snapshot(self.bm, seq)
            with pytest.raises(RuntimeError):
                self.bm.append_slot(seq)
            assert snapshot(self.bm, seq) == before
            seq.token_ids.pop()

    @precondition(lambda self: self.seqs)
    @rule(idx=st.integers(0, 100), twice=st.booleans())
    def free(self, idx, twice):
        seq = self.seqs.pop(idx % len(self.seqs))
        self.history.append(list(seq.token_ids))
        del self.computed[id(seq)]
        self.bm.free(seq)
        if twice:
            self.bm.free(seq)
        assert seq.block_table == [] and seq.num_cached_tokens == 0

    @invariant()
    def consistent(self):
        if not hasattr(self, "bm"):
            return
        self.bm.check_invariants()
        in_use = {b for s in self.seqs for b in s.block_table}
        assert self.bm.num_free_blocks + len(in_use) == self.bm.num_blocks
        assert all(r >= 0 for r in self.bm._ref)
        for s in self.seqs:
            assert len(s.block_table) * self.bs >= len(s.token_ids)

    def teardown(self):
        if not hasattr(self, "bm"):
            return
        for seq in self.seqs:
            self.bm.free(seq)
        self.seqs.clear()
        self.bm.check_invariants()
        assert self.bm.num_free_blocks == self.bm.num_blocks


BlockManagerMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)
test_block_manager_state_machine = BlockManagerMachine.TestCase
