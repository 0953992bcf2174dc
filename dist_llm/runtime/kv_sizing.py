"""How many KV blocks the pool gets. Every rank must agree, so the smallest count wins."""

from __future__ import annotations

import logging

import torch

from dist_llm.errors import DistLLMError
from dist_llm.parallel import comm

log = logging.getLogger("dist_llm")


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
