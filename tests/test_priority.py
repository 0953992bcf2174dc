"""The "priority" scheduling policy end to end: with one slot, requests run by priority, each with the tokens it
gives alone; the policy and the priorities are checked before any work."""

from __future__ import annotations

import json

import pytest
from conftest import PROMPTS, convert_and_build, run_dist

from dist_llm.errors import DistLLMError


@pytest.fixture(scope="module")
def engine_one_slot(tiny_models, tmp_path_factory) -> str:
    return convert_and_build(tiny_models["llama"], tmp_path_factory.mktemp("prio"), 1, 1, max_batch_size=1)


FOUR = [*PROMPTS[:3], "The rank zero coordinator"]


def run(engine, policy, **kw):
    from dist_llm.parallel.state import destroy
    from dist_llm.runtime import ModelRunner

    try:
        runner = ModelRunner.from_dir(engine, device="cpu", scheduling_policy=policy)
        order = []
        for chunk in runner.generate_stream(input_texts=FOUR, max_new_tokens=5, end_id=-1, **kw):
            if chunk.finished:
                order.append(chunk.index)
        outs = runner.generate(input_texts=FOUR, max_new_tokens=5, end_id=-1, **kw)
        runner.shutdown()
    finally:
        destroy()
    return order, [o.output_token_ids for o in outs]


def test_one_slot_runs_by_priority(engine_one_slot):
    fcfs_order, fcfs_tokens = run(engine_one_slot, "fcfs", priority=[3, 1, 2, 0])
    prio_order, prio_tokens = run(engine_one_slot, "priority", priority=[3, 1, 2, 0])
    assert fcfs_order == [0, 1, 2, 3]  # priorities are ignored under fcfs
    assert prio_order == [3, 1, 2, 0]
    assert prio_tokens == fcfs_tokens


def test_bad_policy_and_priorities(engine_one_slot):
    from dist_llm.parallel.state import destroy
    from dist_llm.runtime import ModelRunner

    with pytest.raises(DistLLMError, match="unknown --scheduling_policy 'lifo'"):
        ModelRunner.from_dir(engine_one_slot, device="cpu", scheduling_policy="lifo")
    try:
        runner = ModelRunner.from_dir(engine_one_slot, device="cpu", scheduling_policy="priority")
        with pytest.raises(DistLLMError, match="one int per prompt \\(2\\)"):
            runner.generate(input_texts=PROMPTS[:2], priority=[1])
        runner.shutdown()
    finally:
        destroy()


def test_cli_jsonl_priorities(engine_one_slot, tmp_path):
    """--input_file JSONL with 'priority' fields, --scheduling_policy priority, in a plain process; outputs stay in
    input order. A non-integer priority is refused with the line number."""
    src = tmp_path / "p.jsonl"
    src.write_text("\n".join(json.dumps({"prompt": p, "priority": prio}) for p, prio in zip(PROMPTS[:3], (2, 0, 1))))
    out = tmp_path / "o.json"
    run_dist(0, ["--engine_dir", engine_one_slot, "--input_file", str(src), "--max_new_tokens", "4",
                 "--scheduling_policy", "priority", "--output_json", str(out)])
    assert [o["input_text"] for o in json.loads(out.read_text())] == PROMPTS[:3]
    src.write_text(json.dumps({"prompt": "x", "priority": "high"}) + "\n")
    proc = run_dist(0, ["--engine_dir", engine_one_slot, "--input_file", str(src)], check=False)
    assert proc.returncode != 0 and "p.jsonl:1: 'priority' must be an integer" in proc.stderr + proc.stdout
