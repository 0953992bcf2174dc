"""The KV pool's two memory orders (kernels/kv_cache.empty_kv_cache): every cache kernel takes the cache's
strides, so a head-major ("hnd") cache must give bit for bit what the token-major ("nhd") one gives, in the
outputs and in the cache contents. Triton's interpreter on the CPU (small shapes), the GPU where there is one;
and the whole model on the CPU with DIST_LLM_KV_LAYOUT=hnd."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from conftest import convert_and_build, paged_layout  # noqa: E402

from dist_llm.errors import DistLLMError  # noqa: E402
from dist_llm.kernels.decode_attention import paged_decode_attention  # noqa: E402
from dist_llm.kernels.kv_cache import empty_kv_cache, write_kv_cache  # noqa: E402
from dist_llm.kernels.prefill_attention import context_attention  # noqa: E402
from dist_llm.kernels.reference import FP8_KV_DTYPE  # noqa: E402
from dist_llm.kernels.rotary_kv import rotary_and_write_kv  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def both_layouts(num_blocks, block_size, hk, d, dtype, gen):
    """The same random contents in an nhd and an hnd cache (K and V each)."""
    caches = {}
    for name in ("k", "v"):
        x = torch.randn(num_blocks, block_size, hk, d, generator=gen).to(dtype).to(DEVICE)
        pair = []
        for layout in ("nhd", "hnd"):
            c = empty_kv_cache(num_blocks, block_size, hk, d, dtype, DEVICE, layout)
            c.copy_(x)
            pair.append(c)
        caches[name] = pair
    return caches["k"], caches["v"]


def test_hnd_is_head_major_view():
    c = empty_kv_cache(3, 16, 4, 8, torch.float16, "cpu", "hnd")
    assert c.shape == (3, 16, 4, 8) and c.stride() == (16 * 4 * 8, 8, 16 * 8, 1)
    assert not c.is_contiguous() and c.transpose(1, 2).is_contiguous()
    assert empty_kv_cache(3, 16, 4, 8, torch.float16, "cpu", "nhd").is_contiguous()
    with pytest.raises(ValueError, match="layout"):
        empty_kv_cache(3, 16, 4, 8, torch.float16, "cpu", "bhnd")


@pytest.mark.parametrize("dtype,hq,hk,block_size", [(torch.bfloat16, 4, 2, 16), (torch.float16, 3, 3, 8),
                                                    (torch.float32, 2, 1, 16)])
def test_attention_same_bits_in_both_layouts(dtype, hq, hk, block_size):
    gen = torch.Generator().manual_seed(hq * 10 + block_size)
    d = 32
    seq_lens = [5, 37, 20]
    num_blocks, table, _ = paged_layout(seq_lens, block_size, gen)
    (k_nhd, k_hnd), (v_nhd, v_hnd) = both_layouts(num_blocks, block_size, hk, d, dtype, gen)
    table = table.to(torch.int32).to(DEVICE)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    q = torch.randn(len(seq_lens), hq, d, generator=gen).to(dtype).to(DEVICE)
    outs = [paged_decode_attention(q, kc, vc, table, lens, d**-0.5, torch.empty_like(q))
            for kc, vc in ((k_nhd, v_nhd), (k_hnd, v_hnd))]
    assert torch.equal(outs[0], outs[1])
    # prefill: the last 4 tokens of each sequence are the queries
    new = torch.tensor([4, 4, 4])
    cu = torch.zeros(len(seq_lens) + 1, dtype=torch.int32)
    cu[1:] = new.cumsum(0)
    qp = torch.randn(int(new.sum()), hq, d, generator=gen).to(dtype).to(DEVICE)
    outs = [context_attention(qp, kc, vc, table, lens, cu.to(DEVICE), 4, d**-0.5, torch.empty_like(qp))
            for kc, vc in ((k_nhd, v_nhd), (k_hnd, v_hnd))]
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, FP8_KV_DTYPE])
def test_writes_same_bits_in_both_layouts(cache_dtype):
    if cache_dtype == FP8_KV_DTYPE and DEVICE == "cuda" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 caches need compute capability 8.9")
    gen = torch.Generator().manual_seed(3)
    t, hq, hk, d, block_size, num_blocks = 5, 4, 2, 16, 8, 4
    (k_nhd, k_hnd), (v_nhd, v_hnd) = both_layouts(num_blocks, block_size, hk, d, cache_dtype, gen)
    slots = torch.tensor([0, 9, -1, 30, 17], device=DEVICE)
    k = torch.randn(t, hk, d, generator=gen).to(torch.bfloat16).to(DEVICE)
    v = torch.randn(t, hk, d, generator=gen).to(torch.bfloat16).to(DEVICE)
    write_kv_cache(k, v, k_nhd, v_nhd, slots)
    write_kv_cache(k, v, k_hnd, v_hnd, slots)
    assert torch.equal(k_nhd.float(), k_hnd.float()) and torch.equal(v_nhd.float(), v_hnd.float())
    # rotary + write, from views of one fused qkv row as the model passes them
    qkv = torch.randn(t, (hq + 2 * hk) * d, generator=gen).to(torch.bfloat16).to(DEVICE)
    cos_sin = torch.randn(64, d, generator=gen).to(DEVICE)
    positions = torch.tensor([0, 3, 7, 12, 63], device=DEVICE)
    results = []
    for kc, vc in ((k_nhd, v_nhd), (k_hnd, v_hnd)):
        x = qkv.clone()
        q_, k_, v_ = x.split([hq * d, hk * d, hk * d], dim=1)
        rotary_and_write_kv(positions, q_.view(t, hq, d), k_.view(t, hk, d), v_.view(t, hk, d), cos_sin, True,
                            kc, vc, slots)
        results.append((x, kc.float(), vc.float()))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_model_generates_the_same_tokens_in_both_layouts(tiny_models, tmp_path, monkeypatch):
    from dist_llm.runtime import ModelRunner

    engine = convert_and_build(tiny_models["llama"], tmp_path, 1, 1)
    prompts = [[5, 17, 99, 3, 42, 8, 250], [7] * 19]
    tokens = {}
    for layout in ("nhd", "hnd"):
        monkeypatch.setenv("DIST_LLM_KV_LAYOUT", layout)
        runner = ModelRunner.from_dir(engine, device=DEVICE, kernel_backend="triton", num_kv_blocks=32)
        try:
            caches = runner.executor.worker.model.attention_layers()[0].k_cache
            assert caches.transpose(1, 2).is_contiguous() == (layout == "hnd")
            outs = runner.generate(batch_input_ids=prompts, max_new_tokens=6)
            tokens[layout] = [o.output_token_ids for o in outs]
        finally:
            runner.shutdown()
    assert tokens["nhd"] == tokens["hnd"]
    monkeypatch.setenv("DIST_LLM_KV_LAYOUT", "blocks")
    with pytest.raises(DistLLMError, match="DIST_LLM_KV_LAYOUT"):
        ModelRunner.from_dir(engine, device="cpu", num_kv_blocks=32)


def test_auto_layout_by_cache_dtype(monkeypatch):
    """DIST_LLM_KV_LAYOUT unset or auto: head-major for an fp8 pool, token-major for a 16-bit or fp32 one; an explicit
    order wins over the dtype."""
    from dist_llm.runtime.kv_sizing import kv_cache_layout

    for value in (None, "auto"):
        if value is None:
            monkeypatch.delenv("DIST_LLM_KV_LAYOUT", raising=False)
        else:
            monkeypatch.setenv("DIST_LLM_KV_LAYOUT", value)
        assert kv_cache_layout(torch.float8_e4m3fn) == "hnd"
        assert [kv_cache_layout(d) for d in (torch.bfloat16, torch.float16, torch.float32)] == ["nhd"] * 3
    monkeypatch.setenv("DIST_LLM_KV_LAYOUT", "nhd")
    assert kv_cache_layout(torch.float8_e4m3fn) == "nhd"
    monkeypatch.setenv("DIST_LLM_KV_LAYOUT", "hnd")
    assert kv_cache_layout(torch.bfloat16) == "hnd"
