"""The step plan rank 0 broadcasts to every rank: small CPU tensors and a few ints."""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch


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
    sampling_mode: str = "full"  # "greedy" | "plain" (no top-k/top-p row) | "full": picked on the host
    return_logits: bool = False
    return_logprobs: bool = False
    # overlap scheduling: for each token, the row of the previous step's sampled ids that holds it (the
    # host has not seen that token yet), or -1 where input_ids has it; None when every id is known
    prev_index: torch.Tensor | None = None  # int64 [T]

    def __reduce__(self):  # rank 0 pickles a plan per step for every rank (see _to_arrays)
        return _from_arrays, (StepPlan, _to_arrays(self))

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def batch_size(self) -> int:
        return int(self.seq_lens.shape[0])


@dataclass
class StepResult:
    """A step's sampled ids. On the GPU they may still be on their way to pinned host memory: call
    `wait()` before reading `token_ids` (the coordinator does so only after launching the next step)."""

    token_ids: torch.Tensor  # int64 [B]
    logprobs: torch.Tensor | None = None  # fp32 [B]
    logits: torch.Tensor | None = None  # fp32 [B, V]
    ready: object = None  # a torch.cuda.Event recorded after the device-to-host copy, or None

    def __reduce__(self):  # sent from the last stage to rank 0 every step (pp > 1); only once waited for
        assert self.ready is None, "wait() for a StepResult before sending it"
        return _from_arrays, (StepResult, _to_arrays(self))

    def wait(self) -> StepResult:
        if self.ready is not None:
            self.ready.synchronize()
            self.ready = None
        return self


SHUTDOWN = "shutdown"
