"""--kv_cache_dtype fp8: the pool stores K and V as e4m3 (kernels: tests/test_kernels_fp8_kv.py). A model run
with it must really read a quantised cache (its logits move), and the Triton path must agree with the torch
reference, which dequantises the same cache explicitly. (How far fp8 moves a model from bf16 depends on the
model: this tiny random one moves 16x as far as bf16 moves it from fp32, as 3 mantissa bits against 7 would.)"""

from __future__ import annotations

import pytest
import torch
from conftest import PROMPTS, convert_and_build

from dist_llm.errors import DistLLMError


@pytest.fixture(scope="module")
def engine_bf16(tiny_models, tmp_path_factory) -> str:
    return convert_and_build(tiny_models["llama"], tmp_path_factory.mktemp("fp8_engine"), 1, 1, dtype="bfloat16",
                             max_batch_size=4, max_seq_len=128, tokens_per_block=16)


def _run(engine: str, kernels: str, kv_cache_dtype: str, max_new_tokens: int = 2):
    from dist_llm.parallel.state import destroy
    from dist_llm.runtime import ModelRunner

    # Triton runs on the GPU where there is one (its interpreter only without CUDA); the reference on the CPU
    device = "cuda" if kernels == "triton" and torch.cuda.is_available() else "cpu"
    runner = ModelRunner.from_dir(engine, device=device, kernel_backend=kernels, kv_cache_dtype=kv_cache_dtype,
                                  num_kv_blocks=32)
    try:
        worker = runner.executor.worker
        layer = worker.model.attention_layers()[0]
        info = (layer.k_cache.dtype, worker.kv_bytes_per_block())
        outs = runner.generate(input_texts=PROMPTS[:2], max_new_tokens=max_new_tokens, return_first_logits=True)
    finally:
        runner.shutdown()
        destroy()
    return info, torch.stack([o.first_logits.float().cpu() for o in outs]), [o.output_token_ids for o in outs]


def test_fp8_kv_cache_is_used_and_the_kernels_match_the_dequantising_reference(engine_bf16):
    """The torch backend dequantises the fp8 cache explicitly (kernels/reference.py); the Triton kernels fold the
    scales in. Both read the same e4m3 bytes, so they agree as closely as they do on a bf16 cache."""
    runs = {(k, d): _run(engine_bf16, k, d) for k in ("torch", "triton") for d in ("auto", "fp8")}
    for kernels in ("torch", "triton"):
        (dtype16, bytes16), _, _ = runs[kernels, "auto"]
        (dtype8, bytes8), _, _ = runs[kernels, "fp8"]
        assert dtype16 == torch.bfloat16 and dtype8 == torch.float8_e4m3fn
        assert bytes8 * 2 == bytes16  # the same pool memory holds twice the tokens
    logits = {key: r[1] for key, r in runs.items()}
    scale = logits["torch", "auto"].abs().max().item()
    moved = (logits["torch", "fp8"] - logits["torch", "auto"]).abs().max().item()
    assert 0 < moved < 0.5 * scale, f"fp8 moved the first-step logits by {moved:.4f} (scale {scale:.2f})"
    bf16_gap = (logits["triton", "auto"] - logits["torch", "auto"]).abs().max().item()
    fp8_gap = (logits["triton", "fp8"] - logits["torch", "fp8"]).abs().max().item()
    # each side rounds its bf16 intermediates differently, and fp8's coarse rounding can amplify that (a k that
    # differs by a bf16 ulp may round to another e4m3 value): 2x the bf16 gap here (0.18 vs 0.09 on 3 prompts)
    assert fp8_gap <= 3 * bf16_gap + 0.05, f"Triton vs reference: {fp8_gap:.4f} on fp8, {bf16_gap:.4f} on bf16"
    tok = {key: r[2] for key, r in runs.items()}
    assert [t[0] for t in tok["triton", "fp8"]] == [t[0] for t in tok["torch", "fp8"]]


def test_kv_cache_dtype_is_checked(monkeypatch):
    from dist_llm.runtime.kv_sizing import kv_cache_dtype

    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert kv_cache_dtype("auto", torch.bfloat16, cpu) == torch.bfloat16
    assert kv_cache_dtype("fp8", torch.float32, cpu) == torch.float8_e4m3fn
    with pytest.raises(DistLLMError, match="unknown --kv_cache_dtype 'int8'; choose one of auto, fp8"):
        kv_cache_dtype("int8", torch.bfloat16, cpu)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    want = r"compute capability 8.9 or newer .* NVIDIA A100 is 8.0: use --kv_cache_dtype auto"
    with pytest.raises(DistLLMError, match=want):
        kv_cache_dtype("fp8", torch.bfloat16, gpu)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert kv_cache_dtype("fp8", torch.bfloat16, gpu) == torch.float8_e4m3fn


def test_run_cli_takes_kv_cache_dtype():
    from dist_llm.run import parse_args

    assert parse_args(["--engine_dir", "e", "--input_text", "hi", "--kv_cache_dtype", "fp8"]).kv_cache_dtype == "fp8"
    assert parse_args(["--engine_dir", "e", "--input_text", "hi"]).kv_cache_dtype == "auto"
    with pytest.raises(SystemExit):
        parse_args(["--engine_dir", "e", "--input_text", "hi", "--kv_cache_dtype", "int4"])
