"""How each HF weight is split across the tp × pp grid (docs/architecture.md, "Weight layout")."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dist_llm.config import ModelConfig
from dist_llm.errors import CheckpointError, DistLLMError
from dist_llm.layers.embedding import padded_vocab_size
from dist_llm.parallel.mapping import Mapping, layer_range

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_IGNORED = re.compile(r"rotary_emb\.inv_freq$")
COLUMN = {"self_attn.q_proj", "mlp.gate_proj", "mlp.up_proj"}
KV = {"self_attn.k_proj", "self_attn.v_proj"}
ROW = {"self_attn.o_proj", "mlp.down_proj"}
REPLICATED = {"input_layernorm", "post_attention_layernorm"}


def validate_parallelism(cfg: ModelConfig, tp: int, pp: int) -> None:
    if cfg.num_heads % tp:
        raise DistLLMError(f"--tp_size {tp} does not divide num_attention_heads={cfg.num_heads}; pick a divisor")
    if cfg.num_kv_heads % tp and tp % cfg.num_kv_heads:
        raise DistLLMError(
            f"--tp_size {tp} and num_key_value_heads={cfg.num_kv_heads}: one must divide the other "
            "(KV heads are split when tp <= kv heads and replicated when tp is a multiple of them)"
        )
    if cfg.intermediate_size % tp:
        raise DistLLMError(f"--tp_size {tp} does not divide intermediate_size={cfg.intermediate_size}")
    if pp > cfg.num_layers:
        raise DistLLMError(
            f"--pp_size {pp} exceeds the model's {cfg.num_layers} layers; use --pp_size <= {cfg.num_layers}"
        )


def kv_heads_of_rank(num_kv_heads: int, tp: int, tp_rank: int) -> tuple[int, int]:
    """(first KV head, number of KV heads) that tp rank `tp_rank` holds."""
    if tp <= num_kv_heads:
        per = num_kv_heads // tp
        return tp_rank * per, per
    return tp_rank // (tp // num_kv_heads), 1


@dataclass
class Shard:
    name: str  # name in the rank file
    source: str  # HF tensor it comes from
    shape: tuple[int, ...]
    take: Callable[[torch.Tensor], torch.Tensor]


def _rows(start: int, count: int):
    return lambda t: t.narrow(0, start, count)


def _cols(start: int, count: int):
    return lambda t: t.narrow(1, start, count)


def _vocab_rows(vocab: int, tp: int, tp_rank: int):
    rows = padded_vocab_size(vocab, tp) // tp

    def take(t):
        if t.shape[0] < padded_vocab_size(vocab, tp):
            t = F.pad(t, (0, 0, 0, padded_vocab_size(vocab, tp) - t.shape[0]))
        return t.narrow(0, tp_rank * rows, rows)

    return take, rows


def rank_shards(cfg: ModelConfig, mapping: Mapping, shapes: dict[str, tuple[int, ...]]) -> list[Shard]:
    """Every tensor rank `mapping.rank` holds, in source order, with the function that cuts it."""
    tp, r = mapping.tp_size, mapping.tp_rank
    start, end = layer_range(cfg.num_layers, mapping.pp_size, mapping.pp_rank)
    d = cfg.head_dim
    shards: list[Shard] = []
    has_lm_head = "lm_head.weight" in shapes
    for name, shape in shapes.items():
        if _IGNORED.search(name):
            continue
        if name == "model.embed_tokens.weight":
            take, rows = _vocab_rows(cfg.vocab_size, tp, r)
            if mapping.is_first_stage:
                shards.append(Shard(name, name, (rows, shape[1]), take))
            tied_here = cfg.tie_word_embeddings and not has_lm_head and not mapping.is_first_stage
            if tied_here and mapping.is_last_stage:
                shards.append(Shard("lm_head.weight", name, (rows, shape[1]), take))
            continue
        if name == "lm_head.weight":
            if mapping.is_last_stage:
                take, rows = _vocab_rows(cfg.vocab_size, tp, r)
                shards.append(Shard(name, name, (rows, shape[1]), take))
            continue
        if name == "model.norm.weight":
            if mapping.is_last_stage:
                shards.append(Shard(name, name, shape, lambda t: t))
            continue
        m = _LAYER.match(name)
        if not m:
            raise CheckpointError(f"unexpected tensor {name!r} for {cfg.architecture}; is this checkpoint a variant?")
        layer, rest = int(m.group(1)), m.group(2)
        if not start <= layer < end:
            continue
        module, _, kind = rest.rpartition(".")
        if module in REPLICATED:
            shards.append(Shard(name, name, shape, lambda t: t))
        elif module in COLUMN:
            n = shape[0] // tp
            shards.append(Shard(name, name, (n, *shape[1:]), _rows(r * n, n)))
        elif module in KV:
            first, count = kv_heads_of_rank(cfg.num_kv_heads, tp, r)
            shards.append(Shard(name, name, (count * d, *shape[1:]), _rows(first * d, count * d)))
        elif module in ROW and kind == "weight":
            n = shape[1] // tp
            shards.append(Shard(name, name, (shape[0], n), _cols(r * n, n)))
        elif module in ROW and kind == "bias":
            shards.append(Shard(name, name, shape, lambda t: t))  # added once, after the all-reduce
        else:
            raise CheckpointError(f"unexpected tensor {name!r} for {cfg.architecture}; is this checkpoint a variant?")
    return shards


def required_tensors(cfg: ModelConfig) -> list[str]:
    """HF tensor names a complete checkpoint of this config must contain."""
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if not cfg.tie_word_embeddings:
        names.append("lm_head.weight")
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        names += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
        names += [p + f"self_attn.{x}_proj.weight" for x in "qkvo"]
        names += [p + f"mlp.{x}_proj.weight" for x in ("gate", "up", "down")]
        if cfg.qkv_bias:
            names += [p + f"self_attn.{x}_proj.bias" for x in "qkv"]
        if cfg.o_bias:
            names.append(p + "self_attn.o_proj.bias")
    return names
