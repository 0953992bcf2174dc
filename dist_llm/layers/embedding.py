"""Vocabulary-parallel embedding and LM head.

The vocabulary V is padded to Vp, a multiple of tp_size; rank r holds rows [r·Vp/tp, (r+1)·Vp/tp).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dist_llm.layers.linear import dense_linear
from dist_llm.parallel import comm


def padded_vocab_size(vocab_size: int, tp_size: int) -> int:
    return -(-vocab_size // tp_size) * tp_size


class VocabParallelEmbedding(nn.Module):
    """E[ids] = Σ_r E_r[ids] where E_r is zero outside rank r's rows: look up the local rows, zero the
    others, all-reduce over tp."""

    def __init__(self, vocab_size: int, hidden_size: int, dtype: torch.dtype):
        super().__init__()
        tp, rank = comm.tp_size(), comm.tp_rank()
        self.vocab_size = vocab_size
        self.rows = padded_vocab_size(vocab_size, tp) // tp
        self.start = rank * self.rows
        self.weight = nn.Parameter(torch.empty(self.rows, hidden_size, dtype=dtype), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if comm.tp_size() == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        outside = (local < 0) | (local >= self.rows)
        y = F.embedding(local.masked_fill(outside, 0), self.weight)
        y.masked_fill_(outside[:, None], 0)
        return comm.tp_all_reduce(y)


class ParallelLMHead(nn.Module):
    """logits = h Eᵀ: rank r computes its vocabulary slice, an all-gather joins them, the padding is cut."""

    gemv = None  # the small-batch kernel, set by the worker (see linear.dense_linear)

    def __init__(self, vocab_size: int, hidden_size: int, dtype: torch.dtype):
        super().__init__()
        tp = comm.tp_size()
        self.vocab_size = vocab_size
        self.weight = nn.Parameter(
            torch.empty(padded_vocab_size(vocab_size, tp) // tp, hidden_size, dtype=dtype), requires_grad=False
        )

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        logits = comm.tp_all_gather(dense_linear(self, h, self.weight, None), dim=-1)
        return logits[:, : self.vocab_size]
