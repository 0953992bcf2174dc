"""Paged attention: writes this step's K/V into the cache, then attends over the cache.

The one place where the attention implementation is chosen: the kernel namespace (`ops`) decides
between the Triton kernels and the torch reference.
"""

from __future__ import annotations

import torch
from torch import nn

from dist_llm.layers.context import get_metadata


class Attention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float, ops):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale, self.ops = scale, ops
        # bound by the worker once the KV pool is allocated: [num_blocks, block_size, Hk, D] each
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [T, Hq, D], k and v [T, Hk, D] (views of the fused qkv output) -> [T, Hq·D]."""
        md = get_metadata()
        self.ops.write_kv_cache(k, v, self.k_cache, self.v_cache, md.slot_mapping)
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
