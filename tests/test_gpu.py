"""On the GPU machine: bf16 equivalence with transformers, tp=2 through gloo on one GPU, and NCCL
tp=2 / pp=2 against tp=1 when the machine has two GPUs. Skipped without a GPU.

Each test prints the largest first-step logit difference; run with -s to see them.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import PROMPTS, convert_and_build, run_dist

pytestmark = pytest.mark.gpu
MAX_NEW = 32


def hf_bf16(model_dir: str, prompts: list[str], max_new: int):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).cuda().eval()
    tokens, logits = [], []
    with torch.no_grad():
        for p in prompts:
            ids = tok(p, return_tensors="pt").input_ids.cuda()
            out = model.generate(ids, max_new_tokens=max_new, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True)
            tokens.append(out.sequences[0, ids.shape[1]:].tolist())
            logits.append(out.logits[0][0].float().cpu())
    return tokens, torch.stack(logits)


def run_engine(engine: str, n: int, tmp_path, *extra: str):
    out, lg = tmp_path / f"o{n}{len(extra)}.json", tmp_path / f"l{n}{len(extra)}.pt"
    run_dist(n, ["--engine_dir", engine, "--input_text", *PROMPTS, "--max_new_tokens", str(MAX_NEW), "--device",
                 "cuda", "--output_json", str(out), "--output_first_logits", str(lg), "--quiet", *extra])
    return [o["output_token_ids"] for o in json.loads(out.read_text())], torch.load(lg)


def report(name: str, got, want) -> float:
    diff = (got - want).abs().max().item()
    print(f"\n{name}: largest first-step logit difference {diff:.4g} (logit scale {want.abs().max().item():.3g})")
    return diff


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_bf16_tp1_matches_transformers(arch, tiny_models, tmp_path):
    ref_tokens, ref_logits = hf_bf16(tiny_models[arch], PROMPTS, MAX_NEW)
    engine = convert_and_build(tiny_models[arch], tmp_path, 1, 1, dtype="bfloat16")
    tokens, logits = run_engine(engine, 1, tmp_path)
    report(f"{arch} bf16 tp=1 (triton kernels) vs HF bf16", logits, ref_logits)
    assert tokens == ref_tokens
    assert (logits - ref_logits).abs().max() <= 0.05 * ref_logits.abs().max()


def test_bf16_tp2_gloo_on_one_gpu(tiny_models, tmp_path):
    ref_tokens, ref_logits = hf_bf16(tiny_models["llama"], PROMPTS, MAX_NEW)
    engine = convert_and_build(tiny_models["llama"], tmp_path, 2, 1, dtype="bfloat16")
    tokens, logits = run_engine(engine, 2, tmp_path, "--backend", "gloo")
    report("llama bf16 tp=2 gloo on one GPU vs HF bf16", logits, ref_logits)
    assert tokens == ref_tokens


needs_two = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs for NCCL")


@needs_two
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_nccl_matches_tp1(tp, pp, tiny_models, tmp_path):
    base_tokens, base_logits = run_engine(convert_and_build(tiny_models["llama"], tmp_path, 1, 1, dtype="bfloat16"),
                                          1, tmp_path)
    engine = convert_and_build(tiny_models["llama"], tmp_path, tp, pp, dtype="bfloat16")
    tokens, logits = run_engine(engine, tp * pp, tmp_path, "--backend", "nccl")
    report(f"llama bf16 tp={tp} pp={pp} NCCL vs tp=1", logits, base_logits)
    assert tokens == base_tokens
