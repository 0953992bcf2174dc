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
