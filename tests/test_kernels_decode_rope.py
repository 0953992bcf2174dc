"""Decode attention with the rotary and the KV write inside it (`rotary_kv_decode_attention`) against
reference.py's `rotary_and_write_kv_ref` followed by `paged_decode_attention_ref`.

Caches come from test_kernels_attention.paged_cache (NaN wherever no sequence owns a slot); the slot of
each sequence's new token (position seq_len - 1) is poisoned to NaN as well, so the output is NaN unless
the kernel wrote the rotated K/V there before reading it. A padding row (slot -1) must leave the caches
untouched. q, k, v are strided views of one qkv output, as in the attention layer, and stay unrotated.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from test_kernels_attention import BF16, DEVICE, F16, F32, GPU, NAN, close, paged_cache  # noqa: E402

from dist_llm.kernels.decode_attention import DecodeWorkspace, rotary_kv_decode_attention  # noqa: E402
from dist_llm.kernels.reference import rotary_kv_decode_attention_ref  # noqa: E402

MAX_POS = 4096

# (head_dim, seq_lens, block_size, (Hq, Hk), dtype, partition size or None, rot_dim, is_neox, padding row)
CASES = [
    (64, [1, 17, 300], 16, (2, 2), F32, 64, 64, True, False),
    (80, [300, 1, 45, 129], 64, (4, 1), F16, 64, 80, False, True),  # GPT-J layout
    (128, [300], 16, (8, 1), BF16, None, 128, True, False),
    (96, [17, 300, 2], 32, (4, 2), BF16, 128, 48, True, True),  # partial rotary
    (80, [64, 65, 1], 16, (3, 3), F32, 64, 32, False, False),  # partial rotary, GPT-J
    (128, [129, 3], 64, (8, 2), F16, None, 128, True, True),
]
if GPU:
    CASES += [(128, [2048] * 6 + [1, 4000], 16, (32, 8), BF16, 1024, 128, True, True)]


def cos_sin_cache(rot_dim):
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rot_dim, 2, dtype=torch.float32) / rot_dim))
    freqs = torch.outer(torch.arange(MAX_POS, dtype=torch.float32), inv_freq)
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(DEVICE)


@pytest.mark.parametrize("head_dim,seq_lens,block_size,heads,dtype,partition,rot_dim,is_neox,padding", CASES)
def test_rotary_kv_decode_attention(head_dim, seq_lens, block_size, heads, dtype, partition, rot_dim, is_neox,
                                    padding):  # fmt: skip
    hq, hk = heads
    if padding:  # a CUDA graph's padding row: seq_len 1, slot -1
        seq_lens = seq_lens[:-1] + [1]
    gen = torch.Generator().manual_seed(hash((head_dim, block_size, heads, rot_dim)) % 2**31)
    k_cache, v_cache, table = paged_cache(seq_lens, block_size, hk, head_dim, dtype, gen)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    last = lens.long() - 1
    slots = table.long().gather(1, (last // block_size)[:, None])[:, 0] * block_size + last % block_size
    for cache in (k_cache, v_cache):
        cache.view(-1, hk, head_dim)[slots] = NAN  # the kernel must write the new token before it reads it
    if padding:  # no cache write; it attends to whatever its first slot holds
        slots[-1] = -1
        for cache in (k_cache, v_cache):
            cache.view(-1, hk, head_dim)[table[-1, 0].long() * block_size] = 1.0
    qkv = torch.randn(len(seq_lens), (hq + 2 * hk) * head_dim, generator=gen).to(dtype).to(DEVICE)
    q, k, v = qkv.split((hq * head_dim, hk * head_dim, hk * head_dim), dim=1)
    q, k, v = q.unflatten(1, (hq, head_dim)), k.unflatten(1, (hk, head_dim)), v.unflatten(1, (hk, head_dim))
    positions = last if not padding else torch.cat([last[:-1], last.new_zeros(1)])
    cs = cos_sin_cache(rot_dim)
    ws = None
    if partition is not None:
        ws = DecodeWorkspace.allocate(len(seq_lens), hq, head_dim, table.shape[1] * block_size, DEVICE, partition)
    scale = head_dim**-0.5

    kc_ref, vc_ref = k_cache.clone(), v_cache.clone()
    expected = rotary_kv_decode_attention_ref(
        positions, q, k, v, cs, is_neox, kc_ref, vc_ref, slots, table, lens, scale, torch.empty_like(q)
    )
    qkv_before = qkv.clone()
    out = torch.full_like(q, NAN)
    res = rotary_kv_decode_attention(
        positions, q, k, v, cs, is_neox, k_cache, v_cache, slots, table, lens, scale, out, ws
    )  # fmt: skip
    assert res is out
    close(out, expected, dtype)
    torch.testing.assert_close(qkv, qkv_before, rtol=0, atol=0)  # inputs are left unrotated
    written = slots[slots >= 0]
    for got, want in ((k_cache, kc_ref), (v_cache, vc_ref)):
        close(got.view(-1, hk, head_dim)[written], want.view(-1, hk, head_dim)[written], dtype)
        got.view(-1, hk, head_dim)[written] = want.view(-1, hk, head_dim)[written]
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)  # nothing else was touched
    if ws is not None:
        assert int(ws.counters.count_nonzero()) == 0
