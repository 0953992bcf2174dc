"""Kernels for the hot path: Triton implementations and their pure-torch oracles.

`get_ops("triton")` and `get_ops("torch")` return namespaces with the same function names (and
`ops.backend`, the name), so a layer picks its backend once and calls `ops.rms_norm(...)` without branching.
"""

from __future__ import annotations

from types import SimpleNamespace

OP_NAMES = (
    "rms_norm",
    "fused_add_rms_norm",
    "rotary_embedding",
    "silu_and_mul",
    "write_kv_cache",
    "rotary_and_write_kv",
    "paged_decode_attention",
    "context_attention",
    "sample",
    "fill_pending",
)

BACKENDS = ("torch", "triton")

_cache: dict[str, SimpleNamespace] = {}


def get_ops(backend: str) -> SimpleNamespace:
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; choose one of {BACKENDS}")
    if backend not in _cache:
        if backend == "torch":
            from dist_llm.kernels import reference as mod

            _cache[backend] = SimpleNamespace(backend=backend, **{n: getattr(mod, n + "_ref") for n in OP_NAMES})
        else:
            from dist_llm.kernels import triton_ops

            _cache[backend] = SimpleNamespace(backend=backend, **{n: getattr(triton_ops, n) for n in OP_NAMES})
    return _cache[backend]
