"""Speculative decoding with a draft model (runtime/draft_model.py): the same tokens as plain decoding, greedy and
seeded sampling, with a draft that is the target itself (every draft kept) and one that is another model (few
kept); the draft's KV kept across steps where its drafts were kept; a small draft pool; requests that finish, stop
or are cancelled give their draft state back; the errors that name a bad draft engine; tp=2 and pp=2 under mpirun
with the draft whole on rank 0."""

from __future__ import annotations

import json

import pytest
from conftest import PROMPTS, convert_and_build, run_dist

from dist_llm.errors import DistLLMError
from dist_llm.runtime.speculative import SpeculativeConfig

REPEATS = ["one two three one two three one two three one two", "a b c d e a b c d e a b"]
ALL = PROMPTS + REPEATS


@pytest.fixture(scope="module")
def engines(tiny_models, tmp_path_factory) -> dict[str, str]:
    """The target (tiny Llama), the same model as a draft, another model of the same vocabulary (the tiny
    Mistral, with blocks of 32 tokens where the target's have 16), and that one with a small pool (2 sequences of
    256 tokens) and 8 tokens a forward."""
    root = tmp_path_factory.mktemp("draft")
    return {
        "target": convert_and_build(tiny_models["llama"], root / "target", 1, 1),
        "self": convert_and_build(tiny_models["llama"], root / "self", 1, 1, max_batch_size=4),
        "other": convert_and_build(tiny_models["mistral"], root / "other", 1, 1, tokens_per_block=32),
        "small": convert_and_build(tiny_models["mistral"], root / "small", 1, 1, max_batch_size=2, max_num_tokens=8,
                                   max_input_len=8),
    }


def _generate(engine, prompts, spec=None, cuda_graphs="off", num_kv_blocks=None, **kw):
    from dist_llm.parallel.state import destroy
    from dist_llm.runtime import ModelRunner

    try:
        runner = ModelRunner.from_dir(engine, device="cpu", speculative_config=spec, cuda_graphs=cuda_graphs,
                                      num_kv_blocks=num_kv_blocks)
        outs = runner.generate(input_texts=prompts, **kw)
        ex = runner.executor
        stats, drafter = ex.stats(), ex.drafter
        work = None if drafter is None else (drafter.forwards, drafter.tokens_computed, len(drafter.states),
                                             drafter.block_manager.num_used_blocks, drafter.num_short,
                                             drafter.block_manager.reused_blocks)
        runner.shutdown()
    finally:
        destroy()
    return outs, stats, work


def _spec(engines, name, k=4):
    return SpeculativeConfig("draft_model", num_speculative_tokens=k, draft_engine_dir=engines[name])


@pytest.fixture(scope="module")
def plain(engines):
    outs, stats, _ = _generate(engines["target"], ALL, max_new_tokens=40, end_id=-1)
    return [o.output_token_ids for o in outs], stats


@pytest.mark.parametrize("graphs", ["off", "static"])
def test_the_target_as_its_own_draft_keeps_every_draft(engines, plain, graphs):
    expected, plain_stats = plain
    outs, stats, (forwards, tokens, states, used, _, _) = _generate(engines["target"], ALL, _spec(engines, "self", 5),
                                                              cuda_graphs=graphs, max_new_tokens=40, end_id=-1)
    assert [o.output_token_ids for o in outs] == expected
    assert stats.num_draft_tokens > 0 and stats.num_accepted_tokens == stats.num_draft_tokens
    assert stats.iteration < plain_stats.iteration / 3  # up to 6 tokens a step
    assert stats.mean_acceptance_length > 4 and stats.acceptance_per_position[0] == 1.0
    assert stats.num_accepted_tokens == sum(stats.accepted_per_position)
    # every draft kept: after the prompt, a step's draft computes only its last draft and the target's own token
    # (the drafts it fed itself before are the tokens now), then feeds itself 4 drafts
    prompt_tokens = sum(len(o.prompt_token_ids) for o in outs)
    assert tokens <= prompt_tokens + 6 * stats.num_draft_tokens // 5 + 2 * len(ALL)
    assert states == 0 and used == 0  # finished requests gave their draft state back


@pytest.mark.parametrize("graphs", ["off", "static"])
def test_another_model_as_draft_gives_the_same_tokens(engines, plain, graphs):
    expected, _ = plain
    outs, stats, _ = _generate(engines["target"], ALL, _spec(engines, "other"), cuda_graphs=graphs, max_new_tokens=40,
                               end_id=-1)
    assert [o.output_token_ids for o in outs] == expected
    assert stats.num_draft_tokens > 0 and stats.num_accepted_tokens < stats.num_draft_tokens
    assert stats.kv.used_num_blocks == 0
    # a step that keeps no draft does not make the request back off (as n-gram misses do): each of its 39 tokens
    # after the first comes from a drafting step but the last one or two (no room for a draft)
    assert stats.num_drafting_steps + stats.num_accepted_tokens >= len(ALL) * 37


def test_sampled_and_stopped_requests(engines):
    """Seeded sampling (temperature, top-k, top-p, min-p): plain sampling's tokens, with the target as draft (its
    drafts draw with the request's own noise, so the target keeps them all) and with another model; a stop string
    and max_new_tokens that fall among kept drafts end where plain decoding ends."""
    target = engines["target"]
    sampling = dict(temperature=0.8, top_k=40, top_p=0.95, min_p=0.02, seed=3, max_new_tokens=30, end_id=-1)
    for draft, kw in (("self", sampling), ("other", sampling), ("self", dict(max_new_tokens=11, end_id=-1)),
                      ("self", dict(stop=["e"], max_new_tokens=30, end_id=-1))):
        base, _, _ = _generate(target, ALL, **kw)
        fast, stats, work = _generate(target, ALL, _spec(engines, draft, 6), **kw)
        assert [(o.output_token_ids, o.output_text, o.finish_reason) for o in fast] == \
            [(o.output_token_ids, o.output_text, o.finish_reason) for o in base], kw
        assert stats.num_accepted_tokens > 0 and work[2:4] == (0, 0)
        if draft == "self":
            assert stats.num_accepted_tokens == stats.num_draft_tokens
        else:
            assert stats.num_accepted_tokens < stats.num_draft_tokens


def test_n_sequences_a_prompt(engines):
    """n = 3 sampled sequences a prompt: each drafts for itself (its own seed), the draft's prefix cache serves the
    later ones the prompt's blocks, and the tokens are plain sampling's."""
    kw = dict(n=3, temperature=0.9, seed=7, max_new_tokens=30, end_id=-1)
    base, _, _ = _generate(engines["target"], ALL, **kw)
    fast, stats, work = _generate(engines["target"], ALL, _spec(engines, "self", 4), **kw)
    assert [o.output_token_ids for o in fast] == [o.output_token_ids for o in base]
    assert len({tuple(o.output_token_ids) for o in fast}) == len(fast) == 3 * len(ALL)
    assert stats.num_accepted_tokens == stats.num_draft_tokens > 0 and work[2:4] == (0, 0)
    assert work[5] > 0  # (prompt blocks the draft's prefix cache served)


def test_small_draft_pool_and_budget_and_small_target_pool(engines, plain):
    """A draft pool of 512 tokens and 8 tokens a forward (prompts caught up over several forwards, drafts in
    batches of two, states dropped and requests left undrafted when its pool is short), then a target pool small
    enough to preempt."""
    expected, _ = plain
    kw = dict(max_new_tokens=110, end_id=-1)
    base, _, _ = _generate(engines["target"], ALL, **kw)
    outs, stats, (_, _, states, used, short, _) = _generate(engines["target"], ALL, _spec(engines, "small", 3), **kw)
    assert [o.output_token_ids for o in outs] == [o.output_token_ids for o in base] and stats.num_draft_tokens > 0
    assert short > 0 and states == 0 and used == 0
    outs, stats, _ = _generate(engines["target"], ALL, _spec(engines, "self", 4), num_kv_blocks=7, max_new_tokens=40,
                               end_id=-1)
    assert [o.output_token_ids for o in outs] == expected
    assert stats.num_preemptions > 0 and stats.num_accepted_tokens > 0


def test_cancel_gives_the_draft_state_back(engines):
    from dist_llm.parallel.state import destroy
    from dist_llm.runtime import ModelRunner
    from dist_llm.runtime.sequence import SamplingParams, Sequence

    try:
        runner = ModelRunner.from_dir(engines["target"], device="cpu", speculative_config=_spec(engines, "self"))
        ex = runner.executor
        seqs = [Sequence(p, SamplingParams(max_new_tokens=60, end_id=-1)) for p in runner.tokenize(ALL)]
        for s in seqs:
            ex.enqueue(s)
        for _ in range(3):
            ex.step()
        held = len(ex.drafter.states)
        for s in seqs:
            ex.cancel(s.request_id)
        while ex.has_unfinished():
            ex.step()
        ex.enqueue(Sequence(seqs[0].token_ids[: seqs[0].prompt_len], SamplingParams(max_new_tokens=2)))
        while ex.has_unfinished():
            ex.step()
        states, used = len(ex.drafter.states), ex.drafter.block_manager.num_used_blocks
        runner.shutdown()
    finally:
        destroy()
    assert held == len(ALL) and states == 0 and used == 0


def test_bad_draft_engines_are_named(engines, tiny_models, tmp_path):
    target = engines["target"]
    cases = [
        (convert_and_build(tiny_models["llama"], tmp_path / "tp2", 2, 1), "tp_size 2 and pp_size 1.*--tp_size 1"),
        (convert_and_build(tiny_models["llama"], tmp_path / "short", 1, 1, max_seq_len=128),
         r"max_seq_len \(128.*rebuild the draft with --max_seq_len 256"),
        (str(tmp_path / "nowhere"), "no draft engine at"),
    ]
    for draft, message in cases:
        with pytest.raises(DistLLMError, match=message):
            _generate(target, ALL[:1], SpeculativeConfig("draft_model", draft_engine_dir=draft), max_new_tokens=2)
    with pytest.raises(DistLLMError, match="--draft_engine_dir goes with --speculative_method draft_model"):
        SpeculativeConfig("draft_model")
    with pytest.raises(DistLLMError, match="--draft_engine_dir goes with"):
        SpeculativeConfig("ngram", draft_engine_dir=target)


def test_vocabulary_mismatch_is_named(engines, tmp_path):
    from dist_llm.config import EngineConfig

    cfg = EngineConfig.load(engines["other"]).to_dict()
    cfg["model"]["vocab_size"] += 1
    bad = tmp_path / "vocab"
    bad.mkdir()
    (bad / "engine.json").write_text(json.dumps({**cfg, "weights": "dummy"}))
    with pytest.raises(DistLLMError, match="vocabulary .* differs from the target's"):
        _generate(engines["target"], ALL[:1], SpeculativeConfig("draft_model", draft_engine_dir=str(bad)),
                  max_new_tokens=2)


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_under_mpirun(engines, tiny_models, tmp_path_factory, tp, pp):
    root = tmp_path_factory.mktemp(f"draft_tp{tp}_pp{pp}")
    eng = convert_and_build(tiny_models["llama"], root, tp, pp)
    base = ["--engine_dir", eng, "--input_text", *ALL, "--max_new_tokens", "40", "--end_id", "-1", "--output_json"]
    plain, fast = root / "plain.json", root / "fast.json"
    run_dist(tp * pp, [*base, str(plain)])
    proc = run_dist(tp * pp, [*base, str(fast), "--speculative_method", "draft_model", "--draft_engine_dir",
                              engines["self"], "--num_speculative_tokens", "3", "--log_stats_interval", "1000"])
    tokens = [[o["output_token_ids"] for o in json.loads(p.read_text())] for p in (plain, fast)]
    assert tokens[0] == tokens[1]
    line = next(x for x in (proc.stdout + proc.stderr).splitlines() if "Draft acceptance rate" in x)
    assert "Draft acceptance rate: 100.0%" in line and "Per-position acceptance rate: 1.00, 1.00" in line


@pytest.mark.gpu
def test_captured_graphs_on_gpu(engines):
    """On a GPU the draft's decode steps replay its CUDA graphs, each reading the draft before it on the device:
    the target's own tokens on the GPU, with the drafts kept when the target drafts for itself."""
    from dist_llm.parallel.state import destroy
    from dist_llm.runtime import ModelRunner

    def go(spec):
        try:
            runner = ModelRunner.from_dir(engines["target"], device="cuda", cuda_graphs="on", speculative_config=spec)
            outs = runner.generate(input_texts=ALL, max_new_tokens=40, end_id=-1)
            ex = runner.executor
            replays = ex.drafter.worker.graph_runner.steps_run if ex.drafter else 0
            stats = ex.stats()
            runner.shutdown()
        finally:
            destroy()
        return [o.output_token_ids for o in outs], stats, replays

    expected, _, _ = go(None)
    for name in ("self", "other"):
        tokens, stats, replays = go(_spec(engines, name))
        assert tokens == expected, name
        assert replays > 0 and stats.num_draft_tokens > 0
        if name == "self":  # (the draft's decode kernels and the target's chunk kernels may part on a near-tie)
            assert stats.num_accepted_tokens >= 0.95 * stats.num_draft_tokens


def test_disable_by_batch_size(engines):
    """With speculative_disable_by_batch_size 2, requests draft only while at most two run; before that the steps
    overlap as without speculation. The tokens are plain decoding's either way."""
    from dist_llm.parallel.state import destroy
    from dist_llm.runtime import ModelRunner
    from dist_llm.runtime.sequence import SamplingParams, Sequence

    def run(spec):
        try:
            runner = ModelRunner.from_dir(engines["target"], device="cpu", speculative_config=spec)
            ex, running_when_drafting = runner.executor, []
            if ex.drafter is not None:
                propose = ex.drafter.propose
                ex.drafter.propose = lambda seqs, ks: running_when_drafting.append(len(ex.scheduler.running)) or \
                    propose(seqs, ks)
            seqs = [Sequence(p, SamplingParams(max_new_tokens=10 + 8 * i, end_id=-1))
                    for i, p in enumerate(runner.tokenize(ALL))]
            for s in seqs:
                ex.enqueue(s)
            while ex.has_unfinished():
                ex.step()
            stats, overlapped = ex.stats(), ex.max_inflight_seen
            runner.shutdown()
        finally:
            destroy()
        return [s.output_token_ids for s in seqs], stats, overlapped, running_when_drafting

    plain, _, _, _ = run(None)
    spec = SpeculativeConfig("draft_model", num_speculative_tokens=3, draft_engine_dir=engines["self"],
                             disable_by_batch_size=2)
    tokens, stats, overlapped, running = run(spec)
    assert tokens == plain and stats.num_accepted_tokens > 0
    assert running and max(running) <= 2 and overlapped == 2
    with pytest.raises(DistLLMError, match="speculative_disable_by_batch_size must be an integer >= 1"):
        SpeculativeConfig(disable_by_batch_size=0)
