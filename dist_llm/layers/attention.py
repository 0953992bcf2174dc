"""Paged attention: rotates q and k and writes this step's K/V into the cache (one kernel), then attends
over the cache.

The one place where the attention implementation is chosen: the kernel namespace (`ops`) decides
between the Triton kernels and the torch reference.
"""

from __future__ import annotations

import torch
from torch import nn

from dist_llm.layers.context import get_metadata
from dist_llm.layers.linear import UnquantizedLinearMethod, takes_gemv
from dist_llm.layers.norm import DeferredNorm
from dist_llm.layers.rotary import RotaryEmbedding


class Attention(nn.Module):
    # the qkv GEMV with rotary and the KV write in its epilogue (kernels/gemv_rotary_kv.py), set by the worker
    # where the decode GEMV is used; None: the projection and `rotary_and_write_kv` run as two kernels
    qkv_rotary_kv = None

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float, rotary_emb: RotaryEmbedding,
                 ops):  # fmt: skip
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale, self.rotary_emb, self.ops = scale, rotary_emb, ops
        # bound by the worker once the KV pool is allocated: [num_blocks, block_size, Hk, D] each, of the
        # model's dtype or fp8 (--kv_cache_dtype), which holds K / k_scale and V / v_scale
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)
        self.k_scale = self.v_scale = 1.0

    def project_rotate_and_cache(self, qkv_proj: nn.Module, positions: torch.Tensor, x: torch.Tensor):
        """qkv_proj(x) with q and k rotated and this step's K/V in the cache, in one kernel where the fused
        GEMV takes it (one decode token); None otherwise, with nothing done (then `forward` does the rest)."""
        unquantized = isinstance(qkv_proj.quant_method, UnquantizedLinearMethod)
        if self.qkv_rotary_kv is None or not unquantized or not takes_gemv(qkv_proj, x):
            return None
        from dist_llm.kernels.gemv_rotary_kv import gemv_rotary_kv_supported

        md, rope = get_metadata(), self.rotary_emb
        args = (positions, rope.cos_sin_cache, self.k_cache, self.v_cache, md.slot_mapping)
        heads = (self.num_heads, self.num_kv_heads, self.head_dim)
        norm = None
        if isinstance(x, DeferredNorm):  # the input norm folded in as well (`kernels/gemv_norm.py`)
            x, norm = x.hw, (x.partials, x.eps)
        if not gemv_rotary_kv_supported(x, qkv_proj.weight, *args[:2], rope.is_neox, *args[2:], *heads):
            return None
        return self.qkv_rotary_kv(x, qkv_proj.weight, qkv_proj.bias, None, *args, *heads, norm=norm)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                rotated_and_cached: bool = False) -> torch.Tensor:  # fmt: skip
        """q [T, Hq, D], k and v [T, Hk, D] (views of the fused qkv output; q and k rotated in place) -> [T, Hq·D].
        rotated_and_cached: `project_rotate_and_cache` made them, so the rotation and the KV write are done."""
        md = get_metadata()
        rope = self.rotary_emb
        scales = {"k_scale": self.k_scale, "v_scale": self.v_scale}
        if not rotated_and_cached:
            self.ops.rotary_and_write_kv(
                positions, q, k, v, rope.cos_sin_cache, rope.is_neox, self.k_cache, self.v_cache, md.slot_mapping,
                **scales,
            )
        if md.piecewise is not None:  # a piecewise-graph step: its graph ends here, `attend` runs between replays
            return md.piecewise.attention(self, q)
        out = torch.empty(q.shape[0], self.num_heads, self.head_dim, dtype=q.dtype, device=q.device)
        self.attend(q, out, md)
        return out.view(q.shape[0], self.num_heads * self.head_dim)

    def attend(self, q: torch.Tensor, out: torch.Tensor, md) -> None:
        """The attention kernels over the cache, q [T, Hq, D] (rotated, the step's K/V written) -> out [T, Hq, D]:
        the rows of one query token through the decode kernel, the prompt chunks through the context kernel.
        Only the rows of the step's sequences are written."""
        scales = {"k_scale": self.k_scale, "v_scale": self.v_scale}
        batch = md.seq_lens.shape[0]
        nd = batch if md.is_decode else md.num_decode_rows
        if nd:  # one query token per row: rows and tokens coincide, so the leading rows are q[:nd]
            self.ops.paged_decode_attention(
                q[:nd], self.k_cache, self.v_cache, md.block_tables[:nd], md.seq_lens[:nd], self.scale, out[:nd],
                md.decode_workspace, **scales,
            )
        if nd < batch:  # the prompt chunks: the context kernel reads the whole tensors from row nd on
            self.ops.context_attention(
                q, self.k_cache, self.v_cache, md.block_tables, md.seq_lens, md.cu_seqlens_q,
                md.max_seqlen_q, self.scale, out, **scales, first_row=nd,
            )
