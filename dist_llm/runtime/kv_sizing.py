"""The KV pool: its element type (`kv_cache_dtype`) and how many blocks it gets. Every rank must agree on
the count, so the smallest wins."""

from __future__ import annotations

import logging
import os

import torch

from dist_llm.errors import DistLLMError
from dist_llm.parallel import comm

log = logging.getLogger("dist_llm")

KV_CACHE_DTYPES = ("auto", "fp8")  # --kv_cache_dtype: the model's dtype, or fp8 e4m3 (half the bytes)


def kv_cache_dtype(name: str, model_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """--kv_cache_dtype as a torch dtype. "fp8" stores K and V as e4m3 with per-tensor scales of 1.0 (as vLLM
    does without calibrated scales): |K|, |V| up to 448 are kept with 3 mantissa bits, larger ones saturate.
    It halves the bytes that decode attention reads and doubles the tokens the pool holds."""
    if name == "auto":
        return model_dtype
    if name != "fp8":
        raise DistLLMError(f"unknown --kv_cache_dtype {name!r}; choose one of {', '.join(KV_CACHE_DTYPES)}")
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 9):
            raise DistLLMError(
                f"--kv_cache_dtype fp8 needs a GPU of compute capability 8.9 or newer (Ada, Hopper, Blackwell); "
                f"{torch.cuda.get_device_name(device)} is {major}.{minor}: use --kv_cache_dtype auto"
            )
    return torch.float8_e4m3fn


def kv_cache_layout(kv_dtype: torch.dtype) -> str:
    """The pool's order in memory (kernels/kv_cache.empty_kv_cache). DIST_LLM_KV_LAYOUT=auto (the default) takes
    hnd (heads, then tokens, per block) for an fp8 cache and nhd (tokens, then heads) for a 16-bit one: the fp8
    decode kernel read head-major blocks 3-5% faster on an H200 and 1.7% faster in the 128/128 run on an H100,
    the bf16 one 1% slower (docs/performance.md). nhd or hnd forces an order, for A/B runs."""
    from dist_llm.kernels.kv_cache import KV_LAYOUTS

    layout = os.environ.get("DIST_LLM_KV_LAYOUT", "auto")
    if layout == "auto":
        return "hnd" if kv_dtype.itemsize == 1 else "nhd"
    if layout not in KV_LAYOUTS:
        raise DistLLMError(f"DIST_LLM_KV_LAYOUT must be auto or one of {', '.join(KV_LAYOUTS)}, got {layout!r}")
    return layout


def default_cpu_blocks(worker) -> int:
    b = worker.engine.build
    # enough for every slot of the batch at full length, as a CPU run has no memory profile to go by
    return b.max_batch_size * -(-b.max_seq_len // b.tokens_per_block)


def gpu_blocks(worker, fraction: float) -> int:
    """free memory x fraction, after the weights and a profiled activation peak; split evenly between the
    ranks that share the GPU (gloo ranks in tests), which measure it once all have profiled."""
    torch.cuda.synchronize()
    peak = profile_activation_peak(worker)
    sharing = comm.ranks_sharing_device(worker.device)  # also a barrier: every rank has loaded and profiled
    free, _ = torch.cuda.mem_get_info(worker.device)
    budget = free * fraction / sharing - peak
    per_block = worker.kv_bytes_per_block()
    if budget < per_block:
        raise DistLLMError(
            f"no GPU memory left for the KV cache (free {free / 2**30:.1f} GiB, activation peak "
            f"{peak / 2**30:.1f} GiB): use more GPUs (tp/pp), a smaller --max_num_tokens or a larger "
            "--kv_cache_free_gpu_mem_fraction"
        )
    return int(budget // per_block)


def profile_activation_peak(worker) -> int:
    """Peak extra memory of one forward at the largest token budget (max_num_tokens)."""
    from dist_llm.runtime.profile import run_profile_step

    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    run_profile_step(worker)
    peak = torch.cuda.max_memory_allocated() - base
    torch.cuda.empty_cache()
    return int(peak * 1.1)


def decide_num_blocks(worker, fraction: float, requested: int | None) -> int:
    if requested is not None:
        if requested < 1:
            raise DistLLMError(f"--num_kv_blocks must be >= 1, got {requested}")
        n = requested
    elif worker.device.type == "cuda":
        n = gpu_blocks(worker, fraction)
    else:
        n = default_cpu_blocks(worker)
    return comm.all_reduce_min_int(n)
