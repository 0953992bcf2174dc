"""A synthetic step at the largest token budget, used to measure the activation peak before sizing the KV pool."""

from __future__ import annotations

import torch

from dist_llm.runtime.plan import StepPlan


def profile_plan(num_tokens: int, block_size: int) -> StepPlan:
    n_blocks = -(-num_tokens // block_size)
    return StepPlan(
        input_ids=torch.zeros(num_tokens, dtype=torch.int64),
        positions=torch.arange(num_tokens, dtype=torch.int64),
        slot_mapping=torch.arange(num_tokens, dtype=torch.int64),
        block_tables=torch.arange(n_blocks, dtype=torch.int32)[None, :],
        seq_lens=torch.tensor([num_tokens], dtype=torch.int32),
        cu_seqlens_q=torch.tensor([0, num_tokens], dtype=torch.int32),
        max_seqlen_q=num_tokens,
        is_decode=False,
        temperature=torch.zeros(1),
        top_k=torch.zeros(1, dtype=torch.int32),
        top_p=torch.ones(1),
        seeds=torch.zeros(1, dtype=torch.int64),
        offsets=torch.zeros(1, dtype=torch.int64),
    )


def run_profile_step(worker) -> None:
    b = worker.engine.build
    n = min(b.max_num_tokens, b.max_seq_len)
    worker.allocate_kv_cache(-(-n // b.tokens_per_block))
    worker.execute(profile_plan(n, b.tokens_per_block))
    if worker.device.type == "cuda":
        torch.cuda.synchronize()
    worker.allocate_kv_cache(0)
