"""Kernel micro-benchmarks: each Triton kernel against its torch reference, next to the ceilings of this GPU.

    python benchmarks/bench_kernels.py --output_dir bench_out/kernels
    python benchmarks/bench_kernels.py --output_dir bench_out/kernels --only paged_decode_attention,context_attention

The ceilings are measured in the same run: device-to-device copy bandwidth (`dst.copy_(src)` on 2 GiB of
bf16, bytes read + written) and the bf16 matmul rate (8192^3 `torch.mm`). Memory-bound kernels report
GB/s (the bytes they must move once) and % of the copy bandwidth; context attention reports TFLOP/s
(causal: half of 4*L^2*D*H) and % of the matmul rate. Shapes are Llama-2-7B's, bf16. Every kernel is
checked once against `get_ops("torch")` (max abs diff; token mismatches for sampling), so a fast but
wrong kernel shows. Times are the mean of back-to-back eager calls between two torch.cuda.synchronize()
(no CUDA graph, no L2 flush), so the decode-size rows (T = 1, 32) are mostly launch overhead.

The decode GEMV rows are the exception: `gemv` (x [M, K] @ Wᵀ, M = 1, 2, 4) against F.linear (cuBLAS, in
the "torch ref" column), each timed as 20 calls captured in one CUDA graph, cycling through 4 copies of the
weight so that L2 (50 MB on an H100) cannot serve a weight from the previous call. Their GB/s counts the
weight bytes only, which a read-only stream can move faster than the read + write copy ceiling.

Writes kernels.md and kernels.json to --output_dir. Without a GPU (Triton interpreter, tiny shapes):
    python benchmarks/bench_kernels.py --device cpu --small --output_dir /tmp/bk
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

BF16, F32 = torch.bfloat16, torch.float32
EPS = 1e-5


@dataclass(frozen=True)
class Shapes:
    hidden: int = 4096
    heads: int = 32
    gqa_kv_heads: int = 8
    head_dim: int = 128
    inter: int = 11008
    tokens: tuple = (16384, 1, 32)  # the first is the bandwidth-sized one
    rope_kv_tokens: tuple = (16384, 1, 8, 64)  # fused rotary + KV write: decode batch sizes, where it pays
    max_pos: int = 4096
    decode_batch: int = 32
    decode_ctx: int = 2048
    prefill_len: int = 4096
    block_sizes: tuple = (16, 64)
    vocab: int = 32000
    sample_batches: tuple = (1, 32, 64)
    copy_gib: float = 2.0
    mm: int = 8192
    gemv_shapes: tuple = (("qkv", 12288, 4096), ("o", 4096, 4096), ("gate_up", 22016, 4096), ("down", 4096, 11008),
                          ("lm_head", 32000, 4096))  # (name, N, K) of the decode linears  # fmt: skip
    gemv_batches: tuple = (1, 2, 4)
    gemv_weight_copies: int = 4


SMALL = Shapes(hidden=256, heads=4, gqa_kv_heads=2, head_dim=32, inter=192, tokens=(64, 1, 4), max_pos=128,
               rope_kv_tokens=(64, 1), decode_batch=2, decode_ctx=96, prefill_len=80, vocab=1000, sample_batches=(1, 4),
               copy_gib=1 / 128, mm=256, gemv_shapes=(("qkv", 48, 64), ("o", 16, 64), ("down", 16, 100)),
               gemv_batches=(1, 4))  # fmt: skip


class Bench:
    def __init__(self, device: str, small: bool):
        from dist_llm.kernels import get_ops

        self.dev, self.cuda = device, device == "cuda"
        self.tri, self.ref = get_ops("triton"), get_ops("torch")
        self.rep_s = 0.005 if small else 0.2  # time budget per measurement
        self.rows: list[dict] = []
        self.copy_gbs = self.mm_tflops = float("nan")

    def clock(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def time_us(self, fn) -> float:
        """Mean µs per call: a call to compile and warm up, one to size the loop (about rep_s in all), up to
        10 more warm-up calls, then n back-to-back calls between two device synchronisations."""
        fn()
        t0 = self.clock()
        fn()
        n = max(1, min(1000, int(self.rep_s / max(self.clock() - t0, 1e-7))))
        for _ in range(min(n, 10) if self.cuda else 0):
            fn()
        t0 = self.clock()
        for _ in range(n):
            fn()
        return (self.clock() - t0) * 1e6 / n

    def randn(self, *shape, dtype=BF16):
        return torch.randn(*shape, dtype=dtype, device=self.dev)

    def add(self, kernel, shape, us, *, nbytes=0, flops=0, ref_us=None, diff=None, check=None,
            sdpa_us=None, gather_sdpa_us=None, **extra):  # fmt: skip
        rate = unit = pct = None
        if flops:
            rate, unit = flops / us / 1e6, "TFLOP/s"
            pct = 100 * rate / self.mm_tflops
        elif nbytes:
            rate, unit = nbytes / us / 1e3, "GB/s"
            pct = 100 * rate / self.copy_gbs
        row = dict(kernel=kernel, shape=shape, us=us, rate=rate, unit=unit, pct_of_ceiling=pct, bytes=nbytes or None,
                   flops=flops or None, ref_us=ref_us, speedup=ref_us / us if ref_us else None, sdpa_us=sdpa_us,
                   speedup_vs_sdpa=sdpa_us / us if sdpa_us else None, gather_sdpa_us=gather_sdpa_us,
                   speedup_vs_gather_sdpa=gather_sdpa_us / us if gather_sdpa_us else None,
                   max_abs_diff=diff, check=check if check is not None else _fmt(diff, ".2e"), **extra)  # fmt: skip
        self.rows.append(row)
        print(md_row(row), flush=True)


def _fmt(v, spec, suffix=""):
    return "-" if v is None else f"{v:{spec}}{suffix}"


def maxdiff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


COLUMNS = ("kernel", "shape", "time µs", "achieved", "% of ceiling", "torch ref µs", "speed-up vs ref",
           "SDPA µs (dense KV pre-gathered, gather not timed)", "speed-up vs SDPA",
           "gather+SDPA µs (index_select timed too)", "max abs diff")  # fmt: skip


def md_row(r: dict) -> str:
    ceiling = "mm" if r["unit"] == "TFLOP/s" else "copy"
    cells = (r["kernel"], r["shape"], _fmt(r["us"], ".1f"), _fmt(r["rate"], ".4g", f" {r['unit']}"),
             _fmt(r["pct_of_ceiling"], ".0f", f"% {ceiling}"), _fmt(r["ref_us"], ".1f"), _fmt(r["speedup"], ".2f", "×"),
             _fmt(r["sdpa_us"], ".1f"), _fmt(r["speedup_vs_sdpa"], ".2f", "×"), _fmt(r["gather_sdpa_us"], ".1f"),
             r["check"])  # fmt: skip
    return "| " + " | ".join(str(c) for c in cells) + " |"


def md_header() -> str:
    return "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS)


# ---- ceilings ------------------------------------------------------------------------------------


def measure_ceilings(b: Bench, s: Shapes):
    src = b.randn(int(s.copy_gib * 2**30) // 2)
    dst = torch.empty_like(src)
    b.copy_gbs = 2 * src.nbytes / b.time_us(lambda: dst.copy_(src)) / 1e3
    src = dst = None
    x, y = b.randn(s.mm, s.mm), b.randn(s.mm, s.mm)
    out = torch.empty_like(x)
    b.mm_tflops = 2 * s.mm**3 / b.time_us(lambda: torch.mm(x, y, out=out)) / 1e6


def compare(b: Bench, kernel, shape, tri_fn, ref_fn, tri_outs, ref_outs, **row):
    """Run both once on twin inputs, check what they wrote (max abs diff), then time both; adds the row."""
    tri_fn()
    ref_fn()
    diff = max(maxdiff(x, y) for x, y in zip(tri_outs, ref_outs))
    b.add(kernel, shape, b.time_us(tri_fn), ref_us=b.time_us(ref_fn), diff=diff, **row)


# ---- elementwise kernels --------------------------------------------------------------------------


def _rms_case(b: Bench, t: int, n: int, fused: bool):
    w = 1 + 0.1 * b.randn(n)
    x, y = b.randn(t, n), b.randn(t, n)  # y: the residual (fused, in place) or the output
    x2, y2 = x.clone(), y.clone()
    if fused:
        compare(b, "fused_add_rms_norm", f"x, residual [{t}, {n}]", lambda: b.tri.fused_add_rms_norm(x, y, w, EPS),
                lambda: b.ref.fused_add_rms_norm(x2, y2, w, EPS), (x, y), (x2, y2),
                nbytes=4 * x.nbytes + w.nbytes)  # fmt: skip
    else:
        compare(b, "rms_norm", f"x [{t}, {n}]", lambda: b.tri.rms_norm(x, w, EPS, y),
                lambda: b.ref.rms_norm(x, w, EPS, y2), (y,), (y2,), nbytes=2 * x.nbytes + w.nbytes)  # fmt: skip


def _q_k_v(qkv: torch.Tensor, h: int, hk: int, d: int):
    """Strided [T, H, D] views of a fused qkv [T, (h + 2 hk) d] output."""
    q, k, v = qkv.split((h * d, hk * d, hk * d), dim=1)
    return q.unflatten(1, (h, d)), k.unflatten(1, (hk, d)), v.unflatten(1, (hk, d))


def _cos_sin_cache(b: Bench, s: Shapes) -> torch.Tensor:
    """fp32 [max_pos, D]: cos | sin."""
    inv_freq = 1.0 / 10000 ** (torch.arange(0, s.head_dim, 2, dtype=F32, device=b.dev) / s.head_dim)
    freqs = torch.outer(torch.arange(s.max_pos, dtype=F32, device=b.dev), inv_freq)
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1)


def bench_rotary_embedding(b: Bench, s: Shapes):
    t, h, d = s.tokens[0], s.heads, s.head_dim
    qkv = b.randn(t, 3 * h * d)
    qkv2 = qkv.clone()
    pos = torch.randint(0, s.max_pos, (t,), device=b.dev)
    cache = _cos_sin_cache(b, s)
    (q, k, _), (q2, k2, _) = _q_k_v(qkv, h, h, d), _q_k_v(qkv2, h, h, d)
    nbytes = 2 * (q.numel() + k.numel()) * 2 + pos.nbytes + t * d * 4  # q, k read + written; a cos|sin row per token
    compare(b, "rotary_embedding", f"q, k [{t}, {h}, {d}] in qkv [{t}, {3 * h * d}], neox",
            lambda: b.tri.rotary_embedding(pos, q, k, cache, True),
            lambda: b.ref.rotary_embedding(pos, q2, k2, cache, True), (qkv,), (qkv2,), nbytes=nbytes)  # fmt: skip


def bench_silu_and_mul(b: Bench, s: Shapes):
    t, i = s.tokens[0], s.inter
    x = b.randn(t, 2 * i)
    out, out2 = b.randn(t, i), b.randn(t, i)
    compare(b, "silu_and_mul", f"x [{t}, {2 * i}]", lambda: b.tri.silu_and_mul(x, out),
            lambda: b.ref.silu_and_mul(x, out2), (out,), (out2,), nbytes=x.nbytes + out.nbytes)  # fmt: skip


def _kv_write_case(b: Bench, s: Shapes, bs: int):
    t, h, d = s.tokens[0], s.heads, s.head_dim
    _, k, v = _q_k_v(b.randn(t, 3 * h * d), h, h, d)
    nb = math.ceil(t / bs)
    blocks = torch.randperm(nb, device=b.dev)  # shuffled physical blocks, consecutive slots inside each
    slots = (blocks[:, None] * bs + torch.arange(bs, device=b.dev)).flatten()[:t]
    kc, vc, kc2, vc2 = (torch.zeros(nb, bs, h, d, dtype=BF16, device=b.dev) for _ in range(4))
    compare(b, "write_kv_cache", f"k, v [{t}, {h}, {d}] -> [{nb}, {bs}, {h}, {d}]",
            lambda: b.tri.write_kv_cache(k, v, kc, vc, slots), lambda: b.ref.write_kv_cache(k, v, kc2, vc2, slots),
            (kc, vc), (kc2, vc2), nbytes=4 * k.numel() * 2 + slots.nbytes)  # fmt: skip


def _rope_kv_case(b: Bench, s: Shapes, t: int, fused: bool):
    """rotary_and_write_kv (one launch) or rotary_embedding then write_kv_cache (two), against the torch
    composition; both rows count the bytes the fused op moves, so their GB/s compare directly."""
    h, d, bs = s.heads, s.head_dim, s.block_sizes[0]
    qkv = b.randn(t, 3 * h * d)
    qkv2 = qkv.clone()
    pos, cache = torch.randint(0, s.max_pos, (t,), device=b.dev), _cos_sin_cache(b, s)
    nb = math.ceil(t / bs)
    blocks = torch.randperm(nb, device=b.dev)
    slots = (blocks[:, None] * bs + torch.arange(bs, device=b.dev)).flatten()[:t]
    kc, vc, kc2, vc2 = (torch.zeros(nb, bs, h, d, dtype=BF16, device=b.dev) for _ in range(4))
    (q, k, v), (q2, k2, v2) = _q_k_v(qkv, h, h, d), _q_k_v(qkv2, h, h, d)
    if fused:
        name = "rotary_and_write_kv"
        tri_fn = lambda: b.tri.rotary_and_write_kv(pos, q, k, v, cache, True, kc, vc, slots)
    else:
        name = "rotary_embedding + write_kv_cache"
        tri_fn = lambda: (b.tri.rotary_embedding(pos, q, k, cache, True), b.tri.write_kv_cache(k, v, kc, vc, slots))
    # q, k read + written, k and v cache written, v read; a cos|sin row, a position and a slot per token
    nbytes = (2 * q.numel() + 3 * k.numel() + 2 * v.numel()) * 2 + t * d * 4 + pos.nbytes + slots.nbytes
    compare(b, name, f"q, k, v [{t}, {h}, {d}] in qkv, neox -> [{nb}, {bs}, {h}, {d}]", tri_fn,
            lambda: b.ref.rotary_and_write_kv(pos, q2, k2, v2, cache, True, kc2, vc2, slots),
            (qkv, kc, vc), (qkv2, kc2, vc2), nbytes=nbytes)  # fmt: skip


# ---- attention ------------------------------------------------------------------------------------


def _paged_cache(b: Bench, num_seqs: int, ctx: int, bs: int, hk: int, d: int):
    """Caches holding `ctx` random tokens per sequence in shuffled physical blocks, and a gather helper
    returning the dense [B, Hk, ctx, D] views (not contiguous) of the cached K and V."""
    m = math.ceil(ctx / bs)
    kc, vc = b.randn(num_seqs * m, bs, hk, d), b.randn(num_seqs * m, bs, hk, d)
    table = torch.randperm(num_seqs * m, device=b.dev).view(num_seqs, m).to(torch.int32)
    idx = table.flatten().long()

    def gather():
        return tuple(c.index_select(0, idx).view(num_seqs, m * bs, hk, d)[:, :ctx].transpose(1, 2) for c in (kc, vc))

    return kc, vc, table, gather


def _sdpa(q4, k, v, causal):
    gqa = q4.shape[1] != k.shape[1]
    return F.scaled_dot_product_attention(q4, k, v, is_causal=causal, scale=q4.shape[-1] ** -0.5, enable_gqa=gqa)


def sdpa_baselines(b: Bench, q4, gather, causal: bool, ref_out) -> dict:
    """torch SDPA on KV gathered beforehand into contiguous dense [B, Hk, L, D] (the gather not timed), and
    index_select gather + SDPA (both timed). q4 [B, Hq, Lq, D]; ref_out [B * Lq, Hq, D] or [B, Hq, D]."""
    qd = q4.contiguous()
    kd, vd = (t.contiguous() for t in gather())
    sdpa_diff = maxdiff(_sdpa(qd, kd, vd, causal).transpose(1, 2).reshape(ref_out.shape), ref_out)
    sdpa_us = b.time_us(lambda: _sdpa(qd, kd, vd, causal))
    kd = vd = None
    gather_us = b.time_us(lambda: _sdpa(q4, *gather(), causal))
    return dict(sdpa_us=sdpa_us, gather_sdpa_us=gather_us, sdpa_max_abs_diff=sdpa_diff)


def _decode_case(b: Bench, s: Shapes, bs: int, hk: int):
    from dist_llm.kernels.decode_attention import DecodeWorkspace

    nseq, ctx, h, d = s.decode_batch, s.decode_ctx, s.heads, s.head_dim
    kc, vc, table, gather = _paged_cache(b, nseq, ctx, bs, hk, d)
    lens = torch.full((nseq,), ctx, dtype=torch.int32, device=b.dev)
    q = b.randn(nseq, h, d)
    out, out2 = torch.empty_like(q), torch.empty_like(q)
    ws = DecodeWorkspace.allocate(nseq, h, d, table.shape[1] * bs, b.dev)
    args = (q, kc, vc, table, lens, d**-0.5)
    b.ref.paged_decode_attention(*args, out2)
    sdpa = sdpa_baselines(b, q[:, :, None, :], gather, False, out2)
    nbytes = 2 * kc.element_size() * nseq * ctx * hk * d + 2 * q.nbytes  # K + V read once, q read, out written
    compare(b, "paged_decode_attention", f"B{nseq} ctx{ctx} Hq{h}/Hk{hk} D{d} block{bs}",
            lambda: b.tri.paged_decode_attention(*args, out, ws), lambda: b.ref.paged_decode_attention(*args, out2),
            (out,), (out2,), nbytes=nbytes, **sdpa)  # fmt: skip


def _prefill_case(b: Bench, s: Shapes, bs: int):
    n, h, d = s.prefill_len, s.heads, s.head_dim
    kc, vc, table, gather = _paged_cache(b, 1, n, bs, h, d)
    lens = torch.tensor([n], dtype=torch.int32, device=b.dev)
    cu = torch.tensor([0, n], dtype=torch.int32, device=b.dev)
    q = b.randn(n, h, d)
    out, out2 = torch.empty_like(q), torch.empty_like(q)
    args = (q, kc, vc, table, lens, cu, n, d**-0.5)
    b.ref.context_attention(*args, out2)
    sdpa = sdpa_baselines(b, q.transpose(0, 1)[None], gather, True, out2)
    flops = 4 * n * n * d * h // 2  # QK^T and PV, causal half
    compare(b, "context_attention", f"causal L{n} H{h} D{d} block{bs}", lambda: b.tri.context_attention(*args, out),
            lambda: b.ref.context_attention(*args, out2), (out,), (out2,), flops=flops,
            sdpa_tflops=flops / sdpa["sdpa_us"] / 1e6, **sdpa)  # fmt: skip


def _sample_case(b: Bench, bsz: int, vocab: int, mode: str):
    """The runtime picks the mode on the host: greedy (argmax), plain (temperature only) or full (top-k/p)."""
    logits = 3 * b.randn(bsz, vocab, dtype=F32)
    temperature = torch.full((bsz,), 0.0 if mode == "greedy" else 1.0, device=b.dev)
    top_k = torch.full((bsz,), 50 if mode == "full" else 0, dtype=torch.int32, device=b.dev)
    top_p = torch.full((bsz,), 0.9 if mode == "full" else 1.0, device=b.dev)
    seeds = torch.arange(bsz, dtype=torch.int64, device=b.dev)
    offsets = torch.full((bsz,), 7, dtype=torch.int64, device=b.dev)
    args = (logits, temperature, top_k, top_p, seeds, offsets)
    differ = int((b.tri.sample(*args, mode=mode) != b.ref.sample(*args)).sum().item())
    us = b.time_us(lambda: b.tri.sample(*args, mode=mode))
    ref_us = b.time_us(lambda: b.ref.sample(*args))
    label = {"greedy": "greedy", "plain": "T=1", "full": "T=1 top_p=0.9 top_k=50"}[mode]
    b.add("sample", f"logits [{bsz}, {vocab}] fp32, {label} (mode {mode})", us, ref_us=ref_us, diff=differ,
          check=f"{differ}/{bsz} tokens differ")  # fmt: skip


# ---- decode GEMV ----------------------------------------------------------------------------------

GRAPH_CALLS = 20


def graph_time_us(b: Bench, fns) -> float:
    """Mean µs per call of GRAPH_CALLS calls cycling through `fns`, captured in one CUDA graph and replayed
    back to back (on the CPU: the same calls, eager)."""
    calls = [fns[i % len(fns)] for i in range(GRAPH_CALLS)]
    if not b.cuda:
        return b.time_us(lambda: [fn() for fn in calls]) / GRAPH_CALLS
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile the kernel and pick the cuBLAS algorithm outside the capture
        for fn in fns:
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in calls:
            fn()
    return b.time_us(graph.replay) / GRAPH_CALLS


def _gemv_case(b: Bench, s: Shapes, name: str, n: int, k: int, m: int):
    from dist_llm.kernels.gemv import gemv, gemv_supported

    weights = [b.randn(n, k) * k**-0.5 for _ in range(s.gemv_weight_copies)]  # O(1) outputs
    x = b.randn(m, k)
    outs = [torch.empty(m, n, dtype=BF16, device=b.dev) for _ in weights]
    assert gemv_supported(x, weights[0])
    diff = maxdiff(gemv(x, weights[0], out=outs[0]), F.linear(x, weights[0]))
    us = graph_time_us(b, [lambda w=w, o=o: gemv(x, w, out=o) for w, o in zip(weights, outs)])
    ref_us = graph_time_us(b, [lambda w=w: F.linear(x, w) for w in weights])
    nbytes = weights[0].nbytes
    timing = f"{GRAPH_CALLS} calls in a graph" if b.cuda else f"{GRAPH_CALLS} eager calls"
    b.add("gemv", f"{name}: x [{m}, {k}] @ W [{n}, {k}]ᵀ, {timing}, {len(weights)} weight copies", us,
          nbytes=nbytes, ref_us=ref_us, diff=diff, weight_tbs=nbytes / us / 1e6, ref_weight_tbs=nbytes / ref_us / 1e6,
          ref_pct_of_ceiling=100 * nbytes / ref_us / 1e3 / b.copy_gbs)  # fmt: skip


CASES = {  # what each --only name runs
    "rms_norm": lambda b, s: [_rms_case(b, t, s.hidden, fused=False) for t in s.tokens],
    "fused_add_rms_norm": lambda b, s: [_rms_case(b, t, s.hidden, fused=True) for t in s.tokens],
    "rotary_embedding": bench_rotary_embedding,
    "silu_and_mul": bench_silu_and_mul,
    "write_kv_cache": lambda b, s: [_kv_write_case(b, s, bs) for bs in s.block_sizes],
    "rotary_and_write_kv": lambda b, s: [_rope_kv_case(b, s, t, fused) for t in s.rope_kv_tokens
                                         for fused in (True, False)],
    "paged_decode_attention": lambda b, s: [
        _decode_case(b, s, bs, hk) for bs in s.block_sizes for hk in (s.heads, s.gqa_kv_heads)
    ],
    "context_attention": lambda b, s: [_prefill_case(b, s, bs) for bs in reversed(s.block_sizes)],
    "sample": lambda b, s: [_sample_case(b, n, s.vocab, g) for n in s.sample_batches
                                for g in ("greedy", "plain", "full")],
    "gemv": lambda b, s: [_gemv_case(b, s, name, n, k, m) for name, n, k in s.gemv_shapes for m in s.gemv_batches],
}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output_dir", required=True, type=Path)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--small", action="store_true", help="tiny shapes (for the CPU interpreter)")
    p.add_argument("--only", default="", help=f"comma-separated subset of: {','.join(CASES)}")
    args = p.parse_args()
    only = [n for n in args.only.split(",") if n] or list(CASES)
    if unknown := [n for n in only if n not in CASES]:
        p.error(f"unknown kernel(s) {unknown}; choose from {list(CASES)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available (use --device cpu --small)")
    if args.device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import triton

    torch.manual_seed(0)
    s = SMALL if args.small else Shapes()
    b = Bench(args.device, args.small)
    measure_ceilings(b, s)
    name = torch.cuda.get_device_name() if b.cuda else "CPU (Triton interpreter)"
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    header = (f"{name}, torch {torch.__version__}, triton {triton.__version__}, {date}; ceilings: copy "
              f"{b.copy_gbs:.4g} GB/s ({s.copy_gib:g} GiB bf16 copy_, read + write), matmul {b.mm_tflops:.4g} TFLOP/s "
              f"(bf16 {s.mm}^3 torch.mm)")  # fmt: skip
    print(header + "\n\n" + md_header(), flush=True)
    failed = []
    for case in only:
        try:
            CASES[case](b, s)
        except Exception as e:  # one failing kernel must not hide the others
            traceback.print_exc()
            failed.append(case)
            err = f"{type(e).__name__}: {e}".replace("|", "/").replace("\n", " ")[:300]
            b.rows.append(dict(kernel=case, error=err))
        gc.collect()
        if b.cuda:
            torch.cuda.empty_cache()
    table = [md_row(r) if "error" not in r else f"| {r['kernel']} | ERROR: {r['error']} |" for r in b.rows]
    md = header + "\n\n" + md_header() + "\n" + "\n".join(table) + "\n"
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "kernels.md").write_text(md)
    result = dict(header=header, device=name, torch=torch.__version__, triton=triton.__version__, date=date,
                  copy_gbs=b.copy_gbs, mm_tflops=b.mm_tflops, shapes=asdict(s), rows=b.rows, failed=failed)  # fmt: skip
    (args.output_dir / "kernels.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {args.output_dir / 'kernels.md'} and kernels.json" + (f"; FAILED: {failed}" if failed else ""))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
