"""Rotary position embedding: the cos/sin table, with `llama3` and `linear` rope scaling as HF computes it.

The rotation itself is applied by the attention layer, fused with the KV-cache write
(`ops.rotary_and_write_kv`), so this module owns the table and the layout and has no forward.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def inv_frequencies(rot_dim: int, base: float, rope_scaling: dict | None) -> torch.Tensor:
    inv_freq = 1.0 / (base ** (torch.arange(0, rot_dim, 2, dtype=torch.int64).float() / rot_dim))
    kind = (rope_scaling or {}).get("rope_type", "default")
    if kind == "linear":
        inv_freq = inv_freq / float(rope_scaling["factor"])
    elif kind == "llama3":
        factor = float(rope_scaling["factor"])
        low, high = float(rope_scaling["low_freq_factor"]), float(rope_scaling["high_freq_factor"])
        old_ctx = float(rope_scaling["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = torch.where(is_medium, smoothed, scaled)
    return inv_freq


_CACHES: dict[tuple, torch.Tensor] = {}


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, rot_dim: int, max_position: int, base: float, rope_scaling: dict | None,
                 is_neox: bool = True):
        super().__init__()
        self.head_dim, self.rot_dim, self.is_neox = head_dim, rot_dim, is_neox
        self.key = (rot_dim, max_position, base, repr(sorted((rope_scaling or {}).items())))
        self.rope_scaling = rope_scaling
        self.cos_sin_cache: torch.Tensor | None = None

    def build_cache(self, device: torch.device) -> None:
        """fp32 [max_position, rot_dim] = [cos | sin]; one table shared by every layer on a device."""
        key = (*self.key, str(device))
        if key not in _CACHES:
            rot_dim, max_position, base, _ = self.key
            inv_freq = inv_frequencies(rot_dim, base, self.rope_scaling)
            freqs = torch.outer(torch.arange(max_position, dtype=torch.float32), inv_freq)
            _CACHES[key] = torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(device)
        self.cos_sin_cache = _CACHES[key]
