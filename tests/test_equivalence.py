"""The story: a tiny random HF model gives the same greedy tokens through dist_llm at every tp×pp as
through transformers, and the same first-step logits within 1e-4 relative."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import PROMPTS, convert_and_build, hf_reference, run_dist

MAX_NEW = 16
GRID = [(1, 1), (2, 1), (1, 2), (2, 2)]
CASES = [(arch, tp, pp) for arch in ("llama", "mistral", "qwen2") for tp, pp in GRID]
CASES += [("llama", 4, 1), ("llama_tied", 2, 2), ("llama_tied", 1, 1)]  # KV-head replication; tied + linear rope


@pytest.fixture(scope="module")
def references(tiny_models):
    return {arch: hf_reference(d, PROMPTS, MAX_NEW) for arch, d in tiny_models.items()}


@pytest.mark.parametrize("arch,tp,pp", CASES, ids=[f"{a}-tp{t}-pp{p}" for a, t, p in CASES])
def test_mpirun_matches_transformers(arch, tp, pp, tiny_models, references, tmp_path):
    engine = convert_and_build(tiny_models[arch], tmp_path, tp, pp)
    out_json, out_logits = tmp_path / "out.json", tmp_path / "logits.pt"
    run_dist(tp * pp, ["--engine_dir", engine, "--input_text", *PROMPTS, "--max_new_tokens", str(MAX_NEW),
                       "--output_json", str(out_json), "--output_first_logits", str(out_logits), "--quiet"])
    ref_tokens, ref_logits = references[arch]
    outputs = json.loads(out_json.read_text())
    assert [o["input_text"] for o in outputs] == PROMPTS
    for got, want in zip(outputs, ref_tokens):
        assert got["output_token_ids"] == want
        assert got["finish_reason"] in ("length", "stop")
    logits = torch.load(out_logits)
    rel = ((logits - ref_logits).abs().max() / ref_logits.abs().max()).item()
    assert rel < 1e-4, f"first-step logits differ by {rel:.2e} (relative)"


def test_model_runner_in_process_matches(tiny_models, references, tmp_path):
    """A 1-rank engine needs no launcher: the Python form, in this very process."""
    from dist_llm.parallel.state import destroy
    from dist_llm.runtime import ModelRunner

    engine = convert_and_build(tiny_models["qwen2"], tmp_path, 1, 1)
    try:
        runner = ModelRunner.from_dir(engine, device="cpu")
        assert runner.is_leader
        outputs = runner.generate(input_texts=PROMPTS, max_new_tokens=MAX_NEW)
        runner.shutdown()
    finally:
        destroy()
    assert [o.output_token_ids for o in outputs] == references["qwen2"][0]
    assert all(o.output_text is not None for o in outputs)


RUNNER_SCRIPT = """
import json, sys
from dist_llm.runtime import ModelRunner
runner = ModelRunner.from_dir(sys.argv[1])
outputs = runner.generate(input_texts=json.loads(sys.argv[2]), max_new_tokens=int(sys.argv[3]))
if runner.is_leader:
    json.dump([o.output_token_ids for o in outputs], open(sys.argv[4], "w"))
else:
    assert outputs is None
"""


def test_model_runner_under_mpirun(tiny_models, references, tmp_path):
    import sys

    from conftest import mpirun_cmd, run_cmd

    engine = convert_and_build(tiny_models["llama"], tmp_path, 2, 1)
    script, out = tmp_path / "runner.py", tmp_path / "tokens.json"
    script.write_text(RUNNER_SCRIPT)
    run_cmd(mpirun_cmd(2) + [sys.executable, str(script), engine, json.dumps(PROMPTS), str(MAX_NEW), str(out)])
    assert json.loads(out.read_text()) == references["llama"][0]


@pytest.mark.parametrize("arch,tp", [("llama", 2), ("qwen2", 1)])
def test_triton_backend_matches_transformers(arch, tp, tiny_models, references, tmp_path):
    """The same story with every op on the Triton kernels (the interpreter on the CPU)."""
    engine = convert_and_build(tiny_models[arch], tmp_path, tp, 1)
    out_json, out_logits = tmp_path / "out.json", tmp_path / "logits.pt"
    new = 6
    run_dist(tp, ["--engine_dir", engine, "--input_text", *PROMPTS, "--max_new_tokens", str(new),
                  "--attention_backend", "triton", "--output_json", str(out_json),
                  "--output_first_logits", str(out_logits), "--quiet"], timeout=600)
    ref_tokens, ref_logits = references[arch]
    assert [o["output_token_ids"] for o in json.loads(out_json.read_text())] == [t[:new] for t in ref_tokens]
    logits = torch.load(out_logits)
    assert ((logits - ref_logits).abs().max() / ref_logits.abs().max()).item() < 1e-4
