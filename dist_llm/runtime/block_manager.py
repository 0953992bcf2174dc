"""Paged KV-cache block allocator with prefix reuse (see docs/architecture.md, "Block manager")."""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Protocol


class SequenceLike(Protocol):
    """What the block manager reads and writes on a sequence (duck typed)."""

    token_ids: list[int]
    block_table: list[int]
    num_cached_tokens: int


def chain_hash(parent: int | None, tokens: list[int]) -> int:
    """Hash of a full block: 8-byte blake2b of (parent block's hash, the block's tokens).

    Deterministic across processes (unlike `hash()` of a tuple, which is salted for str/bytes).
    """
    h = hashlib.blake2b(digest_size=8)
    if parent is not None:
        h.update(parent.to_bytes(8, "little"))
    h.update(array("q", tokens).tobytes())
    return int.from_bytes(h.digest(), "little")


@dataclass(slots=True)
class _SeqState:
    seq: SequenceLike  # held so that id(seq) stays unique while the sequence is allocated
    num_hashed: int  # leading blocks of seq.block_table whose chained hash is known
    last_hash: int | None  # hash of block num_hashed - 1 (None when num_hashed == 0)


class BlockManager:
    """Hands out fixed-size KV blocks to sequences and reuses computed prefix blocks by hash.

    Lifecycle of a sequence: `allocate` → (`commit`, `append_slot`)* → `free`.

    * `allocate(seq)` gives `seq` blocks for all of `seq.token_ids`. Leading *full* blocks whose chained
      hash is registered are shared instead of allocated, and `seq.num_cached_tokens` says how many
      prompt tokens they cover; the caller computes KV only for the tokens after that. At least one
      prompt token is always left to compute, so the model produces logits for the last one.
    * `commit(seq, n)` says the KV of the first `n` tokens is written. Only then do full blocks get
      their hash registered: a block is never offered for reuse before its KV exists.
    * `append_slot(seq)` makes `seq.block_table` cover `len(seq.token_ids)` (newest token included).
    * `free(seq)` drops the references. A block nobody references goes to the free list, or, when it
      has a registered hash, to the evictable cache (least recently used evicted first).

    Every block is in exactly one state: free (no hash), cached-free (hash, refcount 0, evictable) or
    in use (refcount > 0, with or without a hash). Operations are O(blocks of the sequence touched).
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(f"num_blocks must be a positive int, got {num_blocks!r}")
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        self._num_blocks = num_blocks
        self._block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref = [0] * num_blocks
        self._hash_of: list[int | None] = [None] * num_blocks
        self._hash_to_block: dict[int, int] = {}
        self._free: deque[int] = deque(range(num_blocks))
        self._evictable: OrderedDict[int, None] = OrderedDict()  # LRU first
        self._seqs: dict[int, _SeqState] = {}
        # the prefix cache's record (runtime/stats.py): full blocks found / not found, prompt tokens looked up / found
        self.reused_blocks = self.missed_blocks = self.queried_tokens = self.hit_tokens = 0

    @property
    def num_blocks(self) -> int:
        return self._num_blocks

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out now: free ones plus evictable cached ones."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        """Blocks referenced by at least one sequence."""
        return self._num_blocks - self.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        """Blocks holding reusable KV (a registered hash), in use or evictable."""
        return len(self._hash_to_block)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self._block_size)

    # ---- allocation ------------------------------------------------------------------------------

    def _match_prefix(self, seq: SequenceLike) -> list[tuple[int, int]]:
        """(hash, block) of the cached leading full blocks, capped to leave >= 1 token to compute."""
        if not self.enable_prefix_caching or not getattr(seq, "reuses_prefix", True):
            return []
        tokens, bs = seq.token_ids, self._block_size
        hits: list[tuple[int, int]] = []
        parent = None
        for i in range((len(tokens) - 1) // bs):
            parent = chain_hash(parent, tokens[i * bs : (i + 1) * bs])
            block = self._hash_to_block.get(parent)
            if block is None:
                break
            hits.append((parent, block))
        return hits

    def _shortfall(self, seq: SequenceLike, hits: list[tuple[int, int]]) -> tuple[int, int]:
        """(fresh blocks needed, blocks available for them) for allocating `seq` with these hits."""
        revived = sum(1 for _, b in hits if self._ref[b] == 0)  # hits leaving the evictable set
        return self.blocks_needed(len(seq.token_ids)) - len(hits), self.num_free_blocks - revived

    def can_allocate(self, seq: SequenceLike) -> bool:
        need, avail = self._shortfall(seq, self._match_prefix(seq))
        return need <= avail

    def allocate(self, seq: SequenceLike) -> None:
        """Give `seq` blocks for all of `seq.token_ids`; set `seq.num_cached_tokens`.

        Raises RuntimeError (state untouched) when the pool is too small: check `can_allocate` first.
        """
        if seq.block_table or id(seq) in self._seqs:
            raise ValueError("allocate: sequence already has blocks (free it first)")
        if not seq.token_ids:
            raise ValueError("allocate: sequence has no tokens")
        hits = self._match_prefix(seq)
        need, avail = self._shortfall(seq, hits)
        if need > avail:
            raise RuntimeError(
                f"allocate: {len(seq.token_ids)} tokens need {need} new blocks "
                f"({len(hits)} reused from cache) but only {avail} are available"
            )
        table = []
        for _, block in hits:
            if self._ref[block] == 0:
                del self._evictable[block]
            self._ref[block] += 1
            table.append(block)
        table.extend(self._take_block() for _ in range(need))
        seq.block_table = table
        seq.num_cached_tokens = len(hits) * self._block_size
        self._seqs[id(seq)] = _SeqState(seq, len(hits), hits[-1][0] if hits else None)
        if self.enable_prefix_caching and getattr(seq, "reuses_prefix", True):
            self.reused_blocks += len(hits)
            self.missed_blocks += (len(seq.token_ids) - 1) // self._block_size - len(hits)
            self.queried_tokens += len(seq.token_ids)
            self.hit_tokens += seq.num_cached_tokens

    def _take_block(self) -> int:
        if self._free:
            block = self._free.popleft()
        else:
            block, _ = self._evictable.popitem(last=False)
            del self._hash_to_block[self._hash_of[block]]
            self._hash_of[block] = None
        self._ref[block] = 1
        return block

    def _new_blocks_for_append(self, seq: SequenceLike) -> int:
        return max(0, self.blocks_needed(len(seq.token_ids)) - len(seq.block_table))

    def can_append(self, seq: SequenceLike) -> bool:
        return self._new_blocks_for_append(seq) <= self.num_free_blocks

    def append_slot(self, seq: SequenceLike) -> None:
        """Make room for the tokens already appended to `seq.token_ids` (the newest one included).

        Call it after appending a token and before the step that computes its KV. Afterwards
        `len(seq.block_table) * block_size >= len(seq.token_ids)`; a new block is taken only when the
        last one is full (more than one if several tokens were appended since the last call).
        Raises RuntimeError (state untouched) when no block is available: check `can_append` first.
        """
        if id(seq) not in self._seqs:
            raise ValueError("append_slot: sequence is not allocated")
        need = self._new_blocks_for_append(seq)
        if need > self.num_free_blocks:
            raise RuntimeError(
                f"append_slot: {len(seq.token_ids)} tokens need {need} new blocks "
                f"but only {self.num_free_blocks} are available"
            )
        seq.block_table.extend(self._take_block() for _ in range(need))

    def trim(self, seq: SequenceLike) -> None:
        """Give back the blocks beyond what `seq.token_ids` needs (after tokens were cut from its end: rejected
        speculative drafts). The blocks given back are its newest, never hashed (commit covers computed tokens
        only, and the caller commits only the kept ones), held by no other sequence."""
        state = self._seqs.get(id(seq))
        if state is None:
            raise ValueError("trim: sequence is not allocated")
        keep = self.blocks_needed(len(seq.token_ids))
        for block in seq.block_table[keep:]:
            assert self._ref[block] == 1 and self._hash_of[block] is None, "trim: a shared or hashed block"
            self._ref[block] = 0
            self._free.append(block)
        del seq.block_table[keep:]
        assert state.num_hashed <= keep, "trim: a hashed block would go"

    # ---- prefix cache ----------------------------------------------------------------------------

    def commit(self, seq: SequenceLike, num_computed_tokens: int) -> None:
        """Record that KV for the first `num_computed_tokens` tokens of `seq` is written.

        Registers the chained hash of every block that is now full and computed. When another block
        already holds the same hash (two sequences computed the same prefix at once), the first keeps
        it and this block stays private. Committing fewer tokens than before is a no-op.
        """
        state = self._seqs.get(id(seq))
        if state is None:
            raise ValueError("commit: sequence is not allocated")
        bs, tokens, table = self._block_size, seq.token_ids, seq.block_table
        if not 0 <= num_computed_tokens <= min(len(tokens), len(table) * bs):
            raise ValueError(
                f"commit: num_computed_tokens={num_computed_tokens} outside [0, "
                f"{min(len(tokens), len(table) * bs)}] (tokens={len(tokens)}, blocks={len(table)})"
            )
        if not self.enable_prefix_caching:
            return
        for i in range(state.num_hashed, num_computed_tokens // bs):
            state.last_hash = chain_hash(state.last_hash, tokens[i * bs : (i + 1) * bs])
            block = table[i]
            if self._hash_of[block] is None and state.last_hash not in self._hash_to_block:
                self._hash_of[block] = state.last_hash
                self._hash_to_block[state.last_hash] = block
            state.num_hashed = i + 1

    def free(self, seq: SequenceLike) -> None:
        """Drop `seq`'s references (last block first, so chain tails are evicted before heads).

        Clears `seq.block_table` and `seq.num_cached_tokens`. Freeing an unallocated sequence is a no-op.
        """
        state = self._seqs.pop(id(seq), None)
        if state is None:
            if seq.block_table:
                raise ValueError("free: sequence has a block table this manager did not hand out")
            return
        for block in reversed(seq.block_table):
            self._ref[block] -= 1
            if self._ref[block] == 0:
                if self._hash_of[block] is None:
                    self._free.append(block)
                else:
                    self._evictable[block] = None  # most recently used end
        seq.block_table = []
        seq.num_cached_tokens = 0

    def reset_prefix_cache(self) -> None:
        """Forget every registered hash; evictable blocks go back to the free list."""
        for block in self._evictable:
            self._free.append(block)
        self._evictable.clear()
        for block in self._hash_to_block.values():
            self._hash_of[block] = None
        self._hash_to_block.clear()

    # ---- checking --------------------------------------------------------------------------------

    def check_invariants(self) -> None:
        """O(num_blocks) consistency check for tests; raises AssertionError on corruption."""
        free, evictable = set(self._free), set(self._evictable)
        assert len(free) == len(self._free), "block on the free list twice"
        assert not free & evictable, "block both free and evictable"
        expected = [0] * self._num_blocks
        for state in self._seqs.values():
            for block in state.seq.block_table:
                expected[block] += 1
            assert state.num_hashed <= len(state.seq.block_table)
        assert expected == self._ref, f"refcounts {self._ref} != block-table counts {expected}"
        for block in range(self._num_blocks):
            in_use = self._ref[block] > 0
            assert in_use + (block in free) + (block in evictable) == 1, f"block {block} state"
            if block in free:
                assert self._hash_of[block] is None, f"free block {block} has a hash"
            if block in evictable:
                assert self._hash_of[block] is not None, f"evictable block {block} has no hash"
            h = self._hash_of[block]
            if h is not None:
                assert self._hash_to_block.get(h) == block, f"block {block} hash not registered"
        for h, block in self._hash_to_block.items():
            assert self._hash_of[block] == h, f"hash table entry for block {block} is stale"
