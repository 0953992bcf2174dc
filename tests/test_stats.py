"""Iteration stats, per-request metrics and the periodic stats line (runtime/stats.py): their figures agree with
the outputs they describe, with the prefix cache, with preemption, and through the run command."""

from __future__ import annotations

import json
import logging

import pytest
from conftest import PROMPTS, convert_and_build, run_dist

from dist_llm.errors import DistLLMError
from dist_llm.runtime.block_manager import BlockManager

LONG = PROMPTS[2] * 2  # several full blocks of 16 tokens
SHARED = [LONG + " first", LONG + " second", LONG + " third"]


@pytest.fixture(scope="module")
def engine(tiny_models, tmp_path_factory) -> str:
    return convert_and_build(tiny_models["llama"], tmp_path_factory.mktemp("stats"), 1, 1)


class Seq:
    def __init__(self, tokens):
        self.token_ids, self.block_table, self.num_cached_tokens = list(tokens), [], 0


def test_block_manager_counts_prefix_hits_and_misses():
    bm = BlockManager(num_blocks=10, block_size=4)
    a = Seq(range(13))  # 3 full blocks looked up (the last token is always computed), none cached yet
    bm.allocate(a)
    assert (bm.reused_blocks, bm.missed_blocks, bm.queried_tokens, bm.hit_tokens) == (0, 3, 13, 0)
    assert bm.num_used_blocks == 4
    bm.commit(a, 13)
    b = Seq([*range(9), 99, 98, 97, 96, 95])  # the first two blocks are a's
    bm.allocate(b)
    assert (bm.reused_blocks, bm.missed_blocks, bm.queried_tokens, bm.hit_tokens) == (2, 4, 27, 8)
    assert bm.num_used_blocks == 4 + 2  # two shared, two new
    bm.free(a)
    bm.free(b)
    assert bm.num_used_blocks == 0 and bm.num_cached_blocks == 3


def _runner(engine, **kw):
    from dist_llm.runtime import ModelRunner

    return ModelRunner.from_dir(engine, device="cpu", **kw)


def test_stats_and_metrics_match_the_outputs(engine, caplog):
    from dist_llm.parallel.state import destroy

    try:
        runner = _runner(engine, log_stats_interval=1e-6)
        with caplog.at_level(logging.INFO, logger="dist_llm"):
            first = runner.generate(input_texts=SHARED[:1], max_new_tokens=4, end_id=-1)
            outs = runner.generate(input_texts=SHARED[1:], max_new_tokens=7, end_id=-1)
        stats = runner.executor.stats()
        runner.shutdown()
    finally:
        destroy()
    outs = first + outs
    assert sum(o.num_cached_tokens for o in outs[1:]) > 0  # the later prompts found the first one's blocks
    assert stats.kv.prefix_hit_tokens == sum(o.num_cached_tokens for o in outs)
    assert stats.kv.prefix_queried_tokens == sum(len(o.prompt_token_ids) for o in outs)
    assert 0 < stats.kv.cache_hit_rate < 1
    assert stats.kv.reused_blocks * stats.kv.tokens_per_block == stats.kv.prefix_hit_tokens
    assert stats.kv.used_num_blocks == 0 and stats.kv.usage == 0  # everything freed
    assert stats.kv.cached_num_blocks > 0 and stats.kv.free_num_blocks == stats.kv.max_num_blocks
    assert stats.generation_tokens == sum(len(o.output_token_ids) for o in outs) == 4 + 2 * 7
    assert stats.prompt_tokens == sum(len(o.prompt_token_ids) - o.num_cached_tokens for o in outs)
    assert stats.num_finished == 3 and stats.num_running == stats.num_waiting == 0 and stats.num_preemptions == 0
    assert stats.iteration > 0 and stats.iter_latency_ms > 0
    assert stats.num_scheduled_requests == stats.num_context_requests + stats.num_generation_requests
    assert json.loads(json.dumps(stats.to_json()))["kv"]["usage"] == 0
    for o in outs:
        m = o.metrics
        assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.finished_time
        assert m.time_in_queue >= 0 and 0 < m.ttft <= m.e2e_latency and m.tpot > 0
        assert m.num_generated_tokens == len(o.output_token_ids) and m.num_preemptions == 0
        assert set(o.to_json(metrics=True)["metrics"]) >= {"ttft", "tpot", "e2e_latency", "time_in_queue"}
        assert "metrics" not in o.to_json()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Avg prompt throughput")]
    assert lines, "no stats line was logged"
    assert "Running: 0 reqs, Waiting: 0 reqs" in lines[-1] and "KV cache usage: 0.0%" in lines[-1]
    assert any("Running: 2 reqs" in line for line in lines)  # the second call's two requests ran together
    assert "Prefix cache hit rate: 0.0%" not in lines[-1]


def test_preemptions_are_counted(engine):
    """A pool of 6 blocks of 16 tokens for 3 requests of ~30 + 40 tokens: some are preempted and recomputed."""
    from dist_llm.parallel.state import destroy

    prompts = [PROMPTS[2] + " one", PROMPTS[2] + " two", PROMPTS[0] + " three"]
    try:
        runner = _runner(engine, num_kv_blocks=6)
        outs = runner.generate(input_texts=prompts, max_new_tokens=40, end_id=-1)
        stats = runner.executor.stats()
        runner.shutdown()
    finally:
        destroy()
    assert stats.num_preemptions > 0
    assert sum(o.metrics.num_preemptions for o in outs) == stats.num_preemptions
    assert stats.prompt_tokens > sum(len(o.prompt_token_ids) - o.num_cached_tokens for o in outs)  # recomputed
    assert stats.generation_tokens == 3 * 40


def test_rejected_request_has_metrics_and_bad_interval_is_named(engine):
    from dist_llm.parallel.state import destroy

    with pytest.raises(DistLLMError, match="--log_stats_interval must be >= 0"):
        _runner(engine, log_stats_interval=-1)
    try:
        runner = _runner(engine)
        out = runner.generate(input_texts=[PROMPTS[0]], max_new_tokens=500)[0]
        runner.shutdown()
    finally:
        destroy()
    assert out.finish_reason == "rejected" and out.metrics.first_scheduled_time is None
    assert out.metrics.ttft is None and out.metrics.e2e_latency >= 0


def test_run_command_writes_metrics_and_logs_stats(engine, tmp_path):
    path = tmp_path / "o.json"
    proc = run_dist(0, ["--engine_dir", engine, "--input_text", *PROMPTS[:2], "--max_new_tokens", "5",
                        "--end_id", "-1", "--output_json", str(path), "--output_metrics", "--log_stats_interval",
                        "0.001", "--device", "cpu"])
    outs = json.loads(path.read_text())
    assert all(o["metrics"]["ttft"] > 0 and o["metrics"]["num_generated_tokens"] == 5 for o in outs)
    assert "Avg generation throughput" in proc.stdout + proc.stderr
