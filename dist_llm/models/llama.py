"""The Llama family: LlamaForCausalLM, MistralForCausalLM and Qwen2ForCausalLM (q/k/v bias).

One pipeline stage of the model: stage s builds only its layers (global indices kept, so engine names
match `layers.{i}...`); the first stage owns the embedding, the last the final norm and LM head.
No collectives here: they live in the parallel layers.
"""

from __future__ import annotations

import torch
from torch import nn

from dist_llm.config import ModelConfig
from dist_llm.layers.attention import Attention
from dist_llm.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from dist_llm.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear, takes_gemv
from dist_llm.layers.norm import DeferredNorm, RMSNorm
from dist_llm.layers.rotary import RotaryEmbedding
from dist_llm.parallel.mapping import Mapping


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, max_position: int, dtype: torch.dtype, ops):
        super().__init__()
        self.qkv_proj = QKVParallelLinear(
            cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads, cfg.qkv_bias, dtype
        )
        # without a bias, o_proj leaves its tp sum to post_attention_layernorm (fused with the norm)
        self.o_proj = RowParallelLinear(
            cfg.num_heads * cfg.head_dim, cfg.hidden_size, cfg.o_bias, dtype, reduce_results=cfg.o_bias
        )
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.head_dim = cfg.head_dim
        rotary_emb = RotaryEmbedding(cfg.head_dim, cfg.rotary_dim, max_position, cfg.rope_theta, cfg.rope_scaling)
        self.attn = Attention(self.num_heads, self.num_kv_heads, cfg.head_dim, cfg.head_dim**-0.5, rotary_emb, ops)

    def attend(self, positions: torch.Tensor, x: torch.Tensor | DeferredNorm) -> torch.Tensor:
        """The attention's output before o_proj."""
        t, d = x.shape[0], self.head_dim
        qkv = self.attn.project_rotate_and_cache(self.qkv_proj, positions, x)  # one kernel at batch 1
        done = qkv is not None
        if not done:
            qkv = self.qkv_proj(x)
        q_size, kv_size = self.num_heads * d, self.num_kv_heads * d
        q = qkv[:, :q_size].view(t, self.num_heads, d)
        k = qkv[:, q_size : q_size + kv_size].view(t, self.num_kv_heads, d)
        v = qkv[:, q_size + kv_size :].view(t, self.num_kv_heads, d)
        return self.attn(positions, q, k, v, rotated_and_cached=done)

    def forward(self, positions: torch.Tensor, x: torch.Tensor | DeferredNorm) -> torch.Tensor:
        return self.o_proj(self.attend(positions, x))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, ops):
        super().__init__()
        self.ops = ops
        self.gate_up_proj = MergedColumnParallelLinear(
            cfg.hidden_size, [cfg.intermediate_size] * 2, False, dtype
        )
        # its tp sum is owed to the next norm: the next layer's input_layernorm or the final norm
        self.down_proj = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size, False, dtype, reduce_results=False)

    def forward(self, x: torch.Tensor | DeferredNorm, residual: torch.Tensor | None = None,
                next_norm: RMSNorm | None = None) -> torch.Tensor | DeferredNorm:  # fmt: skip
        """The MLP's output (before its tp sum), or, where the down GEMV can fold it (`add_norm`; one token,
        tp = 1), `next_norm(output, residual)` deferred, with the residual updated in place."""
        gate_up = self.gate_up_proj(x)
        if takes_gemv(self.down_proj, gate_up):  # decode: SiLU-and-mul in the down GEMV's prologue
            folded = self.down_proj.add_norm(gate_up, residual, next_norm, act="silu_and_mul")
            return folded if folded is not None else self.down_proj(gate_up, act="silu_and_mul")
        return self.down_proj(self.ops.silu_and_mul(gate_up))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, max_position: int, dtype: torch.dtype, ops):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, ops)
        self.self_attn = LlamaAttention(cfg, max_position, dtype, ops)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, ops)
        self.mlp = LlamaMLP(cfg, dtype, ops)

    def forward(self, positions, hidden, residual, next_norm: RMSNorm | None = None):
        """`hidden` is the embedding (residual None, first layer of the first stage) or the previous layer's
        MLP output before its tp sum; so is the returned one. The sums happen in the norms.

        At one decode token and tp = 1 the GEMVs fold the norms (`kernels/gemv_norm.py`): o_proj does the
        post-attention add and norm's first half, and with `next_norm` (the next layer's input norm or the
        final norm) so does down_proj; `hidden` and the result are then a `DeferredNorm`, already normed."""
        if not isinstance(hidden, DeferredNorm):
            hidden, residual = self.input_layernorm(hidden, residual, reduce=residual is not None)
        attn = self.self_attn
        out = attn.attend(positions, hidden)
        hidden = attn.o_proj.add_norm(out, residual, self.post_attention_layernorm)
        if hidden is None:
            hidden = attn.o_proj(out)
            hidden, residual = self.post_attention_layernorm(hidden, residual, reduce=not attn.o_proj.reduce_results)
        return self.mlp(hidden, residual, next_norm), residual


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, mapping: Mapping, max_position: int, dtype: torch.dtype, ops):
        super().__init__()
        self.cfg, self.mapping = cfg, mapping
        self.start_layer, self.end_layer = mapping.layer_range(cfg.num_layers)
        if mapping.is_first_stage:
            self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, dtype)
        self.layers = nn.ModuleDict(
            {str(i): LlamaDecoderLayer(cfg, max_position, dtype, ops) for i in range(self.start_layer, self.end_layer)}
        )
        if mapping.is_last_stage:
            self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, ops)
            self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, dtype)

    def tied_weights(self) -> dict[str, str]:
        """Parameters the engine stores once: tied embeddings on a rank that has both ends of the model."""
        single_stage = self.mapping.is_first_stage and self.mapping.is_last_stage
        return {"lm_head.weight": "embed_tokens.weight"} if self.cfg.tie_word_embeddings and single_stage else {}

    def tie_weights(self) -> None:
        if self.tied_weights():
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, positions, input_ids=None, hidden=None, residual=None):
        """First stage: from input_ids. Later stages: from the previous stage's (hidden, residual).
        Returns (hidden, residual) on inner stages and the final normed hidden on the last stage (a
        `DeferredNorm` where the last down GEMV folded the final norm: `compute_logits` takes either). An inner
        stage's hidden is its tp rank's term of the last MLP's sum: the next stage's tp group (its ranks
        receive from the same tp ranks) sums it in its first norm, which adds up the same numbers."""
        if self.mapping.is_first_stage:
            hidden, residual = self.embed_tokens(input_ids), None
        layers = list(self.layers.values())
        # the norm after each layer, which its down GEMV may fold (none after an inner stage's last layer)
        next_norms = [layer.input_layernorm for layer in layers[1:]]
        next_norms.append(self.norm if self.mapping.is_last_stage else None)
        for layer, next_norm in zip(layers, next_norms):
            hidden, residual = layer(positions, hidden, residual, next_norm)
        if not self.mapping.is_last_stage:
            return hidden, residual
        if isinstance(hidden, DeferredNorm):  # normed already: the LM head's GEMV applies it
            return hidden
        hidden, _ = self.norm(hidden, residual, reduce=residual is not None)
        return hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn.attn for layer in self.layers.values()]


# The Mistral and Qwen2 checkpoints load into the same module; Qwen2's q/k/v bias comes from the config.
MistralForCausalLM = LlamaForCausalLM
Qwen2ForCausalLM = LlamaForCausalLM
