"""Prefill and mixed steps of up to `max_tokens` tokens from CUDA graphs cut at each attention (piecewise).

An eager step launches ~10 kernels a layer from Python, 13-18 ms of host time for a 7B-shaped model whatever the
step's size (H100, 2026-12-06; a replay: 2-6 ms): a short prompt, or a few prompt tokens beside a running
batch's decode rows, waits on the host and not on the GPU. A step's work outside attention depends only on its
token count once its inputs live at fixed addresses; attention depends on the sequences (their lengths, block
tables, how many rows decode).
So for each token bucket the forward is captured as num_layers + 1 graphs, cut where each layer attends: a
replay runs graph 0, layer 0's attention kernels (eagerly, from the step's metadata), graph 1, ... The last graph
ends at the final norm; the LM head over each sequence's last token and the sampling run eagerly (their row count
is the batch's, not the bucket's). vLLM's piecewise CUDA graphs split the same way, through torch.compile.

Between two graphs q and the attention output live in two static buffers (a graph copies q in; the next reads
the output), so no tensor of the graphs' memory pool has to outlive its graph. Padding tokens (up to the bucket)
write no KV (slot -1), and no attention row is written for them: the rows hold whatever an earlier step left
there, finite values that stay in their own rows (every op outside attention is row-wise) and are never read.

Modes, as for the decode graphs (`cuda_graphs.py`): "capture" (CUDA graphs; NCCL or a single rank) and "static"
(the same static buffers and bucket padding, run eagerly with the attention inline: the CPU tests' path).
"""

from __future__ import annotations

import torch

from dist_llm.layers.context import AttentionMetadata, get_metadata, set_metadata
from dist_llm.parallel import comm
from dist_llm.runtime.cuda_graphs import stage_forward
from dist_llm.runtime.plan import StepPlan, StepResult
from dist_llm.runtime.static_inputs import StaticInputs, sampling_fields

# name, dtype, padding value, what the length counts (see static_inputs.py)
PIECEWISE_FIELDS = (
    ("input_ids", torch.int64, 0, "token"),
    ("positions", torch.int64, 0, "token"),
    ("slot_mapping", torch.int64, -1, "token"),  # padding tokens write no KV
    ("prev_index", torch.int64, -1, "token"),
    ("seq_lens", torch.int32, 1, "row"),
    ("cu_seqlens_q", torch.int32, 0, "row+1"),
    # the LM head's rows: each sequence's last token, or the plan's sample_index (speculative drafts), and the
    # sampling parameters of each
    ("last_index", torch.int64, 0, "sample"),
    *sampling_fields("sample"),
)
MIN_BUCKET = 16  # at one row the GEMVs fold norms (`DeferredNorm`): buckets stay above that


def token_buckets(max_tokens: int) -> list[int]:
    """16, 32, 64, 128, then every 64 tokens up to max_tokens (which closes the list): at most a quarter of a
    bucket above 128 is padding, where the matmuls start to cost by their rows."""
    if max_tokens < MIN_BUCKET:
        raise ValueError(f"piecewise graphs need max_tokens >= {MIN_BUCKET}, got {max_tokens}")
    buckets = [b for b in (16, 32, 64, 128) if b < max_tokens]
    buckets += list(range(192, max_tokens, 64))
    return buckets + [max_tokens]


class PiecewiseGraphRunner:
    def __init__(self, worker, mode: str, max_tokens: int):
        if mode not in ("capture", "static"):
            raise ValueError(f"PiecewiseGraphRunner mode must be 'capture' or 'static', got {mode!r}")
        self.worker, self.mode = worker, mode
        eng, dev = worker.engine, worker.device
        self.max_tokens = min(max_tokens, eng.build.max_num_tokens)
        self.buckets = token_buckets(self.max_tokens)
        self.max_bs = eng.build.max_batch_size
        max_blocks = -(-eng.build.max_seq_len // eng.build.tokens_per_block)
        self.inputs = StaticInputs(self.max_bs, max_blocks, dev, PIECEWISE_FIELDS, self.max_tokens)
        for name, view in self.inputs.dev.items():
            setattr(self, name, view)
        self.layers = worker.model.attention_layers()
        a, z = self.layers[0], dict(dtype=worker.dtype, device=dev)
        self.q_buf = torch.zeros(self.max_tokens, a.num_heads, a.head_dim, **z)
        self.out_buf = torch.zeros(self.max_tokens, a.num_heads, a.head_dim, **z)
        m, hidden = worker.mapping, eng.model.hidden_size
        self.first, self.last = m.is_first_stage, m.is_last_stage
        self.stage_in = None if self.first else torch.zeros(2, self.max_tokens, hidden, **z)
        self.stage_out = None if self.last else torch.zeros(2, self.max_tokens, hidden, **z)
        self.graphs: dict[int, list[torch.cuda.CUDAGraph]] = {}
        self.outputs: dict[int, torch.Tensor] = {}  # a bucket's last graph's output (the normed hidden)
        # one memory pool for every graph: the buckets never run at once, and a bucket's graphs run in capture order
        self.pool = torch.cuda.graph_pool_handle() if mode == "capture" else None
        self._cut = "inline"  # what `attention` does: "inline" (run it), "skip" (warm-up) or "capture"
        self._segments: list[torch.cuda.CUDAGraph] = []
        self.steps_run = 0

    def can_run(self, plan: StepPlan) -> bool:
        # (a step with prompt log-probabilities needs every token's hidden state: eager)
        return (plan.num_tokens <= self.max_tokens and plan.batch_size <= self.max_bs
                and plan.prompt_logprob_index is None)

    # ---- the forward, and where it is cut ----------------------------------------------------------------

    def attention(self, attn, q: torch.Tensor) -> torch.Tensor:
        """Called by each attention layer in place of its kernels: q into the static buffer, then the cut."""
        t = q.shape[0]
        self.q_buf[:t].copy_(q)
        if self._cut == "inline":
            attn.attend(self.q_buf[:t], self.out_buf[:t], get_metadata())
        elif self._cut == "capture":  # this layer's graph ends here; the next one begins
            self._segments[-1].capture_end()
            self._begin_segment()
        return self.out_buf[:t].view(t, -1)

    def _begin_segment(self) -> None:
        graph = torch.cuda.CUDAGraph()
        graph.capture_begin(pool=self.pool)
        self._segments.append(graph)

    def _forward(self, bucket: int) -> torch.Tensor:
        """The bucket's forward from the static buffers: the normed hidden [bucket, H] (last stage), else the stage
        output buffer. Attention layers call `attention`, which does what `_cut` says."""
        out = stage_forward(self, bucket)
        return self.stage_out if out is None else out

    def _capture_metadata(self, bucket: int) -> AttentionMetadata:
        """What the graphs read of the metadata: the slots (the KV write); the rest is the attention's, outside."""
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:bucket], block_tables=self.block_tables[:1], seq_lens=self.seq_lens[:1],
            cu_seqlens_q=self.cu_seqlens_q[:2], max_seqlen_q=bucket, is_decode=False,
            decode_workspace=self.worker.decode_workspace, piecewise=self,
        )

    def _capture(self, bucket: int) -> list[torch.cuda.CUDAGraph]:
        self.inputs.pad()  # padding tokens write no KV
        set_metadata(self._capture_metadata(bucket))
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        try:
            with torch.cuda.stream(stream):
                self._cut = "skip"
                for _ in range(2):  # warm-up outside the graphs: Triton compiles, cuBLAS picks its kernels
                    self._forward(bucket)
                torch.cuda.synchronize()
                self._cut, self._segments = "capture", []
                self._begin_segment()
                self.outputs[bucket] = self._forward(bucket)
                self._segments[-1].capture_end()
        finally:
            self._cut = "inline"
            set_metadata(None)
        torch.cuda.current_stream().wait_stream(stream)
        if len(self._segments) != len(self.layers) + 1:
            raise RuntimeError(f"piecewise capture cut the forward into {len(self._segments)} graphs, expected "
                               f"{len(self.layers) + 1} (one cut per attention layer)")
        return self._segments

    @torch.inference_mode()
    def capture_all(self) -> None:
        """Capture every bucket at start-up, largest first so smaller ones reuse its memory in the shared pool."""
        if self.mode != "capture":
            return
        for bucket in reversed(self.buckets):
            self.graphs[bucket] = self._capture(bucket)
        torch.cuda.synchronize()

    # ---- one step -------------------------------------------------------------------------------------

    def _load(self, plan: StepPlan, bucket: int) -> None:
        t, b, n = plan.num_tokens, plan.batch_size, plan.num_samples
        values = {name: getattr(plan, name, None) for name, *_ in PIECEWISE_FIELDS}
        values["last_index"] = plan.sample_rows()
        counts = {"token": (t, bucket), "row": (b, b), "row+1": (b + 1, b + 1), "sample": (n, n)}
        self.inputs.load(values, counts, plan.block_tables, b)

    @torch.inference_mode()
    def run(self, plan: StepPlan) -> StepResult | None:
        t, b, w = plan.num_tokens, plan.batch_size, self.worker
        if not self.first:
            packed = comm.pp_recv((2, t, self.stage_in.shape[2]), w.dtype, w.mapping.pp_rank - 1)
            self.stage_in[:, :t].copy_(packed)
        bucket = next(x for x in self.buckets if x >= t)
        if self.mode == "capture" and bucket not in self.graphs:  # (capture_all took them all at start-up)
            self.graphs[bucket] = self._capture(bucket)
        self._load(plan, bucket)
        md = AttentionMetadata(
            slot_mapping=self.slot_mapping[:bucket], block_tables=self.block_tables[:b], seq_lens=self.seq_lens[:b],
            cu_seqlens_q=self.cu_seqlens_q[: b + 1], max_seqlen_q=plan.max_seqlen_q, is_decode=plan.is_decode,
            decode_workspace=w.decode_workspace, num_decode_rows=plan.num_decode_rows, piecewise=self,
        )
        set_metadata(md)
        if self.mode == "static":
            out = self._forward(bucket)
        else:
            segments = self.graphs[bucket]
            q, o = self.q_buf[:bucket], self.out_buf[:bucket]
            for graph, attn in zip(segments, self.layers):
                graph.replay()
                attn.attend(q, o, md)
            segments[-1].replay()
            out = self.outputs[bucket]
        self.steps_run += 1
        if not self.last:  # a copy: the next replay rewrites stage_out while this send may be in flight
            w.send_to_next_stage(out[:, :t].clone())
            return None
        n = plan.num_samples
        return w.sample_and_return(plan, out[self.last_index[:n]], self.inputs.sampling(n))

