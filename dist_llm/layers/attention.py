"""Paged attention: rotates q and k and writes this step's K/V into the cache (one kernel), then attends
over the cache.

The one place where the attention implementation is chosen: the kernel namespace (`ops`) decides
between the Triton kernels and the torch reference.
"""

from __future__ import annotations

import torch
from torch import nn

from dist_llm.layers.context import get_metadata
from dist_llm.layers.rotary import RotaryEmbedding


class Attention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float, rotary_emb: RotaryEmbedding,
                 ops):  # fmt: skip
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale, self.rotary_emb, self.ops = scale, rotary_emb, ops
        # bound by the worker once the KV pool is allocated: [num_blocks, block_size, Hk, D] each
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [T, Hq, D], k and v [T, Hk, D] (views of the fused qkv output; q and k rotated in place) -> [T, Hq·D]."""
        md = get_metadata()
        rope = self.rotary_emb
        self.ops.rotary_and_write_kv(
            positions, q, k, v, rope.cos_sin_cache, rope.is_neox, self.k_cache, self.v_cache, md.slot_mapping
        )
        out = torch.empty(q.shape[0], self.num_heads, self.head_dim, dtype=q.dtype, device=q.device)
        if md.is_decode:
            self.ops.paged_decode_attention(
                q, self.k_cache, self.v_cache, md.block_tables, md.seq_lens, self.scale, out, md.decode_workspace
            )
        else:
            self.ops.context_attention(
                q, self.k_cache, self.v_cache, md.block_tables, md.seq_lens, md.cu_seqlens_q,
                md.max_seqlen_q, self.scale, out,
            )
        return out.view(q.shape[0], self.num_heads * self.head_dim)
