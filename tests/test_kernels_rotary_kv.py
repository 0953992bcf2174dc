"""The fused rotary + KV-cache write against the two kernels it replaces and against reference.py.

Without CUDA the kernels run through Triton's interpreter (TRITON_INTERPRET=1 is set here before
anything imports triton). q, k, v are strided views of one fused qkv output, as in the attention layer;
the caches start as a sentinel so a store to a slot nobody maps to (or to a padding token's slot 0)
shows. The fused kernel must match the unfused pair bit for bit, and the reference within tolerance.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from dist_llm.kernels import get_ops  # noqa: E402
from dist_llm.kernels import reference as ref  # noqa: E402
from dist_llm.kernels.kv_cache import write_kv_cache  # noqa: E402
from dist_llm.kernels.rotary import rotary_embedding  # noqa: E402
from dist_llm.kernels.rotary_kv import rotary_and_write_kv  # noqa: E402

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}
SENTINEL = -777.0
NUM_BLOCKS, BLOCK_SIZE, MAX_POS = 7, 4, 512

CASES = [  # (tokens, hq, hk, head_dim, rot_dim): a covering set, not a cross product
    (1, 5, 1, 64, 64),
    (3, 4, 2, 80, 80),
    (3, 4, 2, 96, 96),
    (17, 5, 1, 64, 32),  # partial rotary
    (3, 4, 2, 80, 48),  # partial rotary, head_dim and rot_dim not powers of 2
]
if GPU:
    CASES += [(64, 32, 32, 128, 128), (300, 32, 8, 128, 128), (1500, 40, 40, 64, 16)]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def make_inputs(num_tokens, hq, hk, head_dim, rot_dim, dtype):
    """qkv [T, (hq + 2 hk) D] with q, k, v views; positions; sentinel caches; slots with -1 padding rows."""
    qkv = torch.randn(num_tokens, (hq + 2 * hk) * head_dim, device=DEVICE).to(dtype)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rot_dim, 2, dtype=torch.float32) / rot_dim))
    freqs = torch.outer(torch.arange(MAX_POS, dtype=torch.float32), inv_freq)
    cos_sin = torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(DEVICE)
    positions = torch.randint(1, MAX_POS, (num_tokens,), device=DEVICE)
    num_slots = max(NUM_BLOCKS * BLOCK_SIZE, num_tokens + 4)
    slots = torch.randperm(num_slots, device=DEVICE)[:num_tokens]
    if num_tokens > 1:
        slots[[1, -1]] = -1  # padding tokens
    cache = torch.full((-(-num_slots // BLOCK_SIZE), BLOCK_SIZE, hk, head_dim), SENTINEL, dtype=dtype, device=DEVICE)
    return qkv, positions, cos_sin, slots, cache


def views(qkv, hq, hk, head_dim):
    q, k, v = qkv.split((hq * head_dim, hk * head_dim, hk * head_dim), dim=1)
    return q.unflatten(1, (hq, head_dim)), k.unflatten(1, (hk, head_dim)), v.unflatten(1, (hk, head_dim))


def run(fn, qkv, positions, cos_sin, slots, cache, hq, hk, is_neox):
    """fn on fresh copies of the inputs; returns (qkv, k_cache, v_cache) after it."""
    qkv, k_cache, v_cache = qkv.clone(), cache.clone(), cache.clone()
    q, k, v = views(qkv, hq, hk, cache.shape[-1])
    fn(positions, q, k, v, cos_sin, is_neox, k_cache, v_cache, slots)
    return qkv, k_cache, v_cache


def unfused(positions, q, k, v, cos_sin, is_neox, k_cache, v_cache, slots):
    rotary_embedding(positions, q, k, cos_sin, is_neox)
    write_kv_cache(k, v, k_cache, v_cache, slots)


def check_fused(case, dtype, is_neox):
    num_tokens, hq, hk, head_dim, rot_dim = case
    inputs = make_inputs(num_tokens, hq, hk, head_dim, rot_dim, dtype)
    qkv0, _, _, slots, _ = inputs
    got = run(rotary_and_write_kv, *inputs, hq, hk, is_neox)
    # bit-identical in the interpreter; on the GPU the compiler may contract multiply-adds differently in the
    # two kernels, so there the unfused result only has to agree to an ulp
    atol, rtol = (0, 0) if DEVICE == "cpu" else TOL[dtype]
    for name, a, b in zip(("qkv", "k_cache", "v_cache"), got, run(unfused, *inputs, hq, hk, is_neox)):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=f"{name} differs from rotary + write_kv_cache")
    expected = run(ref.rotary_and_write_kv_ref, *inputs, hq, hk, is_neox)
    atol, rtol = TOL[dtype]
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol, equal_nan=False)

    qkv, k_cache, v_cache = got
    q, k, v = views(qkv, hq, hk, head_dim)
    q0, k0, v0 = views(qkv0, hq, hk, head_dim)
    assert (q[..., :rot_dim] - q0[..., :rot_dim]).abs().max() > 0.1, "q was not rotated"
    assert torch.equal(q[..., rot_dim:], q0[..., rot_dim:]) and torch.equal(k[..., rot_dim:], k0[..., rot_dim:])
    assert torch.equal(v, v0)
    valid = slots >= 0
    flat_k, flat_v = k_cache.flatten(0, 1), v_cache.flatten(0, 1)
    assert torch.equal(flat_k[slots[valid]], k[valid]) and torch.equal(flat_v[slots[valid]], v[valid])
    untouched = torch.ones(flat_k.shape[0], dtype=torch.bool, device=DEVICE)
    untouched[slots[valid]] = False
    assert (flat_k[untouched] == SENTINEL).all() and (flat_v[untouched] == SENTINEL).all(), "stray cache store"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "t{}-q{}-k{}-d{}-r{}".format(*c))
def test_rotary_and_write_kv(dtype, is_neox, case):
    check_fused(case, dtype, is_neox)


@pytest.mark.parametrize("is_neox", [True, False])
def test_rotary_and_write_kv_partial_head_blocks(monkeypatch, is_neox):
    """Several q, k and v head blocks per token, the last of each partly masked: force blocks of 2 / 2 / 1
    heads, as many heads per program as serving shapes give on the GPU."""
    import dist_llm.kernels.rotary_kv as rkv

    rotary_config, kv_config = rkv._rotary_launch_config, rkv._kv_launch_config
    monkeypatch.setattr(rkv, "_rotary_launch_config", lambda t, h, half: (2, *rotary_config(t, h, half)[1:]))
    monkeypatch.setattr(rkv, "_kv_launch_config", lambda h, d: (1, *kv_config(h, d)[1:]))
    check_fused((3, 5, 3, 80, 48), torch.bfloat16, is_neox)


def test_rotary_and_write_kv_strided_cache():
    """Caches that are views into one allocation (k and v interleaved per block), bf16 GPT-J layout."""
    qkv, positions, cos_sin, slots, cache = make_inputs(5, 4, 2, 64, 64, torch.bfloat16)
    kv = torch.full((cache.shape[0], 2, *cache.shape[1:]), SENTINEL, dtype=cache.dtype, device=DEVICE)
    expected_kv, expected_qkv = kv.clone(), qkv.clone()
    ref.rotary_and_write_kv_ref(positions, *views(expected_qkv, 4, 2, 64), cos_sin, False, expected_kv[:, 0],
                                expected_kv[:, 1], slots)  # fmt: skip
    rotary_and_write_kv(positions, *views(qkv, 4, 2, 64), cos_sin, False, kv[:, 0], kv[:, 1], slots)
    torch.testing.assert_close(qkv, expected_qkv, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(kv, expected_kv, atol=2e-2, rtol=2e-2)
    by_slot = kv.transpose(1, 2).flatten(0, 1)  # [slot, k|v, Hk, D]
    untouched = ~torch.isin(torch.arange(by_slot.shape[0], device=DEVICE), slots)
    assert (by_slot[untouched] == SENTINEL).all()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_ops_namespace_has_fused_op(backend):
    ops = get_ops(backend)
    fn = ops.rotary_and_write_kv
    assert fn is (ref.rotary_and_write_kv_ref if backend == "torch" else rotary_and_write_kv)
    inputs = make_inputs(0, 2, 1, 64, 64, torch.float32)
    qkv, k_cache, v_cache = run(fn, *inputs, 2, 1, True)  # zero tokens: nothing to do
    assert qkv.numel() == 0 and (k_cache == SENTINEL).all() and (v_cache == SENTINEL).all()
