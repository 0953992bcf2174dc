"""The Triton backend: one public function per op, gathered from the kernel files."""

from dist_llm.kernels.activation import silu_and_mul
from dist_llm.kernels.decode_attention import paged_decode_attention
from dist_llm.kernels.kv_cache import write_kv_cache
from dist_llm.kernels.pending import fill_pending
from dist_llm.kernels.prefill_attention import context_attention
from dist_llm.kernels.rmsnorm import fused_add_rms_norm, rms_norm
from dist_llm.kernels.rotary import rotary_embedding
from dist_llm.kernels.rotary_kv import rotary_and_write_kv
from dist_llm.kernels.sampling import sample

__all__ = [
    "rms_norm",
    "fused_add_rms_norm",
    "rotary_embedding",
    "silu_and_mul",
    "write_kv_cache",
    "rotary_and_write_kv",
    "paged_decode_attention",
    "context_attention",
    "sample",
    "fill_pending",
]
