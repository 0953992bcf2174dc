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
