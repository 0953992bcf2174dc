"""Per-step attention metadata, set by the worker before a forward and read by every attention layer.

Keeping it out of the forward signature keeps `model(input_ids, positions)` small (nano-vllm's Context).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # int64 [num_tokens]; -1 = do not write
    block_tables: torch.Tensor  # int32 [batch, max_blocks]
    seq_lens: torch.Tensor  # int32 [batch]: K/V length after this step
    cu_seqlens_q: torch.Tensor  # int32 [batch + 1]
    max_seqlen_q: int
    is_decode: bool  # every sequence has exactly one query token
    decode_workspace: object = None
    # a mixed step's leading rows of one query token each (decode rows, or a prompt's last token alone): the
    # decode kernel serves them; the context kernel, whose query tiles would be 1/64 full, the others
    num_decode_rows: int = 0
    # a piecewise-graph step (runtime/piecewise_graphs.py): attention layers hand it q instead of attending
    piecewise: object = None


_metadata: AttentionMetadata | None = None


def set_metadata(md: AttentionMetadata | None) -> None:
    global _metadata
    _metadata = md


def get_metadata() -> AttentionMetadata:
    if _metadata is None:
        raise RuntimeError("attention metadata is not set: call layers.context.set_metadata before forward")
    return _metadata
