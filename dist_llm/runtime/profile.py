"""Synthetic steps at start-up: one at the largest token budget, which measures the activation peak before the
KV pool is sized, and a few small mixed steps that compile the eager kernels' variants before requests come."""

from __future__ import annotations

import torch

from dist_llm.runtime.plan import StepPlan, mixed_decode_split


def profile_plan(num_tokens: int, block_size: int) -> StepPlan:
    """One prompt of `num_tokens` over the pool's first blocks (the sampler in its "full" mode)."""
    return synthetic_plan(0, 1, num_tokens, block_size, -(-num_tokens // block_size), "full")


def run_profile_step(worker) -> None:
    b = worker.engine.build
    n = min(b.max_num_tokens, b.max_seq_len)
    worker.allocate_kv_cache(-(-n // b.tokens_per_block))
    worker.execute(profile_plan(n, b.tokens_per_block))
    if worker.device.type == "cuda":
        torch.cuda.synchronize()
    worker.allocate_kv_cache(0)


def synthetic_plan(num_decode: int, table_blocks: int, chunk: int, block_size: int, num_blocks: int,
                   mode: str) -> StepPlan:
    """A step of `num_decode` rows of one query token (none: a plain prefill), then a prompt chunk of `chunk`
    tokens from position 0, all over the same context (the chunk's tokens: the decode rows stand at its last
    position, so every slot read is written in the step itself) and block tables `table_blocks` wide (the pool's
    first blocks, wrapped at `num_blocks`): what an eager step's kernel variants depend on."""
    width = max(table_blocks, -(-chunk // block_size))
    row = [i % num_blocks for i in range(width)]
    rows = num_decode + 1
    positions = [chunk - 1] * num_decode + list(range(chunk))
    slots = [row[p // block_size] * block_size + p % block_size for p in positions]
    temperature, top_k, top_p = {"greedy": (0.0, 0, 1.0), "plain": (1.0, 0, 1.0), "full": (0.8, 5, 0.9)}[mode]
    return StepPlan(
        input_ids=torch.zeros(len(positions), dtype=torch.int64),
        positions=torch.tensor(positions, dtype=torch.int64),
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        block_tables=torch.tensor([row] * rows, dtype=torch.int32),
        seq_lens=torch.full((rows,), chunk, dtype=torch.int32),
        cu_seqlens_q=torch.tensor([*range(num_decode + 1), num_decode + chunk], dtype=torch.int32),
        max_seqlen_q=chunk,
        is_decode=False,
        temperature=torch.full((rows,), temperature),
        top_k=torch.full((rows,), top_k, dtype=torch.int32),
        top_p=torch.full((rows,), top_p),
        min_p=torch.full((rows,), 0.05) if mode == "full" else None,
        seeds=torch.arange(rows, dtype=torch.int64),
        offsets=torch.zeros(rows, dtype=torch.int64),
        sampling_mode=mode,
        num_decode_rows=num_decode if mixed_decode_split() else 0,
    )


def warmup_plans(block_size: int, num_blocks: int, max_batch_size: int, max_num_tokens: int,
                 max_seq_len: int) -> list[StepPlan]:
    """Mixed steps that between them reach every variant Triton compiles for the eager path: the context
    kernel's query tiles of 16, 32 and 64 rows; the decode kernel at a few decode rows in one partition and in
    several (with the merge pass) and at 32 rows (the large-batch tiles); each sampling mode. Without them the
    first serving step that needs a variant waits for its compile, and the GPU idles (H100, 2026-12-05: a
    128/128 throughput run compiled the context kernel mid-run)."""
    plans = []
    for num_decode, table_blocks, chunk, mode in ((1, 1, 16, "greedy"), (1, 2, 32, "plain"), (32, 1, 64, "full")):
        num_decode = min(num_decode, max_batch_size - 1)
        chunk = min(chunk, max_num_tokens - num_decode, max_seq_len)
        table_blocks = max(1, min(table_blocks, max_seq_len // block_size))
        if chunk >= 1:
            plans.append(synthetic_plan(num_decode, table_blocks, chunk, block_size, num_blocks, mode))
    return plans


def run_compile_warmup(worker, num_blocks: int) -> None:
    """Run the warm-up steps on every rank (they hold collectives) into the freshly allocated pool: before any
    request, as they overwrite the pool's first blocks, which the prefix cache may hold later."""
    b = worker.engine.build
    for plan in warmup_plans(b.tokens_per_block, num_blocks, b.max_batch_size, b.max_num_tokens, b.max_seq_len):
        result = worker.execute(plan)
        if result is not None:
            result.wait()
    worker.wait_sends()
