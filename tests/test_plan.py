"""StepPlan and StepResult go through pickle every step (plans to every rank, results from the last
stage): they round-trip exactly, dtypes included, with their tensors sent as numpy arrays."""

from __future__ import annotations

import dataclasses
import pickle

import pytest
import torch

from dist_llm.runtime.plan import StepPlan, StepResult


def _plan(batch: int, prev: bool) -> StepPlan:
    r = lambda dt: torch.arange(batch, dtype=dt) * 3 - 1  # noqa: E731
    return StepPlan(
        input_ids=r(torch.int64), positions=r(torch.int64), slot_mapping=r(torch.int64),
        block_tables=torch.arange(batch * 5, dtype=torch.int32).view(batch, 5), seq_lens=r(torch.int32),
        cu_seqlens_q=torch.arange(batch + 1, dtype=torch.int32), max_seqlen_q=1, is_decode=True,
        temperature=r(torch.float32) / 7, top_k=r(torch.int32), top_p=r(torch.float32) / 9, seeds=r(torch.int64),
        offsets=r(torch.int64), sampling_mode="plain", return_logprobs=True,
        prev_index=r(torch.int64) if prev else None, num_decode_rows=batch - 1,
    )  # fmt: skip


@pytest.mark.parametrize("batch,prev", [(1, False), (7, True), (256, True)])
def test_step_plan_round_trip(batch, prev):
    plan = _plan(batch, prev)
    back = pickle.loads(pickle.dumps(plan))
    for f in dataclasses.fields(StepPlan):
        a, b = getattr(plan, f.name), getattr(back, f.name)
        if isinstance(a, torch.Tensor):
            assert b.dtype == a.dtype and torch.equal(a, b), f.name
        else:
            assert a == b, f.name
    assert back.batch_size == batch


def test_step_result_round_trip_and_unwaited_refused():
    res = StepResult(torch.arange(4), torch.rand(4), torch.rand(4, 11), top_logprob_ids=torch.arange(8).view(4, 2),
                     top_logprobs=torch.rand(4, 2))
    back = pickle.loads(pickle.dumps(res))
    assert torch.equal(back.token_ids, res.token_ids) and torch.equal(back.logits, res.logits)
    assert torch.equal(back.top_logprob_ids, res.top_logprob_ids) and torch.equal(back.top_logprobs, res.top_logprobs)
    assert back.ready is None
    with pytest.raises(AssertionError, match="wait"):
        pickle.dumps(StepResult(torch.arange(2), ready=object()))


class _Event:
    """A stand-in for torch.cuda.Event that completes after `polls` queries (never, with None)."""

    def __init__(self, polls):
        self.left = polls

    def query(self) -> bool:
        if self.left is None:
            return False
        self.left -= 1
        return self.left < 0


def test_wait_returns_once_the_step_is_done():
    event = _Event(polls=3000)
    result = StepResult(token_ids=torch.tensor([5]), ready=event)
    assert result.wait(timeout_s=5) is result and result.ready is None and event.left < 0


def test_a_step_that_never_finishes_raises_instead_of_hanging():
    from dist_llm.errors import DistLLMError

    result = StepResult(token_ids=torch.tensor([5]), ready=_Event(polls=None))
    with pytest.raises(DistLLMError, match="DIST_LLM_TIMEOUT_S=0.2.*a rank is stuck"):
        result.wait(timeout_s=0.2)


def test_warmup_plans_reach_each_eager_variant(monkeypatch):
    """The start-up mixed steps (runtime/profile.py): query tiles of 16, 32 and 64 rows for the context kernel,
    the decode kernel at one row over one and two blocks and at 32 rows, every sampling mode; each plan is a
    consistent step whose every read slot is written in the step itself."""
    from dist_llm.runtime.profile import warmup_plans

    plans = warmup_plans(block_size=64, num_blocks=100, max_batch_size=256, max_num_tokens=8192, max_seq_len=2048)
    assert [p.max_seqlen_q for p in plans] == [16, 32, 64]
    assert [p.num_decode_rows for p in plans] == [1, 1, 32]
    assert [p.block_tables.shape[1] for p in plans] == [1, 2, 1]
    assert [p.sampling_mode for p in plans] == ["greedy", "plain", "full"]
    for p in plans:
        nd, chunk = p.num_decode_rows, p.max_seqlen_q
        assert p.cu_seqlens_q.tolist() == [*range(nd + 1), nd + chunk] and p.positions.shape[0] == nd + chunk
        assert p.seq_lens.tolist() == [chunk] * (nd + 1) and p.temperature.shape[0] == nd + 1
        chunk_slots = p.slot_mapping[nd:].tolist()
        assert p.slot_mapping[:nd].tolist() == [chunk_slots[-1]] * nd  # decode rows at the chunk's last position
        assert max(chunk_slots) < 100 * 64
    tiny = warmup_plans(block_size=16, num_blocks=3, max_batch_size=1, max_num_tokens=8, max_seq_len=32)
    assert [(p.num_decode_rows, p.max_seqlen_q) for p in tiny] == [(0, 8)] * 3
    assert all(int(p.block_tables.max()) < 3 for p in tiny)
    monkeypatch.setenv("DIST_LLM_MIXED_DECODE_SPLIT", "0")
    assert [p.num_decode_rows for p in warmup_plans(64, 100, 256, 8192, 2048)] == [0, 0, 0]
    monkeypatch.setenv("DIST_LLM_MIXED_DECODE_SPLIT", "yes")
    with pytest.raises(ValueError, match="DIST_LLM_MIXED_DECODE_SPLIT must be 0 or 1"):
        warmup_plans(64, 100, 256, 8192, 2048)


def test_compile_warmup_runs_through_the_worker_and_changes_no_output(tiny_models, tmp_path):
    """The warm-up steps run through a real worker (the GPU runs them at start-up, before graph capture); the
    garbage they leave in the pool's first blocks changes nothing that requests generate afterwards."""
    from conftest import convert_and_build

    from dist_llm.runtime import ModelRunner
    from dist_llm.runtime.profile import run_compile_warmup

    engine = convert_and_build(tiny_models["llama"], tmp_path, 1, 1, max_num_tokens=48)
    prompts = [[5, 17, 99, 3, 42, 8, 250], [7] * 19, list(range(3, 40))]
    outs = []
    for warm in (False, True):
        runner = ModelRunner.from_dir(engine, device="cpu", num_kv_blocks=24)
        try:
            if warm:
                run_compile_warmup(runner.executor.worker, runner.executor.block_manager.num_blocks)
            outs.append([o.output_token_ids for o in runner.generate(batch_input_ids=prompts, max_new_tokens=6)])
        finally:
            runner.shutdown()
    assert outs[0] == outs[1]
