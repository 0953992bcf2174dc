"""The step plan rank 0 broadcasts to every rank: small CPU tensors and a few ints."""

from __future__ import annotations

from dataclasses import dataclass

import torch


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

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def batch_size(self) -> int:
        return int(self.seq_lens.shape[0])


@dataclass
class StepResult:
    token_ids: torch.Tensor  # int64 [B]
    logprobs: torch.Tensor | None = None  # fp32 [B]
    logits: torch.Tensor | None = None  # fp32 [B, V]


SHUTDOWN = "shutdown"
