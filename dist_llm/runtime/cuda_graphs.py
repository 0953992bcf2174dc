"""Decode steps from static buffers, padded to batch-size buckets, replayed from CUDA graphs.

A decode step's work depends only on the batch size once its inputs live at fixed addresses, so one
graph per bucket (1, 2, 4, 8, then multiples of 16 up to max_batch_size) replays the whole forward, the
LM head and sampling with a single launch. The plan's tensors are copied into the static buffers
(padding rows write no KV: slot -1, and attend to one token of block 0). Input ids that the host has
not seen yet (overlap scheduling) are gathered from the previous step's sampled ids inside the graph.
The sampled ids land in the worker's `sampled` buffer and come back through pinned memory, without a
host wait: the coordinator waits only when it needs them, after launching the next step.

With pipeline parallelism each stage captures its own part: the activations from the previous stage are
received into a static buffer before the replay, and the graph's output buffer is sent on after it (the
point-to-point calls stay outside the graph; tensor-parallel all-reduces inside it are captured).

Modes:
* "capture": CUDA graphs (GPU; NCCL or a single rank: gloo cannot be captured);
* "static":  the same static-buffer, bucket-padded step run eagerly: what the CPU tests check, and a
  debugging aid on the GPU;
* the eager worker path is used for everything else (prefill, mixed batches, steps that return logits
  or log-probabilities).
"""

from __future__ import annotations

import torch

from dist_llm.layers.context import AttentionMetadata, set_metadata
from dist_llm.parallel import comm
from dist_llm.runtime.plan import StepPlan, StepResult
from dist_llm.runtime.worker import fill_pending

SAMPLING_MODES = ("greedy", "plain", "full")


def batch_buckets(max_batch_size: int) -> list[int]:
    buckets = [b for b in (1, 2, 4, 8) if b < max_batch_size]
    buckets += list(range(16, max_batch_size, 16))
    return buckets + [max_batch_size]


class DecodeGraphRunner:
    def __init__(self, worker, mode: str):
        if mode not in ("capture", "static"):
            raise ValueError(f"DecodeGraphRunner mode must be 'capture' or 'static', got {mode!r}")
        self.worker, self.mode = worker, mode
        eng, dev = worker.engine, worker.device
        self.max_bs = eng.build.max_batch_size
        self.buckets = batch_buckets(self.max_bs)
        max_blocks = -(-eng.build.max_seq_len // eng.build.tokens_per_block)
        z = dict(device=dev)
        self.input_ids = torch.zeros(self.max_bs, dtype=torch.int64, **z)
        self.positions = torch.zeros(self.max_bs, dtype=torch.int64, **z)
        self.slot_mapping = torch.full((self.max_bs,), -1, dtype=torch.int64, **z)
        self.block_tables = torch.zeros(self.max_bs, max_blocks, dtype=torch.int32, **z)
        self.seq_lens = torch.ones(self.max_bs, dtype=torch.int32, **z)
        self.cu_seqlens_q = torch.arange(self.max_bs + 1, dtype=torch.int32, **z)
        self.temperature = torch.zeros(self.max_bs, dtype=torch.float32, **z)
        self.top_k = torch.zeros(self.max_bs, dtype=torch.int32, **z)
        self.top_p = torch.ones(self.max_bs, dtype=torch.float32, **z)
        self.seeds = torch.zeros(self.max_bs, dtype=torch.int64, **z)
        self.offsets = torch.zeros(self.max_bs, dtype=torch.int64, **z)
        self.prev_index = torch.full((self.max_bs,), -1, dtype=torch.int64, **z)
        self.tokens = worker.sampled  # the graph reads the previous step's ids here, then writes its own
        m, hidden = worker.mapping, eng.model.hidden_size
        self.first, self.last = m.is_first_stage, m.is_last_stage
        # (hidden, residual) from the previous stage / for the next one
        self.stage_in = None if self.first else torch.zeros(2, self.max_bs, hidden, dtype=worker.dtype, **z)
        self.stage_out = None if self.last else torch.zeros(2, self.max_bs, hidden, dtype=worker.dtype, **z)
        self.workspace = worker.decode_workspace
        self.graphs: dict[tuple[int, str], torch.cuda.CUDAGraph] = {}
        self.pool = None
        self.steps_run = 0

    def can_run(self, plan: StepPlan) -> bool:
        return plan.is_decode and plan.batch_size <= self.max_bs and not plan.return_logits \
            and not plan.return_logprobs

    def _forward(self, bucket: int, mode: str) -> None:
        """The captured region: everything reads and writes the static buffers only."""
        w = self.worker
        set_metadata(AttentionMetadata(
            slot_mapping=self.slot_mapping[:bucket], block_tables=self.block_tables[:bucket],
            seq_lens=self.seq_lens[:bucket], cu_seqlens_q=self.cu_seqlens_q[: bucket + 1], max_seqlen_q=1,
            is_decode=True, decode_workspace=self.workspace,
        ))
        pos = self.positions[:bucket]
        if self.first:
            ids = fill_pending(self.input_ids[:bucket], self.prev_index[:bucket], self.tokens)
            out = w.model(pos, input_ids=ids)
        else:
            out = w.model(pos, hidden=self.stage_in[0, :bucket], residual=self.stage_in[1, :bucket])
        if not self.last:
            self.stage_out[0, :bucket].copy_(out[0])
            self.stage_out[1, :bucket].copy_(out[1])
            return
        hidden = out
        logits = w.model.compute_logits(hidden).float()
        self.tokens[:bucket].copy_(w.ops.sample(
            logits, self.temperature[:bucket], self.top_k[:bucket], self.top_p[:bucket], self.seeds[:bucket],
            self.offsets[:bucket], mode=mode,
        ))

    def _capture(self, bucket: int, mode: str) -> torch.cuda.CUDAGraph:
        self._pad(0, bucket)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up outside the graph: Triton compiles, cuBLAS picks its kernels
                self._forward(bucket, mode)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self._forward(bucket, mode)
        self.pool = graph.pool()
        return graph

    @torch.inference_mode()
    def capture_all(self, modes=("greedy",)) -> None:
        """Capture the common graphs at start-up, largest bucket first so smaller ones share its pool."""
        if self.mode != "capture":
            return
        for bucket in reversed(self.buckets):
            for mode in modes:
                self.graphs[(bucket, mode)] = self._capture(bucket, mode)
        torch.cuda.synchronize()

    def _pad(self, start: int, end: int) -> None:
        if end > start:
            self.slot_mapping[start:end] = -1
            self.seq_lens[start:end] = 1
            self.block_tables[start:end] = 0
            self.prev_index[start:end] = -1
            self.input_ids[start:end] = 0  # not a PENDING id left over from an earlier step

    @torch.inference_mode()
    def run(self, plan: StepPlan) -> StepResult | None:
        b = plan.batch_size
        w = self.worker
        if not self.first:
            packed = comm.pp_recv((2, b, self.stage_in.shape[2]), w.dtype, w.mapping.pp_rank - 1)
            self.stage_in[:, :b].copy_(packed)
        bucket = next(x for x in self.buckets if x >= b)
        nb = plan.block_tables.shape[1]
        for dst, src in ((self.input_ids, plan.input_ids), (self.positions, plan.positions),
                         (self.slot_mapping, plan.slot_mapping), (self.seq_lens, plan.seq_lens),
                         (self.temperature, plan.temperature), (self.top_k, plan.top_k), (self.top_p, plan.top_p),
                         (self.seeds, plan.seeds), (self.offsets, plan.offsets)):
            dst[:b].copy_(src, non_blocking=True)
        self.block_tables[:b, :nb].copy_(plan.block_tables, non_blocking=True)
        if plan.prev_index is not None:
            self.prev_index[:b].copy_(plan.prev_index, non_blocking=True)
        else:
            self.prev_index[:b].fill_(-1)
        self._pad(b, bucket)
        if self.mode == "static":
            self._forward(bucket, plan.sampling_mode)
        else:
            key = (bucket, plan.sampling_mode)
            if key not in self.graphs:
                self.graphs[key] = self._capture(bucket, plan.sampling_mode)
            self.graphs[key].replay()
        self.steps_run += 1
        if not self.last:  # a copy: the next replay rewrites stage_out while this send may be in flight
            w.send_to_next_stage(self.stage_out[:, :b].clone())
            return None
        return w.return_tokens(self.tokens[:b])
