"""In-flight batching under mpirun (tp=2 and pp=2): 50 requests of varied lengths, submitted in
waves, give exactly the tokens each gives alone; also with a KV pool so small that requests are
preempted; with prefix reuse; with cancellations; and streamed."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import convert_and_build, mpirun_cmd, run_cmd

SCRIPT = str(Path(__file__).with_name("batching_script.py"))


@pytest.fixture(scope="module", params=[(2, 1), (1, 2)], ids=["tp2", "pp2"])
def report(request, tiny_models, tmp_path_factory):
    tp, pp = request.param
    tmp = tmp_path_factory.mktemp(f"batching_tp{tp}_pp{pp}")
    engine = convert_and_build(tiny_models["llama"], tmp, tp, pp, max_batch_size=16, max_num_tokens=64)
    out = tmp / "report.json"
    run_cmd(mpirun_cmd(tp * pp) + [sys.executable, SCRIPT, engine, str(out)], timeout=600)
    return json.loads(out.read_text())


def test_staggered_requests_match_alone(report):
    assert report["staggered"] == report["alone"]
    assert len(report["alone"]) == 50
    free, total = report["staggered_free_blocks"]
    assert free == total


def test_steps_overlap(report):
    """With pp stages, up to pp micro-batches of disjoint requests are in the pipeline at once; with one
    stage, overlap scheduling launches the next step before the current one comes back."""
    assert report["max_inflight"] == (report["pp_size"] if report["pp_size"] > 1 else 2)


def test_preemption_keeps_outputs(report):
    assert report["num_preemptions"] > 0
    assert report["preempted"] == report["alone"]
    free, total = report["preempted_free_blocks"]
    assert free == total


def test_guaranteed_no_evict_never_preempts(report):
    """The same small pool under the guaranteed_no_evict policy: no preemption, the same outputs."""
    assert report["no_evict_preemptions"] == 0
    assert report["no_evict"] == report["alone"]
    free, total = report["no_evict_free_blocks"]
    assert free == total


def test_prefix_reuse_reports_cached_tokens(report):
    cached = {int(i): n for i, n in report["cached_tokens"].items()}
    sharers = [i for i in range(50) if i % 5 == 0]
    assert cached[sharers[0]] == 0
    assert any(cached[i] > 0 for i in sharers[1:])
    assert all(n % 16 == 0 for n in cached.values())


def test_cancel_frees_blocks(report):
    reasons = {int(i): r for i, r in report["cancelled"].items()}
    for i, after in ((1, 2), (4, 1), (7, 3)):
        assert reasons[i][0] == "cancelled" and reasons[i][1] >= after
    others = [i for i in reasons if i not in (1, 4, 7)]
    assert all(reasons[i][0] == "length" for i in others)
    for i in others:
        assert report["cancel_outputs"][str(i)] == report["alone"][str(i)]
    free, total = report["cancel_free_blocks"]
    assert free == total


def test_streaming_yields_every_token_in_order(report):
    got = [[], []]
    finished = [False, False]
    for index, tokens, done in report["stream"]:
        assert not finished[index]
        got[index] += tokens
        finished[index] = done
    assert finished == [True, True]
    assert got == report["stream_ref"]
