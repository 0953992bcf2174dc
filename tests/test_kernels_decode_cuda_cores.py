"""Paged decode attention's CUDA-core pass 1 (DIST_LLM_DECODE_ATTN_CUDA_CORES=1, KV groups of 1 or 2 query
heads) against reference.py, switched on by setting the module attribute the launcher reads.

Without CUDA the kernels run through Triton's interpreter (TRITON_INTERPRET=1 is set here before anything
imports triton). As in test_kernels_attention.py, every run starts from poison: outputs, workspaces and every
cache slot no sequence owns are NaN (fp8: the NaN code), so an unwritten output or a read past seq_len fails.
Each case asserts which pass-1 variant ran and whether it took the single-partition or the split path.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import triton  # noqa: E402
from conftest import paged_layout  # noqa: E402

from dist_llm.kernels import decode_attention as dec  # noqa: E402
from dist_llm.kernels import reference as ref  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP8 = torch.float8_e4m3fn
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
TOL = {F32: (1e-4, 1e-4), F16: (4e-3, 4e-3), BF16: (2e-2, 2e-2)}  # as test_kernels_attention.py
NAN = float("nan")


class KernelSpy:
    """Stands in for `_decode_partition_kernel`: records each launch's keyword arguments, then launches."""

    def __init__(self, kernel):
        self.kernel, self.calls = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append(kwargs)
            return self.kernel[grid](*args, **kwargs)

        return launch


@pytest.fixture
def spy(monkeypatch):
    spy = KernelSpy(dec._decode_partition_kernel)
    monkeypatch.setattr(dec, "_decode_partition_kernel", spy)
    return spy


def paged_kv(seq_lens, block_size, num_kv_heads, head_dim, kv_dtype, scales, gen, extra_cols):
    """K/V caches of `kv_dtype` holding len_i tokens per sequence in shuffled blocks (K ~ N(0, 1), V ~ N(0, 2),
    stored as quantize_kv_ref(x, kv_dtype, scale)), NaN elsewhere; table entries past a sequence's blocks
    point at NaN blocks. Built in fp32, where every stored value is exact, and converted once."""
    num_blocks, table, slots = paged_layout(seq_lens, block_size, gen, extra_cols)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    caches = [torch.full(shape, NAN), torch.full(shape, NAN)]
    for s in slots:
        for cache, sd, scale in zip(caches, (1.0, 2.0), scales):
            x = torch.randn(len(s), num_kv_heads, head_dim, generator=gen) * sd
            cache.view(-1, num_kv_heads, head_dim)[s] = ref.quantize_kv_ref(x, kv_dtype, scale).float()
    k_cache, v_cache = (c.to(kv_dtype).to(DEVICE) for c in caches)
    return k_cache, v_cache, table.to(torch.int32).to(DEVICE)


def run_case(head_dim, seq_lens, block_size, heads, dtype, kv_dtype, scales, path, gen):
    """One decode call against the reference; returns (out, the kernel's launch kwargs)."""
    hq, hk = heads
    batch = len(seq_lens)
    extra_cols = 0 if path == "single" else 2
    k_cache, v_cache, table = paged_kv(seq_lens, block_size, hk, head_dim, kv_dtype, scales, gen, extra_cols)
    max_ctx = table.shape[1] * block_size
    # "split": 64-token partitions; "single": a workspace with one partition's rows per sequence
    partition = 64 if path == "split" else triton.next_power_of_2(max_ctx)
    ws = dec.DecodeWorkspace.allocate(batch, hq, head_dim, max_ctx, DEVICE, partition)
    ws.out.fill_(NAN)
    ws.lse.fill_(NAN)
    group = hq // hk
    block_n = dec._launch_config(head_dim, block_size, group, dtype, batch, dec._use_dot(group))[1]
    assert (dec._split_plan(batch, hk, max_ctx, block_n, ws)[0] == 1) == (path == "single")

    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    q = torch.randn(batch, hq, head_dim, generator=gen).to(dtype).to(DEVICE)
    k_scale, v_scale = scales
    args = (q, k_cache, v_cache, table, lens, head_dim**-0.5)
    expected = ref.paged_decode_attention_ref(*args, torch.empty_like(q), k_scale=k_scale, v_scale=v_scale)
    out = torch.full_like(q, NAN)
    assert dec.paged_decode_attention(*args, out, ws, k_scale=k_scale, v_scale=v_scale) is out
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out.float(), expected.float(), atol=atol, rtol=rtol, equal_nan=False)
    return out


# (head_dim, seq_lens, block_size, (Hq, Hk), q dtype, cache dtype, (k_scale, v_scale), path)
CASES = [
    (64, [1, 17, 300], 16, (2, 2), BF16, BF16, (1.0, 1.0), "split"),
    (80, [1, 300, 17, 45, 2, 129, 64], 32, (4, 2), F16, FP8, (0.1, 0.03), "split"),
    (96, [1, 17, 40], 16, (2, 1), BF16, FP8, (0.05, 0.02), "single"),
    (64, [5, 33, 60], 16, (3, 3), F32, F32, (1.0, 1.0), "single"),
    (80, [300, 17], 64, (2, 2), F32, FP8, (0.37, 3.1), "split"),
    (64, [1, 17, 40, 5] * 9, 16, (4, 2), F16, F16, (1.0, 1.0), "single"),  # batch 36: still the CUDA cores
    (64, [90, 2], 16, (4, 4), BF16, FP8, (0.5, 2.0), "split"),
    (96, [40, 3], 32, (2, 1), F32, F32, (1.0, 1.0), "split"),
]


@pytest.mark.parametrize(
    "case", CASES, ids=lambda c: f"d{c[0]}-b{len(c[1])}-g{c[3][0] // c[3][1]}-{str(c[4])[6:]}-{str(c[5])[6:]}-{c[7]}"
)
def test_decode_cuda_cores(case, spy, monkeypatch):
    monkeypatch.setattr(dec, "_CUDA_CORES", "1")
    head_dim, seq_lens, block_size, (hq, hk), dtype, kv_dtype, scales, path = case
    run_case(*case, torch.Generator().manual_seed(CASES.index(case)))
    (launch,) = spy.calls
    assert launch["DOT"] is False and launch["DOT_F16"] is False
    assert launch["BLOCK_G"] == triton.next_power_of_2(hq // hk)
    assert launch["BLOCK_G"] * launch["BLOCK_N"] * launch["BLOCK_D"] <= 8192


def test_decode_cuda_cores_not_for_group_4(spy, monkeypatch):
    """Groups of 4 keep tl.dot with the switch on: the same launch, the same bits as with it off."""
    case = (64, [1, 17, 300], 16, (8, 2), BF16, FP8, (0.05, 0.02), "split")
    outs = []
    for switch in ("1", "0"):
        monkeypatch.setattr(dec, "_CUDA_CORES", switch)
        outs.append(run_case(*case, torch.Generator().manual_seed(7)))
    assert spy.calls[0] == spy.calls[1] and spy.calls[0]["DOT"] is True and spy.calls[0]["BLOCK_G"] == 16
    assert torch.equal(outs[0], outs[1])


def test_decode_cuda_cores_switch_values(monkeypatch):
    for value, dot in (("", True), ("0", True), ("1", False)):
        monkeypatch.setattr(dec, "_CUDA_CORES", value)
        assert dec._use_dot(1) is dot and dec._use_dot(2) is dot and dec._use_dot(4) is True
    monkeypatch.setattr(dec, "_CUDA_CORES", "true")
    with pytest.raises(ValueError, match="DIST_LLM_DECODE_ATTN_CUDA_CORES must be 0 or 1"):
        dec._use_dot(1)
    q = torch.zeros(1, 2, 64, dtype=BF16, device=DEVICE)
    cache = torch.zeros(1, 16, 2, 64, dtype=BF16, device=DEVICE)
    one = torch.ones(1, 1, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="DIST_LLM_DECODE_ATTN_CUDA_CORES"):
        dec.paged_decode_attention(q, cache, cache, one * 0, one[0], 0.1, torch.empty_like(q))
