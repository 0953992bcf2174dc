"""One rank's share of the model: loads its engine shard, owns its KV pool, executes step plans."""

from __future__ import annotations

import os

import torch
from safetensors import safe_open

from dist_llm.config import EngineConfig
from dist_llm.errors import CheckpointError
from dist_llm.kernels import get_ops
from dist_llm.layers.attention import Attention
from dist_llm.layers.context import AttentionMetadata, set_metadata
from dist_llm.layers.embedding import ParallelLMHead
from dist_llm.layers.linear import LinearBase, RowParallelLinear
from dist_llm.layers.rotary import RotaryEmbedding
from dist_llm.models import get_model_class
from dist_llm.parallel import comm
from dist_llm.parallel.state import ParallelState
from dist_llm.runtime.kv_sizing import kv_cache_dtype as resolve_kv_cache_dtype
from dist_llm.runtime.kv_sizing import kv_cache_layout
from dist_llm.runtime.logits_processing import apply_logits_processing
from dist_llm.runtime.plan import SAMPLING_FIELDS, StepPlan, StepResult

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def load_weights(model: torch.nn.Module, path: str, device: torch.device) -> None:
    """Copy the rank file straight into the module: names and shapes must already match."""
    tied = model.tied_weights()
    expected = {k: v for k, v in model.state_dict().items() if k not in tied}
    try:
        f = safe_open(path, framework="pt", device=str(device))
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing from the engine") from None
    except Exception as e:
        raise CheckpointError(f"{path} is truncated or corrupted ({type(e).__name__}: {e})") from None
    with f:
        have = set(f.keys())
        loaded = {}
        for name, param in expected.items():
            if name not in have:
                raise CheckpointError(f"tensor {name!r} is missing from {path}")
            t = f.get_tensor(name)
            if t.shape != param.shape or t.dtype != param.dtype:
                raise CheckpointError(
                    f"tensor {name!r} in {path} is {t.dtype}{tuple(t.shape)}, the model expects "
                    f"{param.dtype}{tuple(param.shape)}: rebuild the engine with this dist_llm version"
                )
            loaded[name] = t
    model.load_state_dict(loaded, strict=not tied, assign=True)
    model.tie_weights()


@torch.no_grad()
def init_dummy_weights(model: torch.nn.Module, device: torch.device, std: float = 0.02) -> None:
    """Random weights made directly on the device (benchmarks: no checkpoint on disk)."""
    model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    for name, p in model.named_parameters():
        if "norm" in name:
            p.fill_(1.0)
        else:
            p.normal_(0.0, std, generator=gen)
    model.tie_weights()


def use_decode_gemv(kernel_backend: str, device: torch.device) -> bool:
    """The Triton GEMV for decode's few-row matmuls: on the GPU with the Triton kernels. DIST_LLM_GEMV=0
    turns it off (cuBLAS everywhere), to compare."""
    return kernel_backend == "triton" and device.type == "cuda" and os.environ.get("DIST_LLM_GEMV", "1") != "0"


class TokenReturn:
    """Sampled ids to the host through pinned memory, without waiting: a ring of buffers, so a copy in
    flight is never overwritten by the next step's (at most `depth - 1` results outstanding)."""

    def __init__(self, max_batch_size: int, device: torch.device, depth: int = 4):
        cuda = device.type == "cuda"
        self.buffers = [torch.zeros(max_batch_size, dtype=torch.int64, pin_memory=cuda) for _ in range(depth)]
        self.events = [torch.cuda.Event() if cuda else None for _ in range(depth)]  # one per buffer
        self.next = 0

    def start(self, tokens: torch.Tensor, extras: dict[str, torch.Tensor] | None = None) -> StepResult:
        """`extras`: more StepResult fields (log-probabilities), copied to fresh pinned tensors on the same event."""
        i, self.next = self.next, (self.next + 1) % len(self.buffers)
        buf, ready = self.buffers[i][: tokens.shape[0]], self.events[i]
        buf.copy_(tokens, non_blocking=True)
        host = {}
        for name, t in (extras or {}).items():
            host[name] = torch.empty(t.shape, dtype=t.dtype, pin_memory=ready is not None)
            host[name].copy_(t, non_blocking=True)
        if ready is not None:
            ready.record()
        return StepResult(token_ids=buf, ready=ready, **host)


class Worker:
    def __init__(self, engine_dir: str, engine: EngineConfig, pstate: ParallelState, kernel_backend: str,
                 kv_cache_dtype: str = "auto"):  # fmt: skip
        self.engine, self.pstate = engine, pstate
        self.mapping, self.device = pstate.mapping, pstate.device
        self.dtype = TORCH_DTYPES[engine.dtype]
        self.kv_dtype = resolve_kv_cache_dtype(kv_cache_dtype, self.dtype, self.device)
        self.ops = get_ops(kernel_backend)
        model_cls = get_model_class(engine.model.architecture)
        with torch.device("meta"):
            self.model = model_cls(engine.model, self.mapping, engine.build.max_seq_len, self.dtype, self.ops)
        if engine.weights == "dummy":
            init_dummy_weights(self.model, self.device)
        else:
            load_weights(self.model, os.path.join(engine_dir, f"rank{self.mapping.rank}.safetensors"), self.device)
        for m in self.model.modules():
            if isinstance(m, RotaryEmbedding):
                m.build_cache(self.device)
        if use_decode_gemv(self.ops.backend, self.device):
            from dist_llm.kernels.gemv import gemv
            from dist_llm.kernels.gemv_norm import FOLD_NORM, gemv_add_norm
            from dist_llm.kernels.gemv_rotary_kv import FUSE_ROPE_KV, gemv_rotary_kv

            for m in self.model.modules():
                if isinstance(m, (LinearBase, ParallelLMHead)):
                    m.gemv = gemv
                if isinstance(m, RowParallelLinear) and FOLD_NORM:
                    m.gemv_add_norm = gemv_add_norm
                if isinstance(m, Attention) and FUSE_ROPE_KV:
                    m.qkv_rotary_kv = gemv_rotary_kv
        self.model.eval()
        self.num_blocks = 0
        self._pending_send = None  # the previous micro-batch's activations, still on their way
        self.graph_runner = None
        self.piecewise_runner = None
        self.decode_workspace = self._decode_workspace()
        # the last step's sampled ids stay on the device: an overlapped next step reads its inputs here
        # (a step samples a row per sequence, or per token of a speculative request's drafts: max_num_tokens at most)
        rows = max(engine.build.max_batch_size, engine.build.max_num_tokens)
        self.sampled = torch.zeros(rows, dtype=torch.int64, device=self.device)
        self.token_return = TokenReturn(rows, self.device)
        # benchmarks set it to [] on a CUDA device: each step then appends (start event, end event, is_decode),
        # recorded on the stream around the step, which shows the GPU's idle gaps between steps
        self.timeline: list | None = None

    def _decode_workspace(self):
        """Split-KV partials for decode attention, allocated once (the torch reference needs none)."""
        attn = self.model.attention_layers()
        if self.ops.backend != "triton" or not attn:
            return None
        from dist_llm.kernels.decode_attention import DecodeWorkspace

        b = self.engine.build
        return DecodeWorkspace.allocate(b.max_batch_size, attn[0].num_heads, attn[0].head_dim, b.max_seq_len,
                                        self.device)

    # ---- KV cache -------------------------------------------------------------------------------

    def kv_bytes_per_block(self) -> int:
        attn = self.model.attention_layers()
        if not attn:
            return 0
        a = attn[0]
        elem = torch.empty(0, dtype=self.kv_dtype).element_size()
        return 2 * len(attn) * self.engine.build.tokens_per_block * a.num_kv_heads * a.head_dim * elem

    def allocate_kv_cache(self, num_blocks: int) -> None:
        from dist_llm.kernels.kv_cache import empty_kv_cache

        self.num_blocks = num_blocks
        bs, layout = self.engine.build.tokens_per_block, kv_cache_layout(self.kv_dtype)
        for a in self.model.attention_layers():
            shape = (num_blocks, bs, a.num_kv_heads, a.head_dim)
            a.k_cache = empty_kv_cache(*shape, self.kv_dtype, self.device, layout)
            a.v_cache = empty_kv_cache(*shape, self.kv_dtype, self.device, layout)

    def start(self, num_blocks: int, graphs: str, piecewise_graph_max_tokens: int) -> None:
        """The KV pool of `num_blocks`, the eager kernels' variants compiled (Triton on a GPU), then with `graphs`
        "capture" or "static" the decode graphs and, for steps of up to `piecewise_graph_max_tokens` tokens (within
        the engine's max_num_tokens), the piecewise ones; "off": none."""
        from dist_llm.runtime.piecewise_graphs import MIN_BUCKET
        from dist_llm.runtime.profile import run_compile_warmup

        self.allocate_kv_cache(num_blocks)
        if self.ops.backend == "triton" and self.device.type == "cuda":
            run_compile_warmup(self, num_blocks)
        if graphs != "off":
            self.enable_decode_graphs(graphs)
            most = min(piecewise_graph_max_tokens, self.engine.build.max_num_tokens)
            if most >= MIN_BUCKET:
                self.enable_piecewise_graphs(graphs, most)

    def enable_decode_graphs(self, mode: str) -> None:
        """Decode steps from static buffers: "capture" (CUDA graphs) or "static" (the same path, eager).
        Call after allocate_kv_cache: graphs hold the cache's addresses."""
        from dist_llm.runtime.cuda_graphs import DecodeGraphRunner

        self.graph_runner = DecodeGraphRunner(self, mode)
        self.graph_runner.capture_all()

    def enable_piecewise_graphs(self, mode: str, max_tokens: int) -> None:
        """Prefill and mixed steps of up to `max_tokens` tokens from graphs cut at attention ("capture"), or the
        same path eagerly ("static"). Call after allocate_kv_cache; runs the start-up warm-up steps through it
        (they write the pool's first blocks: before any request), so the attention kernels compile for its
        buffers now and not mid-run."""
        from dist_llm.runtime.piecewise_graphs import PiecewiseGraphRunner
        from dist_llm.runtime.profile import run_compile_warmup

        self.piecewise_runner = PiecewiseGraphRunner(self, mode, max_tokens)
        self.piecewise_runner.capture_all()
        if self.ops.backend == "triton" and self.device.type == "cuda":
            run_compile_warmup(self, self.num_blocks)

    def return_tokens(self, tokens: torch.Tensor, extras: dict[str, torch.Tensor] | None = None) -> StepResult:
        """The sampler rank starts the copy to the host; the other ranks' results are never read."""
        if self.mapping.rank == self.mapping.sampler_rank:
            return self.token_return.start(tokens, extras)
        return StepResult(token_ids=tokens)

    def close(self) -> None:
        """Drop the captured graphs before the process group goes: a graph holding NCCL work can make
        the communicator's destruction hang (pytorch/pytorch#115388)."""
        runners = [r for r in (self.graph_runner, self.piecewise_runner) if r is not None]
        for r in runners:
            r.graphs.clear()
        self.graph_runner = self.piecewise_runner = None
        if runners and self.device.type == "cuda":
            torch.cuda.synchronize()

    # ---- one step -------------------------------------------------------------------------------

    def wait_sends(self) -> None:
        if self._pending_send is not None:
            self._pending_send.wait()
            self._pending_send = None

    def send_to_next_stage(self, packed: torch.Tensor) -> None:
        """(hidden, residual) to the next stage, asynchronously; the previous send must be done first.
        `packed` must not be written again until the send is waited for."""
        self.wait_sends()
        self._pending_send = comm.pp_send(packed, self.mapping.pp_rank + 1)

    def execute(self, plan: StepPlan) -> StepResult | None:
        if self.timeline is None:
            return self._execute(plan)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        result = self._execute(plan)
        end.record()
        self.timeline.append((start, end, plan.is_decode))
        return result

    @torch.inference_mode()
    def _execute(self, plan: StepPlan) -> StepResult | None:
        if self.graph_runner is not None and self.graph_runner.can_run(plan):
            return self.graph_runner.run(plan)
        if self.piecewise_runner is not None and self.piecewise_runner.can_run(plan):
            return self.piecewise_runner.run(plan)
        dev = self.device
        positions = plan.positions.to(dev, non_blocking=True)
        set_metadata(AttentionMetadata(
            slot_mapping=plan.slot_mapping.to(dev, non_blocking=True),
            block_tables=plan.block_tables.to(dev, non_blocking=True),
            seq_lens=plan.seq_lens.to(dev, non_blocking=True),
            cu_seqlens_q=plan.cu_seqlens_q.to(dev, non_blocking=True),
            max_seqlen_q=plan.max_seqlen_q,
            is_decode=plan.is_decode,
            decode_workspace=self.decode_workspace,
            num_decode_rows=plan.num_decode_rows,
        ))
        m = self.mapping
        if m.is_first_stage:
            input_ids = plan.input_ids.to(dev, non_blocking=True)
            if plan.prev_index is not None:
                input_ids = self.ops.fill_pending(input_ids, plan.prev_index.to(dev, non_blocking=True), self.sampled)
            out = self.model(positions, input_ids=input_ids)
        else:
            shape = (2, plan.num_tokens, self.engine.model.hidden_size)
            packed = comm.pp_recv(shape, self.dtype, m.pp_rank - 1)
            out = self.model(positions, hidden=packed[0], residual=packed[1])
        if not m.is_last_stage:
            self.send_to_next_stage(torch.stack(out))
            return None
        extras = self.prompt_logprobs(plan, out)
        if plan.num_tokens == plan.batch_size:  # one token a sequence (so no drafts): every row is sampled
            hidden = out  # (and a `DeferredNorm`, the folded final norm of one token, cannot be indexed)
        else:
            hidden = out[plan.sample_rows().to(dev, non_blocking=True)]
        # non_blocking: a blocking copy would wait for the whole forward, and the host would then launch the
        # next step only after this one is done (a gap on the GPU after every eager step)
        params = {f: None if getattr(plan, f) is None else getattr(plan, f).to(dev, non_blocking=True)
                  for f in SAMPLING_FIELDS}
        return self.sample_and_return(plan, hidden, params, extras)

    def prompt_logprobs(self, plan: StepPlan, out) -> dict[str, torch.Tensor] | None:
        """{"prompt_logprobs": fp32 [P]}: at each of the plan's prompt_logprob_index rows of the forward's output,
        the log-probability of its target token; the LM head runs over 256 rows at a time (a long prompt's
        [T, V] logits would not fit). None when the plan asks for none."""
        if plan.prompt_logprob_index is None:
            return None
        dev = self.device
        index, targets = plan.prompt_logprob_index.to(dev), plan.prompt_logprob_targets.to(dev)
        # (one token: a folded norm, which cannot be indexed, and one target at most)
        chunks = [out] if plan.num_tokens == 1 else [out[index[i : i + 256]] for i in range(0, len(index), 256)]
        values = []
        for i, hidden in enumerate(chunks):
            logp = torch.log_softmax(self.model.compute_logits(hidden).float(), dim=-1)
            values.append(logp.gather(1, targets[i * 256 : (i + 1) * 256, None]).squeeze(1))
        return {"prompt_logprobs": torch.cat(values)}

    def sample_and_return(self, plan: StepPlan, hidden: torch.Tensor, params: dict,
                          extras: dict | None = None) -> StepResult:  # fmt: skip
        """The LM head over `hidden` (each sequence's last token), sampling with `params` ({SAMPLING_FIELDS name:
        its rows on the device}), and the ids (and logits or log-probabilities if the plan asks) on their way."""
        return self.sample_logits(plan, self.model.compute_logits(hidden), params, extras)

    def sample_logits(self, plan: StepPlan, logits: torch.Tensor, params, extras: dict | None = None) -> StepResult:
        """`sample_and_return` from the logits [B, V] (the model's dtype: the samplers read them as fp32), which
        are left as they are."""
        processed = logits
        if plan.logits_inputs is not None:  # (before the sampling below overwrites the previous step's ids)
            li = plan.logits_inputs.to(self.device)
            processed = apply_logits_processing(logits, li, self.sampled, self.ops.fill_pending)
        tokens = self.ops.sample(processed, **params, mode=plan.sampling_mode, out=self.sampled[: logits.shape[0]])
        extras = dict(extras or {})
        if plan.return_logprobs:  # on their way with the ids: no wait here, so overlap scheduling goes on
            logp = torch.log_softmax(logits.float(), dim=-1)
            extras["logprobs"] = logp.gather(1, tokens[:, None]).squeeze(1)
            if plan.top_logprobs:
                extras["top_logprobs"], extras["top_logprob_ids"] = logp.topk(plan.top_logprobs, dim=-1)
        result = self.return_tokens(tokens, extras)
        if plan.return_logits:  # (debugging: waits for the step)
            result.logits = logits.float().cpu()
        return result
