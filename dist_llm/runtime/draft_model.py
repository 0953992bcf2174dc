"""Speculative decoding with a draft model (vLLM's `speculative_config={"model": ...}`, TensorRT-LLM's
draft-target model): a small model of the same vocabulary proposes each request's next k tokens, and the target
checks them all in one step (runtime/speculative.py: the same acceptance, so the same tokens as plain decoding).

The draft is an engine of its own, built with tp = pp = 1 (`dist_llm.build ... --tp_size 1`), and runs whole on
rank 0, beside that rank's shard of the target, as vLLM runs a draft of tensor-parallel size 1. Rank 0's scheduler
asks it for drafts once per step (`propose`), for every request that is about to decode; the other ranks never see
it, and no collective is added.

Its KV cache is a paged pool of its own, with a block manager of its own (prefix caching included), sized for its
engine's max_batch_size x max_seq_len tokens. Each request keeps its draft state between steps (`DraftState`): the
tokens the draft has KV for, which are the request's tokens, then the drafts it fed itself last time. A step then
  1. finds where those tokens and the request's tokens now part (the drafts the target kept are still good KV);
  2. computes the tokens after that point in one forward (usually one or two: the target's own last token, and the
     draft's last draft when all were kept), which samples draft 1;
  3. feeds each draft back for the next, k - 1 decode steps in all. They replay the draft's decode CUDA graphs, and
     each reads its input from the previous step's sampled ids on the device, so the host waits once, at the end.
Each draft is sampled as its request samples (greedy, or its temperature, top-k, top-p and min-p), with the
request's seed at the output position it drafts: the same noise as the target's own sampling there. The target
keeps a draft where its sampling draws that token (runtime/speculative.py), so the output is exactly plain
sampling's; with the noise shared, a draft that is close to the target draws what the target draws most of the
time (the Gumbel-max coupling of the two distributions), where an independent or greedy draft would not.
Logits processing (penalties, biases, bad words) is the target's alone: the draft does not apply it. Unlike n-gram
lookups, a step that keeps no draft does not make the request back off: a draft model misses now and then, not in
runs. Only a request that the draft's pool cannot take backs off (runtime/speculative.py's back-off).
"""

from __future__ import annotations

import logging
import os

import torch

from dist_llm.config import EngineConfig
from dist_llm.errors import DistLLMError
from dist_llm.parallel.state import single_rank_scope
from dist_llm.runtime.block_manager import BlockManager
from dist_llm.runtime.kv_sizing import default_cpu_blocks
from dist_llm.runtime.plan import StepPlan, StepResult, mixed_decode_split, paged_inputs, sampling_inputs
from dist_llm.runtime.sequence import PENDING
from dist_llm.runtime.worker import TokenReturn, Worker

log = logging.getLogger("dist_llm")


class DraftState:
    """A request as the draft sees it: the tokens it has KV for (`num_computed_tokens` of `token_ids`), in its
    own block table. `committed`: how many of them are the request's own tokens (never rewritten: the prefix cache
    may hash their blocks); the rest are drafts it fed itself."""

    def __init__(self, request_id: int, tokens: list[int]):
        self.request_id = request_id
        self.request = None  # the request now drafted for (its sampling parameters and seed)
        self.token_ids = list(tokens)
        self.block_table: list[int] = []
        self.num_cached_tokens = 0
        self.num_computed_tokens = 0
        self.committed = 0


def check_draft_engine(draft: EngineConfig, target: EngineConfig, engine_dir: str) -> None:
    m = draft.mapping
    if (m.tp_size, m.pp_size) != (1, 1):
        raise DistLLMError(f"the draft engine {engine_dir} was built with tp_size {m.tp_size} and pp_size {m.pp_size}; "
                           "a draft runs whole on rank 0: build it with --tp_size 1 --pp_size 1")
    if draft.model.vocab_size != target.model.vocab_size:
        raise DistLLMError(f"the draft engine's vocabulary ({draft.model.vocab_size} tokens, {engine_dir}) differs "
                           f"from the target's ({target.model.vocab_size}): a draft must share the target's tokenizer")
    if draft.build.max_seq_len < target.build.max_seq_len:
        raise DistLLMError(f"the draft engine's max_seq_len ({draft.build.max_seq_len}, {engine_dir}) is below the "
                           f"target's ({target.build.max_seq_len}): rebuild the draft with --max_seq_len "
                           f"{target.build.max_seq_len} or more")


class DraftModel:
    """The draft engine on rank 0 and each request's draft state. `cuda_graphs`: "capture", "static" or "off", for
    decode steps and for steps of up to `piecewise_graph_max_tokens` tokens (as the target's)."""

    def __init__(self, engine_dir: str, target: EngineConfig, kernel_backend: str, num_speculative_tokens: int,
                 cuda_graphs: str = "off", piecewise_graph_max_tokens: int = 512):  # fmt: skip
        if not os.path.isfile(os.path.join(engine_dir, "engine.json")):
            raise DistLLMError(f"no draft engine at {engine_dir!r} (engine.json is missing): build one with "
                               "`python -m dist_llm.build ... --tp_size 1` and pass its directory")
        engine = EngineConfig.load(engine_dir)
        check_draft_engine(engine, target, engine_dir)
        b = engine.build
        with single_rank_scope() as state:
            self.worker = w = Worker(engine_dir, engine, state, kernel_backend)
            # every draft step of one call is in flight before the host reads any: a pinned buffer for each
            w.token_return = TokenReturn(w.sampled.shape[0], w.device, depth=num_speculative_tokens + 2)
            num_blocks = default_cpu_blocks(w)  # (every slot of its batch at full length, on any device)
            # (the catch-up forwards of two tokens a request replay the piecewise graphs)
            w.start(num_blocks, cuda_graphs, piecewise_graph_max_tokens)
        self.engine, self.block_manager = engine, BlockManager(num_blocks, b.tokens_per_block)
        self.states: dict[int, DraftState] = {}
        self.decode_split = mixed_decode_split()
        self.forwards = self.tokens_computed = 0  # (tests and benchmarks: the draft's work)
        self.num_short = 0  # requests that could not draft in a step for want of blocks in the draft's pool
        log.info("draft model %s: %d layers, KV pool of %d blocks of %d tokens", engine.model.architecture,
                 engine.model.num_layers, num_blocks, b.tokens_per_block)

    # ---- each request's state ---------------------------------------------------------------------

    def release(self, request_id: int) -> None:
        state = self.states.pop(request_id, None)
        if state is not None and state.block_table:
            self.block_manager.free(state)

    def _sync(self, seq, k: int) -> DraftState | None:
        """`seq`'s draft state, moved to its tokens now, with blocks for them and for k - 1 fed drafts; None when
        the pool cannot give them."""
        bm, tokens = self.block_manager, seq.token_ids
        state = self.states.get(seq.request_id)
        if state is None:
            state = DraftState(seq.request_id, tokens)
            if not bm.can_allocate(state):
                return None
            bm.allocate(state)
            state.num_computed_tokens = state.num_cached_tokens
            self.states[seq.request_id] = state
        else:
            same = state.committed  # the request's tokens then are a prefix of its tokens now
            top = min(state.num_computed_tokens, len(tokens))
            while same < top and state.token_ids[same] == tokens[same]:
                same += 1  # (drafts the target kept: their KV is good)
            state.num_computed_tokens = min(same, len(tokens) - 1)  # (at least one token to compute: its sample)
            state.token_ids = list(tokens)
            bm.trim(state)
        if bm.blocks_needed(len(tokens) + k - 1) - len(state.block_table) > bm.num_free_blocks:
            return None
        state.token_ids += [PENDING] * (k - 1)  # the slots of the drafts it will feed itself, taken now
        bm.append_slot(state)
        del state.token_ids[len(tokens) :]
        state.request = seq
        return state

    # ---- drafting ---------------------------------------------------------------------------------

    @torch.inference_mode()
    def propose(self, seqs: list, ks: list[int]) -> list[list[int]]:
        """Up to ks[i] draft tokens for each request of `seqs` (decoding, its newest token known), sampled as the
        request samples; [] where the draft's pool is short. Draft states of requests not in `seqs` stay (`release`
        drops them)."""
        states = [self._sync(s, k) if k > 0 else None for s, k in zip(seqs, ks)]
        if any(st is None for st, k in zip(states, ks) if k > 0):  # short: free what other requests hold
            keep = {s.request_id for s in seqs}
            for rid in [r for r in self.states if r not in keep]:
                self.release(rid)
            states = [st or (self._sync(s, k) if k > 0 else None) for st, s, k in zip(states, seqs, ks)]
            self.num_short += sum(st is None for st, k in zip(states, ks) if k > 0)
        drafts: list[list[int]] = [[] for _ in seqs]
        todo = [i for i, st in enumerate(states) if st is not None]
        most = self.engine.build.max_batch_size
        with single_rank_scope():
            for g in range(0, len(todo), most):
                group = todo[g : g + most]
                for i, d in zip(group, self._draft([states[i] for i in group], [ks[i] for i in group])):
                    drafts[i] = d
        return drafts

    def _draft(self, states: list[DraftState], ks: list[int]) -> list[list[int]]:
        """The drafts of one batch of requests: their catch-up forward(s), then the chain of decode steps."""
        # where each request's drafts are sampled: (forward, row of its sampled ids); the host reads them at the end
        where: list[list[tuple[int, int]]] = [[] for _ in states]
        results: list[StepResult] = []
        pending = list(range(len(states)))
        while pending:  # the tokens each has no KV for, within the draft's token budget per forward
            rows, budget = [], self.engine.build.max_num_tokens
            for i in pending:
                n = min(len(states[i].token_ids) - states[i].num_computed_tokens, budget)
                if n == 0:
                    break
                rows.append((i, n))
                budget -= n
            results.append(self._forward(states, rows, where, results))
            pending = [i for i in pending if states[i].num_computed_tokens < len(states[i].token_ids)]
        for st in states:  # their own tokens' KV is written: full blocks of it may serve other requests
            st.committed = len(st.token_ids)
            self.block_manager.commit(st, st.committed)
        for j in range(1, max(ks)):  # draft j + 1, from draft j fed back (its id is on the device: `where`)
            live = [i for i, k in enumerate(ks) if k > j]
            for i in live:
                states[i].token_ids.append(PENDING)
            results.append(self._forward(states, [(i, 1) for i in live], where, results))
        ids = [r.wait().token_ids.tolist() for r in results]
        drafts = [[ids[f][row] for f, row in w] for w in where]
        for st, d in zip(states, drafts):
            st.token_ids[st.committed :] = d[: len(st.token_ids) - st.committed]  # the fed drafts' ids, now known
        return drafts

    def _forward(self, states: list[DraftState], rows: list[tuple[int, int]], where, results) -> StepResult:
        """One draft forward over `rows` ((state index, tokens to compute)), not waited for. A fed draft
        sampled by the forward before is read from its sampled ids on the device; an older one from the host."""
        f = len(results)
        rows = sorted(rows, key=lambda r: r[1] != 1)  # rows of one token first (a mixed step's decode split)
        seqs, counts = [states[i] for i, _ in rows], [n for _, n in rows]
        ids, pos, slots, seq_lens, cu, table, waiting = paged_inputs(seqs, counts, self.engine.build.tokens_per_block,
                                                                     PENDING)
        prev = None
        for r in waiting:  # a fed draft: where[i][-1] sampled it
            last, (src, src_row) = cu[r + 1] - 1, where[rows[r][0]][-1]
            if src == f - 1:
                prev = prev or [-1] * len(ids)
                prev[last] = src_row
            else:  # (an earlier catch-up forward's: only when one forward could not hold them all)
                ids[last] = int(results[src].wait().token_ids[src_row])
        for r, (i, n) in enumerate(rows):
            states[i].num_computed_tokens += n
            if states[i].num_computed_tokens == len(states[i].token_ids):
                where[i].append((f, r))  # this row samples its next draft
        # each row samples as its request does, with its seed at the output position it drafts: the target keeps a
        # draft where its own sampling, with the same noise, draws it
        params = [states[i].request.params for i, _ in rows]
        offsets = [states[i].request.num_sampled + len(where[i]) - 1 for i, _ in rows]
        plan = StepPlan(
            input_ids=torch.tensor(ids, dtype=torch.int64), positions=torch.tensor(pos, dtype=torch.int64),
            slot_mapping=torch.tensor(slots, dtype=torch.int64), block_tables=torch.tensor(table, dtype=torch.int32),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32), cu_seqlens_q=torch.tensor(cu, dtype=torch.int32),
            max_seqlen_q=max(counts), is_decode=all(n == 1 for n in counts),
            **sampling_inputs(params, [states[i].request.seed for i, _ in rows], offsets),
            prev_index=None if prev is None else torch.tensor(prev, dtype=torch.int64),
            num_decode_rows=next((r for r, n in enumerate(counts) if n != 1), len(rows)) if self.decode_split else 0,
        )
        self.forwards += 1
        self.tokens_computed += len(ids)
        return self.worker.execute(plan)

    def close(self) -> None:
        self.worker.close()
