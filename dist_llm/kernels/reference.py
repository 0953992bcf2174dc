"""Pure-torch oracles for every kernel in `dist_llm.kernels`.

Each function has the same signature and semantics as its Triton twin (docs/architecture.md,
"Kernel functions"). They are the `--attention_backend torch` path and the reference the kernel
tests compare against, so they favour obviously-correct code over speed.
"""

from __future__ import annotations

import torch


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None):
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    # HF casts back to the input dtype before the weight multiply.
    y = weight * y.to(x.dtype)
    if out is None:
        return y
    out.copy_(y)
    return out


def fused_add_rms_norm_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    residual.copy_((x.float() + residual.float()).to(residual.dtype))
    x.copy_(rms_norm_ref(residual, weight, eps))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, is_neox: bool) -> torch.Tensor:
    xf = x.float()
    if is_neox:
        x1, x2 = xf.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    x1, x2 = xf[..., 0::2], xf[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)


def rotary_embedding_ref(positions, q, k, cos_sin_cache, is_neox: bool = True) -> None:
    rot_dim = cos_sin_cache.shape[-1]
    cos, sin = cos_sin_cache[positions.long()].float().chunk(2, dim=-1)  # [T, rot_dim/2]
    cos, sin = cos[:, None, :], sin[:, None, :]
    for t in (q, k):
        t[..., :rot_dim] = _rotate(t[..., :rot_dim], cos, sin, is_neox).to(t.dtype)


def silu_and_mul_ref(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    y = torch.nn.functional.silu(gate.float()).to(x.dtype) * up
    if out is None:
        return y
    out.copy_(y)
    return out


def linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, out=None) -> torch.Tensor:
    """x @ weightᵀ + bias computed in fp32 and rounded once to x.dtype (the twin of `gemv.gemv`)."""
    y = x.float() @ weight.float().t()
    if bias is not None:
        y = y + bias.float()
    y = y.to(x.dtype)
    if out is None:
        return y
    out.copy_(y)
    return out


def gemv_add_norm_ref(x, weight, residual, norm_weight, act: str | None = None):
    """The twin of `gemv_norm.gemv_add_norm`: residual <- round(round(x @ weightᵀ) + residual) in place;
    returns (residual * norm_weight rounded to x.dtype, partials [1] fp32: the new residual's sum of squares
    (the kernel gives one partial sum per program; only their sum is defined)."""
    if act == "silu_and_mul":
        x = silu_and_mul_ref(x)
    residual.copy_((linear_ref(x, weight).float() + residual.float()).to(residual.dtype))
    h = residual.float()
    return (h * norm_weight.float()).to(x.dtype), h.pow(2).sum().reshape(1)


def gemv_normed_ref(hw, weight, bias, partials, eps: float) -> torch.Tensor:
    """The twin of `gemv(hw, weight, bias, norm=(partials, eps))`: the fp32 product of hw and weight, scaled
    by rsqrt(partials.sum() / K + eps), plus the bias, rounded once to hw.dtype."""
    y = (hw.float() @ weight.float().t()) * torch.rsqrt(partials.float().sum() / weight.shape[1] + eps)
    if bias is not None:
        y = y + bias.float()
    return y.to(hw.dtype)


# ---- KV cache ------------------------------------------------------------------------------------------

FP8_KV_DTYPE = torch.float8_e4m3fn  # an fp8 KV cache: e4m3fn, one per-tensor scale for K and one for V
FP8_MAX = 448.0  # e4m3fn's largest finite value


def check_kv_scales(cache_dtype: torch.dtype, k_scale: float, v_scale: float) -> None:
    """An fp8 cache stores round(x / scale) and means stored * scale; other caches take no scales."""
    if cache_dtype == FP8_KV_DTYPE:
        assert all(0.0 < s < float("inf") for s in (k_scale, v_scale)), (
            f"fp8 KV cache scales must be positive and finite, got k_scale {k_scale}, v_scale {v_scale}"
        )
    else:
        assert k_scale == 1.0 and v_scale == 1.0, (
            f"k_scale {k_scale} / v_scale {v_scale} given for a {cache_dtype} KV cache: "
            f"scales apply to a {FP8_KV_DTYPE} cache only (pass 1.0)"
        )


def quantize_kv_ref(x: torch.Tensor, cache_dtype: torch.dtype, scale: float) -> torch.Tensor:
    """x as a cache of `cache_dtype` stores it. fp8: x times the fp32 reciprocal of the scale (what the kernels
    compute; x / scale itself when the scale is a power of two), saturated to +-448, nearest even."""
    if cache_dtype != FP8_KV_DTYPE:
        return x.to(cache_dtype)
    inv_scale = torch.tensor(1.0 / scale, dtype=torch.float32, device=x.device)
    return (x.float() * inv_scale).clamp(-FP8_MAX, FP8_MAX).to(cache_dtype)


def write_kv_cache_ref(k, v, k_cache, v_cache, slot_mapping, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    assert k_cache.dtype == v_cache.dtype, (k_cache.dtype, v_cache.dtype)
    check_kv_scales(k_cache.dtype, k_scale, v_scale)
    valid = slot_mapping >= 0
    slots = slot_mapping[valid].long()
    block_size = k_cache.shape[1]
    blocks, offsets = slots // block_size, slots % block_size
    k_cache[blocks, offsets] = quantize_kv_ref(k[valid], k_cache.dtype, k_scale)
    v_cache[blocks, offsets] = quantize_kv_ref(v[valid], v_cache.dtype, v_scale)


def rotary_and_write_kv_ref(
    positions, q, k, v, cos_sin_cache, is_neox, k_cache, v_cache, slot_mapping, k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:  # fmt: skip
    rotary_embedding_ref(positions, q, k, cos_sin_cache, is_neox)
    write_kv_cache_ref(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)


def gather_kv_ref(k_cache, v_cache, block_table, seq_len: int):
    """The first `seq_len` cached tokens of one sequence as dense [seq_len, Hk, D] tensors."""
    block_size = k_cache.shape[1]
    n_blocks = (seq_len + block_size - 1) // block_size
    blocks = block_table[:n_blocks].long()
    k = k_cache[blocks].flatten(0, 1)[:seq_len]
    v = v_cache[blocks].flatten(0, 1)[:seq_len]
    return k, v


def _attend(q, k, v, scale: float, context_len: int):
    """q [Lq, Hq, D] are the last Lq positions of a sequence whose K/V are k, v [Lk, Hk, D]."""
    hq, hk = q.shape[1], k.shape[1]
    if hq != hk:
        k = k.repeat_interleave(hq // hk, dim=1)
        v = v.repeat_interleave(hq // hk, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), k.float()) * scale
    lq, lk = q.shape[0], k.shape[0]
    q_pos = torch.arange(lq, device=q.device)[:, None] + context_len
    k_pos = torch.arange(lk, device=q.device)[None, :]
    scores.masked_fill_(k_pos > q_pos, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("hqk,khd->qhd", probs, v.float())


def _dequantized(k, v, k_scale: float, v_scale: float):
    """Cached K/V as the values they stand for: stored * scale in fp32 (an exact no-op at scale 1)."""
    return k.float() * k_scale, v.float() * v_scale


def paged_decode_attention_ref(
    q, k_cache, v_cache, block_tables, seq_lens, scale, out, workspace=None, k_scale: float = 1.0,
    v_scale: float = 1.0,
):  # fmt: skip
    check_kv_scales(k_cache.dtype, k_scale, v_scale)
    for i, seq_len in enumerate(seq_lens.tolist()):
        k, v = _dequantized(*gather_kv_ref(k_cache, v_cache, block_tables[i], seq_len), k_scale, v_scale)
        out[i] = _attend(q[i : i + 1], k, v, scale, seq_len - 1)[0].to(out.dtype)
    return out


def context_attention_ref(
    q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, max_seqlen_q, scale, out, k_scale: float = 1.0,
    v_scale: float = 1.0, first_row: int = 0,
):  # fmt: skip
    check_kv_scales(k_cache.dtype, k_scale, v_scale)
    cu = cu_seqlens_q.tolist()
    for i, seq_len in enumerate(seq_lens.tolist()):
        if i < first_row:  # served by the decode kernel
            continue
        start, end = cu[i], cu[i + 1]
        if end == start:
            continue
        k, v = _dequantized(*gather_kv_ref(k_cache, v_cache, block_tables[i], seq_len), k_scale, v_scale)
        out[start:end] = _attend(q[start:end], k, v, scale, seq_len - (end - start)).to(out.dtype)
    return out


# ---- sampling -------------------------------------------------------------------------------------

_MASK64 = (1 << 63) - 1


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 64-bit integer mixer (splitmix64 finaliser, arithmetic in int64 with wrap-around)."""
    x = x ^ ((x >> 30) & (_MASK64 >> 29))
    x = x * -4658895280553007687  # 0xBF58476D1CE4E5B9 as signed int64
    x = x ^ ((x >> 27) & (_MASK64 >> 26))
    x = x * -7723592293110705685  # 0x94D049BB133111EB as signed int64
    x = x ^ ((x >> 31) & (_MASK64 >> 30))
    return x


def counter_uniform(seeds: torch.Tensor, offsets: torch.Tensor, vocab: int) -> torch.Tensor:
    """Uniform(0, 1) noise [B, vocab] that depends only on (seed, offset, vocab index)."""
    idx = torch.arange(vocab, device=seeds.device, dtype=torch.int64)
    key = _mix(seeds.long()[:, None] * 1000003 + offsets.long()[:, None])
    bits = _mix(key ^ (idx[None, :] * 0x632BE59BD9B4E019))
    # top 24 bits -> (0, 1); the +0.5 keeps it strictly inside the interval
    return (((bits >> 40) & 0xFFFFFF).float() + 0.5) / float(1 << 24)


def gumbel_max_sample(logits, temperature, top_k, top_p, uniform, mode: str = "full", min_p=None) -> torch.Tensor:
    """Greedy / temperature / min-p / top-k / top-p sampling by the Gumbel-max trick, given `uniform(vocab)`: noise
    [B, vocab] in (0, 1). `mode` ("greedy", "plain" or "full") is a host-side promise about the batch
    (every row greedy; no row with min-p/top-k/top-p); it changes speed only, never the tokens.
    `min_p` (fp32 [B], 0 = off; None: off for every row) keeps the tokens whose probability after temperature
    is at least min_p times the largest one. As in vLLM, it applies before top-k and top-p, so top-p's mass
    is counted over what min-p kept."""
    logits = logits.float()
    greedy = logits.argmax(dim=-1)
    if mode == "greedy":
        return greedy
    vocab = logits.shape[1]
    temp = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
    scaled = logits / temp[:, None]
    # argmax(logit/T - log(-log u)) samples softmax(logit/T)
    gumbel = -torch.log(-torch.log(uniform(vocab)))
    if mode == "plain":
        return torch.where(temperature > 0, (scaled + gumbel).argmax(dim=-1), greedy)
    sorted_logits, sorted_idx = scaled.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=logits.device)[None, :]
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, vocab)).clamp(max=vocab)
    drop = ranks >= k[:, None].long()
    if min_p is not None:  # p_i < min_p * p_max, in log space: l_i - l_max < log(min_p) (log 0 = -inf: nothing)
        drop |= (sorted_logits - sorted_logits[:, :1]) < torch.log(min_p)[:, None]
    probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
    # keep the smallest prefix whose mass reaches top_p (the first token always stays)
    drop |= ((probs.cumsum(dim=-1) - probs) >= top_p[:, None]) & (top_p < 1)[:, None]
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    filtered = torch.full_like(scaled, float("-inf")).scatter(1, sorted_idx, sorted_logits)
    sampled = (filtered + gumbel).argmax(dim=-1)
    return torch.where(temperature > 0, sampled, greedy)


def sample_ref(logits, temperature, top_k, top_p, seeds, offsets, mode: str = "full", out=None,
               min_p=None) -> torch.Tensor:  # fmt: skip
    """Token ids int64 [B]; written into `out` too when given (a static buffer under a CUDA graph)."""
    noise = lambda v: counter_uniform(seeds, offsets, v)  # noqa: E731
    tokens = gumbel_max_sample(logits, temperature, top_k, top_p, noise, mode, min_p)
    return tokens if out is None else out.copy_(tokens)


def fill_pending_ref(input_ids: torch.Tensor, prev_index: torch.Tensor, sampled: torch.Tensor) -> torch.Tensor:
    """input_ids with each entry whose prev_index is >= 0 taken from the previous step's `sampled[prev_index]`."""
    return torch.where(prev_index >= 0, sampled[prev_index.clamp(min=0)], input_ids).to(input_ids.dtype)


def all_reduce_ref(inputs: list[torch.Tensor]) -> torch.Tensor:
    """The sum of the ranks' tensors as `all_reduce.one_shot_all_reduce` computes it on every rank: in fp32,
    in rank order, rounded once to the inputs' dtype."""
    acc = inputs[0].float()
    for t in inputs[1:]:
        acc = acc + t.float()
    return acc.to(inputs[0].dtype)
