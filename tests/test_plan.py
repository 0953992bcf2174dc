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
        prev_index=r(torch.int64) if prev else None,
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
    res = StepResult(torch.arange(4), torch.rand(4), torch.rand(4, 11))
    back = pickle.loads(pickle.dumps(res))
    assert torch.equal(back.token_ids, res.token_ids) and torch.equal(back.logits, res.logits)
    assert back.ready is None
    with pytest.raises(AssertionError, match="wait"):
        pickle.dumps(StepResult(torch.arange(2), ready=object()))
