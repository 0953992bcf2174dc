"""The decode-step fusions as the model layers wire them, on one rank (the kernels run through Triton's
interpreter without a GPU): a Llama attention block at batch 1 with the qkv GEMV's rotary + KV-write
epilogue (`Attention.project_rotate_and_cache`) must leave the same output and caches as the two-kernel
path, and must really skip the separate rotary kernel; batches it cannot take fall back."""

from __future__ import annotations

import os
from types import SimpleNamespace

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from dist_llm.config import ModelConfig  # noqa: E402
from dist_llm.kernels import get_ops  # noqa: E402
from dist_llm.kernels.gemv import gemv  # noqa: E402
from dist_llm.kernels.gemv_rotary_kv import gemv_rotary_kv  # noqa: E402
from dist_llm.layers.context import AttentionMetadata, set_metadata  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BLOCK_SIZE, NUM_BLOCKS = 4, 6


@pytest.fixture(scope="module")
def one_rank():
    from dist_llm.parallel.state import destroy, init_distributed

    init_distributed(1, 1, backend="gloo", device="cpu")
    yield
    destroy()


def _layer(cfg, ops, dtype, state=None):
    from dist_llm.models.llama import LlamaAttention

    layer = LlamaAttention(cfg, 64, dtype, ops).to(DEVICE)
    if state is None:
        g = torch.Generator().manual_seed(0)
        for p in layer.parameters():
            p.copy_((torch.randn(p.shape, generator=g) * 0.2).to(dtype))
    else:
        layer.load_state_dict(state)
    layer.attn.rotary_emb.build_cache(torch.device(DEVICE))
    layer.qkv_proj.gemv = layer.o_proj.gemv = gemv
    return layer


def _caches(hk, d, dtype):
    g = torch.Generator().manual_seed(1)
    k = torch.randn(NUM_BLOCKS, BLOCK_SIZE, hk, d, generator=g).to(dtype).to(DEVICE)
    return k, torch.randn(k.shape, generator=g).to(dtype).to(DEVICE)


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("qkv_bias", [False, True], ids=["", "qkv_bias"])
def test_fused_qkv_rotary_kv_in_the_attention_block_matches_two_kernels(one_rank, dtype, qkv_bias):
    cfg = ModelConfig("LlamaForCausalLM", vocab_size=64, hidden_size=48, intermediate_size=96, num_layers=1,
                      num_heads=6, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0,
                      max_position_embeddings=64, qkv_bias=qkv_bias)  # fmt: skip
    ops = get_ops("triton")
    plain = _layer(cfg, ops, dtype)

    def no_rotary_kernel(*args, **kwargs):
        raise AssertionError("the fused path must not run the separate rotary + KV-write kernel")

    fused = _layer(cfg, SimpleNamespace(**{**vars(ops), "rotary_and_write_kv": no_rotary_kernel}), dtype,
                   plain.state_dict())  # fmt: skip
    fused.attn.qkv_rotary_kv = gemv_rotary_kv
    x = (torch.randn(1, cfg.hidden_size, generator=torch.Generator().manual_seed(2)) * 0.5).to(dtype).to(DEVICE)
    positions = torch.tensor([9], device=DEVICE)  # logical block 2 of the table: physical block 5, offset 1
    results = []
    for layer in (plain, fused):
        layer.attn.k_cache, layer.attn.v_cache = _caches(cfg.num_kv_heads, cfg.head_dim, dtype)
        i32 = dict(dtype=torch.int32, device=DEVICE)
        set_metadata(AttentionMetadata(
            slot_mapping=torch.tensor([5 * BLOCK_SIZE + 1], device=DEVICE),
            block_tables=torch.tensor([[3, 0, 5]], **i32), seq_lens=torch.tensor([10], **i32),
            cu_seqlens_q=torch.tensor([0, 1], **i32), max_seqlen_q=1, is_decode=True,
        ))  # fmt: skip
        results.append((layer(positions, x), layer.attn.k_cache, layer.attn.v_cache))
    set_metadata(None)
    for name, a, b in zip(("out", "k_cache", "v_cache"), *results):
        assert torch.equal(a, b), name
    assert not torch.equal(results[0][1], _caches(cfg.num_kv_heads, cfg.head_dim, dtype)[0])  # the step's K landed

    # two tokens: the fused GEMV does not take them, and the layer runs the two kernels
    assert fused.attn.project_rotate_and_cache(fused.qkv_proj, positions.repeat(2), x.repeat(2, 1)) is None


def _model(cfg, ops, dtype, fold: bool, state=None, use_gemv: bool = True):
    """A one-rank LlamaForCausalLM with the decode GEMV on every projection (unless not `use_gemv`; and the
    norm fold's producer on o/down where `fold`), caches bound, random weights (norm weights around 1)."""
    from dist_llm.kernels.gemv_norm import gemv_add_norm
    from dist_llm.layers.embedding import ParallelLMHead
    from dist_llm.layers.linear import LinearBase, RowParallelLinear
    from dist_llm.models.llama import LlamaForCausalLM
    from dist_llm.parallel.mapping import Mapping

    model = LlamaForCausalLM(cfg, Mapping(), 64, dtype, ops).to(DEVICE)
    if state is None:
        g = torch.Generator().manual_seed(0)
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            p.copy_((1.0 + 0.2 * r if "norm" in name else 0.3 * r).to(dtype))
    else:
        model.load_state_dict(state)
    for m in model.modules():
        if isinstance(m, (LinearBase, ParallelLMHead)) and use_gemv:
            m.gemv = gemv
        if isinstance(m, RowParallelLinear) and fold:
            m.gemv_add_norm = gemv_add_norm
    for attn in model.attention_layers():
        attn.rotary_emb.build_cache(torch.device(DEVICE))
        attn.k_cache, attn.v_cache = _caches(cfg.num_kv_heads, cfg.head_dim, dtype)
    return model


@torch.no_grad()
@pytest.mark.parametrize("rope", [False, True], ids=["", "rope"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_norm_fold_in_the_model_matches_the_norm_kernels(one_rank, dtype, rope):
    """At one decode token the o and down GEMVs fold the residual add + RMSNorm (`kernels/gemv_norm.py`): no
    fused add-norm kernel runs, the only norm kernel is the first layer's input norm, and the logits are as
    close to a float64 torch run of the same weights as the unfolded model's are (a rounding changes, so
    not the same bits; on the GPU the attention's tf32 / 16-bit products widen both errors alike); with the
    rotary fusion too, the qkv GEMV takes the folded norm and no separate rotary kernel runs. At two tokens
    nothing is folded and the two models give the same bits."""
    from dist_llm.layers.norm import DeferredNorm

    cfg = ModelConfig("LlamaForCausalLM", vocab_size=50, hidden_size=48, intermediate_size=72, num_layers=3,
                      num_heads=3, num_kv_heads=1, head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0,
                      max_position_embeddings=64)  # fmt: skip  (head_dim 16: the GPU attention's tl.dot minimum)
    ops = get_ops("triton")
    calls = {"rms_norm": 0, "fused_add_rms_norm": 0, "rotary_and_write_kv": 0}

    def counted(name):
        def op(*args, **kwargs):
            calls[name] += 1
            return getattr(ops, name)(*args, **kwargs)

        return op

    counting = SimpleNamespace(**{**vars(ops), **{name: counted(name) for name in calls}})
    plain = _model(cfg, ops, dtype, fold=False)
    folded = _model(cfg, counting, dtype, fold=True, state=plain.state_dict())
    if rope:
        for attn in folded.attention_layers():
            attn.qkv_rotary_kv = gemv_rotary_kv
    exact = _model(cfg, get_ops("torch"), torch.float64, fold=False, state=plain.state_dict(), use_gemv=False)
    i32 = dict(dtype=torch.int32, device=DEVICE)
    for batch in (1, 2):
        logits = []
        calls.update(rms_norm=0, fused_add_rms_norm=0, rotary_and_write_kv=0)  # only `folded` counts
        for model in (plain, folded, exact):
            for attn in model.attention_layers():  # the same cache contents for all (the dtype's values)
                k, v = _caches(cfg.num_kv_heads, cfg.head_dim, dtype)
                attn.k_cache, attn.v_cache = k.to(attn.k_cache.dtype), v.to(attn.v_cache.dtype)
            set_metadata(AttentionMetadata(
                slot_mapping=torch.tensor([5 * BLOCK_SIZE + 1, 4 * BLOCK_SIZE + 2][:batch], device=DEVICE),
                block_tables=torch.tensor([[3, 0, 5], [1, 4, 0]][:batch], **i32),
                seq_lens=torch.tensor([10, 7][:batch], **i32), cu_seqlens_q=torch.arange(batch + 1, **i32),
                max_seqlen_q=1, is_decode=True,
            ))  # fmt: skip
            positions = torch.tensor([9, 6][:batch], device=DEVICE)
            hidden = model(positions, input_ids=torch.tensor([3, 17][:batch], device=DEVICE))
            assert isinstance(hidden, DeferredNorm) == (model is folded and batch == 1)
            logits.append(model.compute_logits(hidden).double())
        set_metadata(None)
        if batch == 1:
            rotary = 0 if rope else cfg.num_layers  # with rope, every qkv GEMV (layer 0's too) rotates
            assert calls == {"rms_norm": 1, "fused_add_rms_norm": 0, "rotary_and_write_kv": rotary}, calls
            err_plain, err_fold = ((x - logits[2]).abs().max().item() for x in logits[:2])
            scale = logits[2].abs().max().item()
            assert err_fold <= 3 * err_plain + 1e-6 * scale, (err_fold, err_plain, scale)
            assert err_fold < (1e-4 if dtype == torch.float32 else 0.1) * scale, (err_fold, scale)
        else:
            expected = {"rms_norm": 1, "fused_add_rms_norm": 2 * cfg.num_layers, "rotary_and_write_kv": cfg.num_layers}
            assert calls == expected, calls  # the final norm too
            assert torch.equal(logits[1], logits[0])


@torch.no_grad()
def test_a_layer_without_the_gemv_materializes_a_deferred_norm(one_rank):
    """A consumer that cannot fold the norm (no decode GEMV here; a quantized method) gets the normed tensor:
    `DeferredNorm.materialize()`, the RMSNorm of the updated residual, then its own matmul."""
    from dist_llm.kernels.gemv_norm import gemv_add_norm
    from dist_llm.layers.linear import ColumnParallelLinear, RowParallelLinear
    from dist_llm.layers.norm import DeferredNorm, RMSNorm

    ops, dtype = get_ops("triton"), torch.bfloat16
    g = torch.Generator().manual_seed(3)
    producer = RowParallelLinear(40, 24, False, dtype, reduce_results=False).to(DEVICE)
    consumer = ColumnParallelLinear(24, 17, True, dtype).to(DEVICE)
    norm = RMSNorm(24, 1e-5, dtype, ops).to(DEVICE)
    for p in (producer.weight, consumer.weight, consumer.bias, norm.weight):
        p.copy_((torch.randn(p.shape, generator=g) * 0.3 + (1.0 if p is norm.weight else 0.0)).to(dtype))
    producer.gemv, producer.gemv_add_norm = gemv, gemv_add_norm
    x = torch.randn(1, 40, generator=g).to(dtype).to(DEVICE)
    residual = torch.randn(1, 24, generator=g).to(dtype).to(DEVICE)
    expected_residual = residual.clone()
    y = producer(x)
    folded = producer.add_norm(x, residual, norm)
    assert isinstance(folded, DeferredNorm) and folded.residual is residual
    ops.fused_add_rms_norm(y, expected_residual, norm.weight, 1e-5)  # in place: y <- the normed residual
    normed = y
    assert torch.equal(residual, expected_residual)
    assert torch.equal(folded.materialize(), normed)
    assert consumer.gemv is None  # so F.linear, on the materialized norm
    assert torch.equal(consumer(folded), torch.nn.functional.linear(normed, consumer.weight, consumer.bias))
    assert producer.add_norm(x.repeat(2, 1), residual.repeat(2, 1), norm) is None  # two tokens: not folded
