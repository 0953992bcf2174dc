"""n sequences per prompt (OpenAI's and vLLM's `n`, TensorRT-LLM's num_return_sequences): each is the request
it would be alone with seed + j, and sequences 1..n-1 take the prompt's KV from the prefix cache."""

from __future__ import annotations

import json

import pytest
from conftest import PROMPTS, convert_and_build, run_dist
from test_features import in_process

from dist_llm.errors import DistLLMError
from dist_llm.runtime.block_manager import BlockManager
from dist_llm.runtime.scheduler import Scheduler
from dist_llm.runtime.sequence import SamplingParams, Sequence, fan_out

HOT = dict(temperature=1.0, top_k=50, end_id=-1)


@pytest.fixture(scope="module")
def engine(tiny_models, tmp_path_factory) -> str:  # blocks of 16 tokens
    return convert_and_build(tiny_models["llama"], tmp_path_factory.mktemp("n_engine"), 1, 1)


def long_prompt(runner) -> list[int]:
    ids = runner.tokenize([" ".join(PROMPTS)])[0]
    assert len(ids) > 3 * 16, len(ids)
    return ids[:53]  # three full blocks of 16 and five tokens


def test_each_sequence_is_its_seed_alone(engine):
    """n = 3 over two prompts: outputs prompt by prompt, sequence j the same tokens as a call with seed 10 + j,
    the three of a prompt different from each other."""
    with in_process(engine) as runner:
        prompts = [long_prompt(runner), runner.tokenize([PROMPTS[1]])[0]]
        outs = runner.generate(batch_input_ids=prompts, max_new_tokens=12, n=3, seed=10, **HOT)
        alone = [runner.generate(batch_input_ids=prompts, max_new_tokens=12, seed=10 + j, **HOT) for j in range(3)]
    assert len(outs) == 6
    assert [(o.prompt_token_ids == prompts[i // 3], o.sequence_index) for i, o in enumerate(outs)] == [
        (True, j) for _ in range(2) for j in range(3)]
    for i, o in enumerate(outs):
        assert o.output_token_ids == alone[i % 3][i // 3].output_token_ids, f"prompt {i // 3}, sequence {i % 3}"
        assert len(o.output_token_ids) == 12 and o.finish_reason == "length"
    for p in range(2):
        assert len({tuple(o.output_token_ids) for o in outs[3 * p : 3 * p + 3]}) == 3
    assert alone[0][0].sequence_index is None and "sequence_index" not in alone[0][0].to_json()
    assert outs[4].to_json()["sequence_index"] == 1


def test_sequences_share_the_prompt_kv(engine):
    """Sequence 0 computes the prompt; the others find its three full blocks in the prefix cache and
    compute only the partial one. Greedy, all four give the n = 1 tokens; the pool is whole afterwards."""
    with in_process(engine) as runner:
        prompt = long_prompt(runner)
        runner.executor.block_manager.reset_prefix_cache()
        outs = runner.generate(batch_input_ids=[prompt], max_new_tokens=8, n=4, end_id=-1)
        runner.executor.block_manager.reset_prefix_cache()
        single = runner.generate(batch_input_ids=[prompt], max_new_tokens=8, end_id=-1)[0]
        bm = runner.executor.block_manager
        bm.check_invariants()
        assert bm.num_free_blocks == bm.num_blocks
    assert [o.num_cached_tokens for o in outs] == [0, 48, 48, 48]
    assert all(o.output_token_ids == single.output_token_ids for o in outs)


def test_stream_carries_the_sequence_index(engine):
    with in_process(engine) as runner:
        prompt = long_prompt(runner)
        outs = runner.generate(batch_input_ids=[prompt], max_new_tokens=6, n=2, seed=4, **HOT)
        streamed = {0: [], 1: []}
        for chunk in runner.generate_stream(batch_input_ids=[prompt], max_new_tokens=6, n=2, seed=4, **HOT):
            assert chunk.index == 0
            streamed[chunk.sequence_index] += chunk.new_token_ids
    assert [streamed[0], streamed[1]] == [o.output_token_ids for o in outs]


def test_waiting_sequences_keep_their_place_without_blocking_others():
    """Sequences 1 and 2 of a prompt wait for sequence 0's prompt KV; the request queued behind them is
    admitted at once. When sequence 0 has its first token, they are admitted, ahead of later arrivals, with
    the prompt's full blocks from the cache."""
    bm = BlockManager(64, 4)
    sched = Scheduler(bm, max_batch_size=8, max_num_tokens=64)
    group = fan_out(list(range(1, 11)), SamplingParams(max_new_tokens=4, n=3))  # 10 tokens: two full blocks
    other = Sequence([20, 21, 22], SamplingParams(max_new_tokens=4))
    for seq in (*group, other):
        sched.add(seq)
    batch = sched.schedule()
    assert batch.seqs == [group[0], other] and list(sched.waiting) == group[1:]
    # the step comes back: KV written and committed, each has its first token
    for seq in batch.seqs:
        seq.num_computed_tokens = len(seq)
        bm.commit(seq, len(seq))
        seq.token_ids.append(5)
    later = Sequence([30, 31], SamplingParams(max_new_tokens=4))
    sched.add(later)
    batch = sched.schedule()
    assert batch.seqs == [group[0], other, group[1], group[2], later]
    assert [s.num_cached_tokens for s in group[1:]] == [8, 8]
    assert group[1].block_table[:2] == group[2].block_table[:2] == group[0].block_table[:2]
    assert batch.num_new_tokens == [1, 1, 2, 2, 2]


def test_sequences_of_a_cancelled_first_sequence_do_not_wait():
    bm = BlockManager(64, 4)
    sched = Scheduler(bm, max_batch_size=8, max_num_tokens=64)
    group = fan_out(list(range(1, 11)), SamplingParams(max_new_tokens=4, n=2))
    for seq in group:
        sched.add(seq)
    assert sched.schedule().seqs == [group[0]]
    sched.finish(group[0], "cancelled")
    assert sched.schedule().seqs == [group[1]]


def test_seeds_and_bad_n():
    seqs = fan_out([1, 2], SamplingParams(n=3, temperature=1.0, seed=7))
    assert [s.seed for s in seqs] == [7, 8, 9] and [s.sequence_index for s in seqs] == [0, 1, 2]
    assert [s.prefix_source for s in seqs] == [None, seqs[0], seqs[0]]
    assert all(s.seed is None for s in fan_out([1], SamplingParams(n=2, temperature=1.0)))
    for bad in (0, -1, 1.5):
        with pytest.raises(DistLLMError, match="n \\(sequences per prompt\\)"):
            SamplingParams(n=bad)


def test_cli_num_return_sequences_under_mpirun(tiny_engine_tp2, tmp_path):
    """tp=2: --num_return_sequences 2 --seed 7 gives per prompt sequence 0 (seed 7) and 1 (seed 8), as two
    runs with --seed 7 and --seed 8 do."""
    base = ["--engine_dir", tiny_engine_tp2, "--input_text", *PROMPTS[:2], "--max_new_tokens", "6",
            "--temperature", "1.0", "--end_id", "-1", "--output_json"]
    runs = {}
    for name, extra in (("n2", ["--seed", "7", "--n", "2"]), ("s8", ["--seed", "8"])):
        path = tmp_path / f"{name}.json"
        run_dist(2, [*base, str(path), *extra])
        runs[name] = json.loads(path.read_text())
    assert [(o["input_text"], o["sequence_index"]) for o in runs["n2"]] == [
        (PROMPTS[0], 0), (PROMPTS[0], 1), (PROMPTS[1], 0), (PROMPTS[1], 1)]
    assert [o["output_token_ids"] for o in runs["n2"][1::2]] == [o["output_token_ids"] for o in runs["s8"]]
    assert runs["n2"][0]["output_token_ids"] != runs["n2"][1]["output_token_ids"]


def test_sequences_that_the_cache_will_not_serve_do_not_wait():
    """With prompt_logprobs every sequence computes the prompt itself, so waiting for sequence 0 gains nothing."""
    sched = Scheduler(BlockManager(64, 4), max_batch_size=8, max_num_tokens=64)
    group = fan_out(list(range(1, 11)), SamplingParams(max_new_tokens=4, n=3, prompt_logprobs=True))
    for seq in group:
        sched.add(seq)
    assert sched.schedule().seqs == group
