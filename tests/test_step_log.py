"""The executor's step log and bench_throughput's split of a run's time between prefill-carrying and
decode-only steps (one rank, on the CPU)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import convert_and_build

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_throughput import profile_mixed_step, random_requests, run_grid_point, step_breakdown  # noqa: E402


def test_step_breakdown_charges_each_step_the_time_since_the_last():
    log = [(1.5, 40, 0), (1.75, 10, 3), (2.0, 0, 4), (2.5, 0, 4)]
    b = step_breakdown(log, t0=1.0)
    m, d = b["mixed"], b["decode_only"]
    assert (m["steps"], m["prefill_tokens"], m["decode_rows"]) == (2, 50, 3)
    assert m["seconds"] == pytest.approx(0.75) and m["ms_per_step"] == pytest.approx(375.0)
    assert (d["steps"], d["decode_rows"]) == (2, 8)
    assert d["seconds"] == pytest.approx(0.75) and d["rows_per_step"] == pytest.approx(4.0)
    empty = step_breakdown([], t0=0.0)
    assert empty["mixed"]["steps"] == 0 and empty["mixed"]["seconds"] == 0.0


def test_executor_logs_every_completed_step(tiny_models, tmp_path):
    from dist_llm.runtime import ModelRunner
    from dist_llm.runtime.sequence import SamplingParams, Sequence

    engine = convert_and_build(tiny_models["llama"], tmp_path, 1, 1, max_num_tokens=48)
    runner = ModelRunner.from_dir(engine, device="cpu", num_kv_blocks=64)
    try:
        ex = runner.executor
        ex.step_log = []
        gen = torch.Generator().manual_seed(0)
        vocab = runner.engine.model.vocab_size
        seqs = [Sequence(torch.randint(3, vocab, (30,), generator=gen).tolist(),
                         SamplingParams(max_new_tokens=5, ignore_eos=True)) for _ in range(4)]
        t0 = time.perf_counter()
        for s in seqs:
            ex.enqueue(s)
        while ex.has_unfinished():
            ex.step()
        log = ex.step_log
        assert len(log) == ex.steps
        assert [t for t, _, _ in log] == sorted(t for t, _, _ in log)
        # 120 prompt tokens through a 48-token budget: chunked, so prefill spans several steps
        assert sum(p for _, p, _ in log) == 4 * 30
        assert sum(1 for _, p, _ in log if p) >= 3
        # 4 more tokens each after the first; overlap may compute one extra per request, dropped
        assert 4 * 4 <= sum(r for _, _, r in log) <= 4 * 5
        b = step_breakdown(log, t0)
        total = b["mixed"]["seconds"] + b["decode_only"]["seconds"]
        assert total == pytest.approx(log[-1][0] - t0)
        # the benchmark's own loop over the same engine: no GPU timeline on the CPU, the log reset afterwards
        row = run_grid_point(runner, 3, 30, 4)
        assert row["output_tok_s"] > 0 and row["gpu_timeline"] is None and isinstance(row["triton_compiles"], list)
        assert row["steps"]["mixed"]["prefill_tokens"] == 3 * 30 and ex.step_log is None
    finally:
        runner.shutdown()


def test_mixed_step_profile_finds_the_step_with_the_new_prompts(tiny_models, tmp_path):
    """bench_throughput's mixed-step probe: new prompts filling the token budget join decoding requests, and the
    step that carries them is found in the step log (its kernel table is empty on the CPU); its prompts are
    distinct, so no KV block is shared through prefix reuse."""
    from dist_llm.runtime import ModelRunner

    engine = convert_and_build(tiny_models["llama"], tmp_path, 1, 1, max_num_tokens=48)
    runner = ModelRunner.from_dir(engine, device="cpu", num_kv_blocks=128)
    try:
        reqs = random_requests(runner, 6, 16, 2, seed=0)
        assert len({tuple(r.token_ids) for r in reqs}) == 6
        out = profile_mixed_step(runner, batch=6, max_num_tokens=48, in_len=16)
        assert out["prefill_tokens"] == 48 and out["decode_rows"] == 3
        for trial in ("wall", "profile"):
            steps = out[f"{trial}_steps"]  # decode rows take budget first: the last prompt may spill into a next step
            assert sum(p for p, _ in steps) == 48 and any(p >= 40 and r == 3 for p, r in steps), steps
            assert len(out[f"{trial}_mixed_ms"]) >= 1 and min(out[f"{trial}_mixed_ms"]) > 0
        assert not runner.executor.has_unfinished()
        assert runner.executor.block_manager.num_free_blocks == runner.executor.block_manager.num_blocks
    finally:
        runner.shutdown()


def test_gpu_timeline_sums_idle_and_busy_by_kind_of_step():
    from bench_throughput import gpu_timeline

    t = gpu_timeline([(0.0, 150.0, False), (4.0, 16.0, True), (0.5, 17.0, True), (6.0, 20.0, False)])
    assert t["mixed"] == {"steps": 2, "idle_s": pytest.approx(0.006), "busy_s": pytest.approx(0.170)}
    assert t["decode_only"] == {"steps": 2, "idle_s": pytest.approx(0.0045), "busy_s": pytest.approx(0.033)}
    assert gpu_timeline([])["mixed"] == {"steps": 0, "idle_s": 0.0, "busy_s": 0.0}


def test_triton_compiles_records_the_hook_and_restores_it():
    """The benchmark's compile watch chains to a hook already installed and puts it back afterwards."""
    import triton
    from common import triton_compiles

    runtime = triton.knobs.runtime
    seen = []
    outer = lambda **kw: seen.append(kw["fn"].name)  # noqa: E731
    runtime.jit_post_compile_hook = outer
    try:
        fn = type("Info", (), {"name": "_some_kernel"})()
        with triton_compiles() as names:
            runtime.jit_post_compile_hook(fn=fn, key=None)
        assert names == ["_some_kernel"] and seen == ["_some_kernel"]
        assert runtime.jit_post_compile_hook is outer
    finally:
        runtime.jit_post_compile_hook = None
