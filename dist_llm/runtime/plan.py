"""The step plan rank 0 broadcasts to every rank: small CPU tensors and a few ints."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import numpy as np
import torch

from dist_llm.errors import DistLLMError
from dist_llm.parallel.state import timeout_s as default_timeout_s

if TYPE_CHECKING:
    from dist_llm.runtime.logits_processing import LogitsInputs


def _to_arrays(obj) -> dict:
    """A dataclass's fields with its CPU tensors as numpy arrays. Pickling small torch tensors costs
    ~0.3 ms each way (their storage reduction), numpy arrays a few µs, and the plan goes to every rank
    every step (`benchmarks/bench_control_plane.py`: 2.3-3.1 ms a plan before, 0.7-1.1 after, 2 CPU ranks)."""
    out = {}
    for f in fields(obj):
        v = getattr(obj, f.name)
        if isinstance(v, torch.Tensor) and v.device.type == "cpu" and v.dtype != torch.bfloat16:
            v = v.numpy()  # (numpy has no bfloat16: such a tensor goes as it is)
        out[f.name] = v
    return out


def _from_arrays(cls, values: dict):
    return cls(**{k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in values.items()})


# what the sampler reads per row, as `kernels.sampling.sample` names its arguments (the graphs keep each in a
# static buffer; an eager step passes the plan's own, min_p None when no row uses it)
SAMPLING_FIELDS = ("temperature", "top_k", "top_p", "min_p", "seeds", "offsets")


def mixed_decode_split() -> bool:
    """Whether a mixed step's rows of one query token take the decode attention kernel (the default) or, with
    DIST_LLM_MIXED_DECODE_SPLIT=0, the context kernel with the prompt chunks (A/B runs)."""
    value = os.environ.get("DIST_LLM_MIXED_DECODE_SPLIT", "1")
    if value not in ("0", "1"):
        raise ValueError(f"DIST_LLM_MIXED_DECODE_SPLIT must be 0 or 1, got {value!r}")
    return value == "1"


def sampling_mode(params) -> str:
    """The sampler's mode for a step whose sampled rows have these SamplingParams (a plan's `sampling_mode`)."""
    if all(p.temperature == 0 for p in params):
        return "greedy"
    if all(p.temperature == 0 or (p.top_k == 0 and p.top_p >= 1 and p.min_p == 0) for p in params):
        return "plain"
    return "full"


def sampling_inputs(params, seeds: list[int], offsets: list[int]) -> dict:
    """A plan's sampler fields (SAMPLING_FIELDS, min_p None when no row uses it) and its `sampling_mode`, for
    sampled rows with these SamplingParams, seeds and output positions (the noise's offsets)."""
    min_p = [p.min_p for p in params]
    return dict(
        temperature=torch.tensor([p.temperature for p in params], dtype=torch.float32),
        top_k=torch.tensor([p.top_k for p in params], dtype=torch.int32),
        top_p=torch.tensor([p.top_p for p in params], dtype=torch.float32),
        min_p=torch.tensor(min_p, dtype=torch.float32) if any(min_p) else None,
        seeds=torch.tensor(seeds, dtype=torch.int64),
        offsets=torch.tensor(offsets, dtype=torch.int64),
        sampling_mode=sampling_mode(params),
    )


def paged_inputs(seqs, counts: list[int], block_size: int, pending: int) -> tuple[list[int], ...]:
    """The inputs of a step that computes each sequence's next `n` tokens, from its `num_computed_tokens` on, as
    plain lists: (token ids, positions, slot mapping, seq_lens, cu_seqlens_q, block table rows padded with 0 to the
    longest, the rows whose last new token is the placeholder `pending`: an id a step in flight samples, which the
    device fills in through `prev_index`). Every sequence's `block_table` must cover its new tokens."""
    ids, pos, slots, seq_lens, cu, rows, waiting = [], [], [], [], [0], [], []
    max_blocks = max(len(s.block_table) for s in seqs)
    for i, (seq, n) in enumerate(zip(seqs, counts)):
        start, end, table = seq.num_computed_tokens, seq.num_computed_tokens + n, seq.block_table
        ids += seq.token_ids[start:end]
        if ids[-1] == pending:
            waiting.append(i)
        if n == 1:  # decode: the common case
            pos.append(start)
            slots.append(table[start // block_size] * block_size + start % block_size)
        else:
            pos += range(start, end)
            slots += [table[p // block_size] * block_size + p % block_size for p in range(start, end)]
        seq_lens.append(end)
        cu.append(cu[-1] + n)
        rows.append(table + [0] * (max_blocks - len(table)))
    return ids, pos, slots, seq_lens, cu, rows, waiting


@dataclass
class StepPlan:
    input_ids: torch.Tensor  # int64 [T]
    positions: torch.Tensor  # int64 [T]
    slot_mapping: torch.Tensor  # int64 [T]
    block_tables: torch.Tensor  # int32 [B, M]
    seq_lens: torch.Tensor  # int32 [B]
    cu_seqlens_q: torch.Tensor  # int32 [B+1]
    max_seqlen_q: int
    is_decode: bool
    temperature: torch.Tensor  # fp32 [B]
    top_k: torch.Tensor  # int32 [B]
    top_p: torch.Tensor  # fp32 [B]
    seeds: torch.Tensor  # int64 [B]
    offsets: torch.Tensor  # int64 [B]
    sampling_mode: str = "full"  # "greedy" | "plain" (no min-p/top-k/top-p row) | "full": picked on the host
    return_logits: bool = False
    return_logprobs: bool = False
    top_logprobs: int = 0  # the most any row asks for (rows take their own first k)
    # overlap scheduling: for each token, the row of the previous step's sampled ids that holds it (the
    # host has not seen that token yet), or -1 where input_ids has it; None when every id is known
    prev_index: torch.Tensor | None = None  # int64 [T]
    # rows 0..num_decode_rows-1 have one query token each (the scheduler puts them first): in a mixed step they
    # take the decode attention kernel, the rest the context kernel
    num_decode_rows: int = 0
    # logit_bias, min_tokens and penalties, for steps where some row uses them (runtime/logits_processing.py)
    logits_inputs: LogitsInputs | None = None
    min_p: torch.Tensor | None = None  # fp32 [B]; None: no row uses min-p
    # prompt log-probabilities: the step's token rows whose hidden states predict a prompt token, and that token
    prompt_logprob_index: torch.Tensor | None = None  # int64 [P]
    prompt_logprob_targets: torch.Tensor | None = None  # int64 [P]
    # speculative drafts (runtime/speculative.py): the token rows to sample, a drafting sequence's last 1 + d and
    # every other's last one; the sampling fields above then have a row per sampled row. None: each sequence's last
    sample_index: torch.Tensor | None = None  # int64 [S]

    def __reduce__(self):  # rank 0 pickles a plan per step for every rank (see _to_arrays)
        return _from_arrays, (StepPlan, _to_arrays(self))

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def batch_size(self) -> int:
        return int(self.seq_lens.shape[0])

    def sample_rows(self) -> torch.Tensor:
        """int64 [S]: the token rows the LM head samples, each sequence's last token or sample_index's."""
        return self.cu_seqlens_q[1:].long() - 1 if self.sample_index is None else self.sample_index

    @property
    def num_samples(self) -> int:
        """Rows sampled: one per sequence, or sample_index's."""
        return self.batch_size if self.sample_index is None else int(self.sample_index.shape[0])


@dataclass
class StepResult:
    """A step's sampled ids. On the GPU they may still be on their way to pinned host memory: call
    `wait()` before reading `token_ids` (the coordinator does so only after launching the next step)."""

    token_ids: torch.Tensor  # int64 [B], or [S] (the plan's sample_index)
    logprobs: torch.Tensor | None = None  # fp32 [B]
    logits: torch.Tensor | None = None  # fp32 [B, V]
    ready: object = None  # a torch.cuda.Event recorded after the device-to-host copy, or None
    top_logprob_ids: torch.Tensor | None = None  # int64 [B, k]
    top_logprobs: torch.Tensor | None = None  # fp32 [B, k]
    prompt_logprobs: torch.Tensor | None = None  # fp32 [P], in the plan's prompt_logprob_index order

    def __reduce__(self):  # sent from the last stage to rank 0 every step (pp > 1); only once waited for
        assert self.ready is None, "wait() for a StepResult before sending it"
        return _from_arrays, (StepResult, _to_arrays(self))

    def wait(self, timeout_s: float | None = None) -> StepResult:
        """Until the ids are on the host. A step still running after `timeout_s` (DIST_LLM_TIMEOUT_S, default
        600) raises DistLLMError, which ends the job on every rank: a collective that a peer never joins (a
        stuck rank; NCCL's watchdog does not see collectives replayed from CUDA graphs, and the one-shot
        all-reduces spin without a limit) must stop the run loudly, not hang it."""
        if self.ready is not None:
            if not self.ready.query():
                _wait_event(self.ready, timeout_s)
            self.ready = None
        return self


def _wait_event(event, timeout_s: float | None) -> None:
    """Poll `event` until it completes: as promptly as a spinning synchronize for the first second (sleep(0)
    releases the GIL, so other Python threads run between polls), then once a millisecond, with a deadline."""
    timeout_s = default_timeout_s() if timeout_s is None else timeout_s
    start = time.monotonic()
    polls, pause = 0, 0.0
    while not event.query():
        polls += 1
        if polls % 1024 == 0:  # the clock every 1024 polls: about a millisecond early on, a second later
            waited = time.monotonic() - start
            if waited > timeout_s:
                raise DistLLMError(
                    f"a step has not finished on the GPU after {waited:.0f} s (DIST_LLM_TIMEOUT_S={timeout_s:g}): "
                    "a rank is stuck (a peer that never joined a collective, or a hung kernel); stopping the job"
                )
            if waited > 1.0:  # a long step (a huge prefill) or a hang: stop spinning
                pause = 1e-3
        time.sleep(pause)


SHUTDOWN = "shutdown"
