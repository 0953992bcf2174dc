"""Decode steps from static buffers, padded to batch-size buckets, replayed from CUDA graphs.

A decode step's work depends only on the batch size once its inputs live at fixed addresses, so one
graph per bucket (1, 2, 4, 8, then multiples of 16 up to max_batch_size) replays the whole forward, the
LM head and sampling with a single launch. The plan's tensors go into the static buffers with one
copy from pinned memory (`static_inputs`; padding rows write no KV: slot -1, and attend to one token
of block 0). Input ids that the host has
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
* the eager worker path is used for everything else (prefill, mixed batches, the debugging first-step
  logits).

A step whose rows ask for logits processing (penalties, logit_bias, min_tokens: runtime/logits_processing.py)
or log-probabilities replays a "logits" variant of its bucket's graph, which stops at the LM head's output; the
processing and the sampling then run eagerly on it. That variant is captured the first time a bucket needs it.
"""

from __future__ import annotations

import torch

from dist_llm.layers.context import AttentionMetadata, set_metadata
from dist_llm.parallel import comm
from dist_llm.runtime.plan import StepPlan, StepResult
from dist_llm.runtime.static_inputs import StaticInputs

SAMPLING_MODES = ("greedy", "plain", "full")
LOGITS = "logits"  # the graph variant that ends at the LM head; sampling runs after it, eagerly


def batch_buckets(max_batch_size: int) -> list[int]:
    buckets = [b for b in (1, 2, 4, 8) if b < max_batch_size]
    buckets += list(range(16, max_batch_size, 16))
    return buckets + [max_batch_size]


def stage_forward(runner, bucket: int) -> torch.Tensor | None:
    """This stage's part of the model over the first `bucket` entries of a graph runner's static buffers: the first
    stage embeds `input_ids` (the previous step's sampled ids, `worker.sampled`, filled in where `prev_index`
    points), a later one takes the received `stage_in`. A stage before the last copies its (hidden, residual) into
    `stage_out` and returns None; the last returns the model's output."""
    w, pos = runner.worker, runner.positions[:bucket]
    if runner.first:
        ids = w.ops.fill_pending(runner.input_ids[:bucket], runner.prev_index[:bucket], w.sampled)
        out = w.model(pos, input_ids=ids)
    else:
        out = w.model(pos, hidden=runner.stage_in[0, :bucket], residual=runner.stage_in[1, :bucket])
    if runner.last:
        return out
    runner.stage_out[0, :bucket].copy_(out[0])
    runner.stage_out[1, :bucket].copy_(out[1])
    return None


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
        self.inputs = StaticInputs(self.max_bs, max_blocks, dev)
        for name, view in self.inputs.dev.items():  # input_ids, positions, ..., block_tables
            setattr(self, name, view)
        self.cu_seqlens_q = torch.arange(self.max_bs + 1, dtype=torch.int32, **z)
        self.tokens = worker.sampled  # the graph reads the previous step's ids here, then writes its own
        m, hidden = worker.mapping, eng.model.hidden_size
        self.first, self.last = m.is_first_stage, m.is_last_stage
        # (hidden, residual) from the previous stage / for the next one
        self.stage_in = None if self.first else torch.zeros(2, self.max_bs, hidden, dtype=worker.dtype, **z)
        self.stage_out = None if self.last else torch.zeros(2, self.max_bs, hidden, dtype=worker.dtype, **z)
        self.workspace = worker.decode_workspace
        self.graphs: dict[tuple[int, str], torch.cuda.CUDAGraph] = {}
        self.logits_buf: torch.Tensor | None = None  # the "logits" variant's output [max_bs, V], made on first use
        self.pool = None
        self.steps_run = 0
        self.logits_steps = 0  # of them, through the "logits" variant

    def can_run(self, plan: StepPlan) -> bool:
        return (plan.is_decode and plan.batch_size <= self.max_bs and not plan.return_logits
                and plan.prompt_logprob_index is None and plan.sample_index is None)

    def _forward(self, bucket: int, mode: str) -> None:
        """The captured region: everything reads and writes the static buffers only."""
        w = self.worker
        set_metadata(AttentionMetadata(
            slot_mapping=self.slot_mapping[:bucket], block_tables=self.block_tables[:bucket],
            seq_lens=self.seq_lens[:bucket], cu_seqlens_q=self.cu_seqlens_q[: bucket + 1], max_seqlen_q=1,
            is_decode=True, decode_workspace=self.workspace,
        ))
        hidden = stage_forward(self, bucket)
        if hidden is None:
            return
        logits = w.model.compute_logits(hidden)
        if mode == LOGITS:  # into a buffer of its own: the pool's memory stays free for the other graphs
            self.logits_buf[:bucket].copy_(logits)
            return
        w.ops.sample(logits, **self.inputs.sampling(bucket), mode=mode, out=self.tokens[:bucket])

    def _capture(self, bucket: int, mode: str) -> torch.cuda.CUDAGraph:
        self.inputs.pad()  # padding rows write no KV and attend to one token of block 0
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

    @torch.inference_mode()
    def run(self, plan: StepPlan) -> StepResult | None:
        b = plan.batch_size
        w = self.worker
        if not self.first:
            packed = comm.pp_recv((2, b, self.stage_in.shape[2]), w.dtype, w.mapping.pp_rank - 1)
            self.stage_in[:, :b].copy_(packed)
        bucket = next(x for x in self.buckets if x >= b)
        mode = LOGITS if plan.logits_inputs is not None or plan.return_logprobs else plan.sampling_mode
        key = (bucket, mode)
        if mode == LOGITS and self.logits_buf is None and self.last:
            self.logits_buf = torch.empty(self.max_bs, w.engine.model.vocab_size, dtype=w.dtype, device=w.device)
        if self.mode == "capture" and key not in self.graphs:
            # A mode first seen now: capture before this step's inputs go in. The capture pads the rows, and
            # its warm-up runs overwrite the previous step's sampled ids, which this step may read.
            saved = self.tokens.clone()
            self.graphs[key] = self._capture(bucket, mode)
            self.tokens.copy_(saved)
        values = {name: getattr(plan, name) for name, *_ in self.inputs.fields}
        self.inputs.load(values, {"row": (b, bucket)}, plan.block_tables, bucket)
        if self.mode == "static":
            self._forward(bucket, mode)
        else:
            self.graphs[key].replay()
        self.steps_run += 1
        self.logits_steps += mode == LOGITS
        if not self.last:  # a copy: the next replay rewrites stage_out while this send may be in flight
            w.send_to_next_stage(self.stage_out[:, :b].clone())
            return None
        if mode == LOGITS:
            return w.sample_logits(plan, self.logits_buf[:b], self.inputs.sampling(b))
        return w.return_tokens(self.tokens[:b])
