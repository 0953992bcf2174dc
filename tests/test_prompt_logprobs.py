"""Prompt log-probabilities (`prompt_logprobs`): each prompt token's log-probability given the ones before, as
transformers' forward gives it, across prefill chunks, beside requests that do not ask, with the prefix cache
holding the prompt already, after a preemption, and under mpirun at pp=2."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import PROMPTS, convert_and_build, run_dist
from test_features import in_process

LONG = " ".join(PROMPTS)


def hf_prompt_logprobs(model, ids: list[int]) -> list[float]:
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1)
    return [logp[p, ids[p + 1]].item() for p in range(len(ids) - 1)]


@pytest.fixture(scope="module")
def hf_model(tiny_models):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def engine(tiny_models, tmp_path_factory) -> str:  # 16-token budget a step: a long prompt takes several chunks
    return convert_and_build(tiny_models["llama"], tmp_path_factory.mktemp("plp"), 1, 1, max_num_tokens=16)


def test_match_transformers_across_chunks_and_the_cache(engine, hf_model):
    with in_process(engine) as runner:
        prompts = runner.tokenize([LONG, PROMPTS[1]])
        assert len(prompts[0]) > 3 * 16
        plain = runner.generate(batch_input_ids=prompts, max_new_tokens=4, end_id=-1)  # (the cache now holds both)
        outs = runner.generate(batch_input_ids=prompts, max_new_tokens=4, end_id=-1, prompt_logprobs=True)
        mixed = runner.generate(batch_input_ids=[prompts[0]], max_new_tokens=4, end_id=-1)[0]
    for prompt, o, p in zip(prompts, outs, plain):
        want = hf_prompt_logprobs(hf_model, prompt)
        assert o.prompt_logprobs[0] is None and len(o.prompt_logprobs) == len(prompt)
        assert o.prompt_logprobs[1:] == pytest.approx(want, abs=1e-4)
        assert o.num_cached_tokens == 0  # computed in full although the cache held the prompt
        assert o.output_token_ids == p.output_token_ids
        assert "prompt_logprobs" in o.to_json() and "prompt_logprobs" not in p.to_json()
    assert mixed.num_cached_tokens > 0 and mixed.prompt_logprobs is None  # others still use the cache


def test_after_preemption(tiny_models, hf_model, tmp_path):
    """A pool too small for all at once: requests are preempted and recomputed; each prompt's list is still whole,
    in order, once."""
    from dist_llm.parallel.state import destroy
    from dist_llm.runtime import ModelRunner

    engine = convert_and_build(tiny_models["llama"], tmp_path, 1, 1)
    try:
        runner = ModelRunner.from_dir(engine, device="cpu", num_kv_blocks=8)  # 8 blocks of 16 tokens
        prompts = runner.tokenize([LONG[:120], LONG[40:160], LONG[80:200]])
        outs = runner.generate(batch_input_ids=prompts, max_new_tokens=40, end_id=-1, prompt_logprobs=True)
        preempted = runner.executor.scheduler.num_preemptions
        runner.shutdown()
    finally:
        destroy()
    assert preempted > 0
    for prompt, o in zip(prompts, outs):
        assert o.prompt_logprobs[1:] == pytest.approx(hf_prompt_logprobs(hf_model, prompt), abs=1e-4)


def test_cli_under_mpirun_pp2(tiny_models, hf_model, tmp_path):
    from transformers import AutoTokenizer

    engine = convert_and_build(tiny_models["llama"], tmp_path, 1, 2)
    out = tmp_path / "o.json"
    run_dist(2, ["--engine_dir", engine, "--device", "cpu", "--input_text", *PROMPTS[:2], "--max_new_tokens", "3",
                 "--prompt_logprobs", "--output_json", str(out), "--quiet"])
    tok = AutoTokenizer.from_pretrained(tiny_models["llama"])
    for text, o in zip(PROMPTS[:2], json.loads(out.read_text())):
        assert o["prompt_logprobs"][0] is None
        assert o["prompt_logprobs"][1:] == pytest.approx(hf_prompt_logprobs(hf_model, tok(text)["input_ids"]), abs=1e-4)
