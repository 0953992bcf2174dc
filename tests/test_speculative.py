"""Speculative decoding (runtime/speculative.py): the drafts' lookup and acceptance, and end to end the same tokens as
plain decoding, greedy and sampled, with drafts that are right, wrong or right in part, across stops, logits
processing and log-probabilities, a short token budget, preemption, cancellation, misses, the piecewise graphs'
path, and tp=2 and pp=2 under mpirun."""

from __future__ import annotations

import json

import pytest
from conftest import PROMPTS, convert_and_build, run_dist

from dist_llm.errors import DistLLMError
from dist_llm.runtime.block_manager import BlockManager
from dist_llm.runtime.speculative import SpeculativeConfig, accept, ngram_draft

REPEATS = ["one two three one two three one two three one two", "a b c d e a b c d e a b"]
ALL = PROMPTS + REPEATS


@pytest.fixture(scope="module")
def engine(tiny_models, tmp_path_factory) -> str:
    return convert_and_build(tiny_models["llama"], tmp_path_factory.mktemp("spec"), 1, 1)


@pytest.fixture(scope="module")
def engine_small_budget(tiny_models, tmp_path_factory) -> str:
    """A step of 24 tokens at most: drafts must be cut to fit beside the other requests."""
    return convert_and_build(tiny_models["llama"], tmp_path_factory.mktemp("spec_budget"), 1, 1, max_num_tokens=24,
                             max_input_len=24)


def test_ngram_draft():
    assert ngram_draft([1, 2, 3, 4, 1, 2, 3], 3, 1, 4) == [4, 1, 2]  # the longest suffix that occurs (1 2 3)
    assert ngram_draft([1, 2, 3, 4, 1, 2, 3], 9, 1, 4) == [4, 1, 2, 3]  # up to the end
    assert ngram_draft([7, 8, 1, 5, 9, 1], 2, 1, 4) == [5, 9]  # only n = 1 occurs
    assert ngram_draft([1, 9, 1, 8, 1], 1, 1, 1) == [8]  # the most recent occurrence
    assert ngram_draft([5, 5, 5], 4, 1, 4) == [5]
    assert ngram_draft([1, 2, 3], 4, 1, 4) == [] and ngram_draft([4], 4, 1, 4) == []
    assert ngram_draft([1, 2, 3, 1, 2], 2, 3, 4) == []  # no suffix of 3 or more occurs before
    assert ngram_draft([256, 1, 0, 0, 1], 2, 1, 1) == [0, 0]  # a byte match inside token 256 is not a token match
    assert ngram_draft([70000, 3, 70000], 1, 1, 1) == [3]  # ids beyond 16 bits


def test_accept():
    assert accept([4, 1, 2], [4, 1, 2, 7]) == [4, 1, 2, 7]  # all drafts, and the token after them
    assert accept([4, 1, 2], [4, 1, 9, 7]) == [4, 1, 9]
    assert accept([4], [3, 0]) == [3]


def test_config_is_checked():
    with pytest.raises(DistLLMError, match="num_speculative_tokens must be in 1..16"):
        SpeculativeConfig(num_speculative_tokens=0)
    with pytest.raises(DistLLMError, match="prompt_lookup_min"):
        SpeculativeConfig(prompt_lookup_min=3, prompt_lookup_max=2)
    with pytest.raises(DistLLMError, match="unknown speculative decoding method 'medusa'"):
        SpeculativeConfig(method="medusa")


class Seq:
    def __init__(self, tokens):
        self.token_ids, self.block_table, self.num_cached_tokens = list(tokens), [], 0


def test_block_manager_trim_gives_back_the_newest_blocks():
    bm = BlockManager(num_blocks=6, block_size=4)
    s = Seq(range(6))
    bm.allocate(s)
    bm.commit(s, 6)
    s.token_ids += [9] * 7  # drafts: 13 tokens, 4 blocks
    bm.append_slot(s)
    assert len(s.block_table) == 4 and bm.num_free_blocks == 2
    del s.token_ids[9:]  # 9 kept: 3 blocks
    bm.commit(s, 8)
    bm.trim(s)
    assert len(s.block_table) == 3 and bm.num_free_blocks == 3
    bm.check_invariants()
    bm.free(s)
    assert bm.num_free_blocks == 6
    bm.check_invariants()


def _generate(engine, prompts, spec=None, oracle=None, **kw):
    """Outputs and stats; `oracle(seq) -> drafts` replaces the n-gram proposer (drafts of known quality)."""
    from dist_llm.parallel.state import destroy
    from dist_llm.runtime import ModelRunner

    opts = {k: kw.pop(k) for k in ("cuda_graphs", "num_kv_blocks") if k in kw}
    try:
        runner = ModelRunner.from_dir(engine, device="cpu", speculative_config=spec, **opts)
        if oracle is not None:
            runner.executor.scheduler.propose = oracle
        outs = runner.generate(input_texts=prompts, **kw)
        stats = runner.executor.stats()
        runner.shutdown()
    finally:
        destroy()
    return outs, stats


def _oracle(truth: dict[tuple, list[int]], k: int, wrong_at=None):
    """Drafts from the known greedy continuation of each prompt: the next k tokens, with the one at index
    `wrong_at(seq)` changed (None: all right)."""
    def propose(seq):
        key = tuple(seq.token_ids[: seq.prompt_len])
        done = len(seq) - seq.prompt_len
        drafts = list(truth[key][done : done + k])
        j = wrong_at(seq) if wrong_at else None
        if j is not None and j < len(drafts):
            drafts[j] = (drafts[j] + 1) % 100
        return drafts
    return propose


@pytest.fixture(scope="module")
def baseline(engine):
    outs, stats = _generate(engine, ALL, max_new_tokens=30, end_id=-1)
    return {tuple(o.prompt_token_ids): o.output_token_ids for o in outs}, [o.output_token_ids for o in outs], stats


@pytest.mark.parametrize("graphs", ["off", "static"])
def test_ngram_gives_the_greedy_tokens(engine, graphs):
    plain, plain_stats = _generate(engine, ALL, max_new_tokens=100, end_id=-1)
    outs, stats = _generate(engine, ALL, SpeculativeConfig(num_speculative_tokens=4), cuda_graphs=graphs,
                            max_new_tokens=100, end_id=-1)
    assert [o.output_token_ids for o in outs] == [o.output_token_ids for o in plain]
    # the random model's outputs repeat now and then, and the lookup finds it
    assert stats.num_draft_tokens > 0 and stats.num_accepted_tokens > 0
    assert stats.iteration <= plain_stats.iteration  # (drafting requests never split the batch in two)
    assert stats.kv.used_num_blocks == 0


@pytest.mark.parametrize("graphs", ["off", "static"])
def test_drafts_right_wrong_and_in_part(engine, baseline, graphs):
    truth, expected, plain = baseline
    spec = SpeculativeConfig(num_speculative_tokens=5)
    right, stats_right = _generate(engine, ALL, spec, _oracle(truth, 5), cuda_graphs=graphs, max_new_tokens=30,
                                   end_id=-1)
    assert [o.output_token_ids for o in right] == expected
    assert stats_right.num_accepted_tokens == stats_right.num_draft_tokens > 0
    assert stats_right.iteration < plain.iteration / 3  # up to 6 tokens a step
    # wrong at a place that moves with the length: every acceptance length from 0 to 4 happens
    part, stats_part = _generate(engine, ALL, spec, _oracle(truth, 5, lambda s: len(s) % 6), cuda_graphs=graphs,
                                 max_new_tokens=30, end_id=-1)
    assert [o.output_token_ids for o in part] == expected
    assert 0 < stats_part.num_accepted_tokens < stats_part.num_draft_tokens
    wrong, stats_wrong = _generate(engine, ALL, spec, _oracle(truth, 5, lambda s: 0), max_new_tokens=30, end_id=-1)
    assert [o.output_token_ids for o in wrong] == expected and stats_wrong.num_accepted_tokens == 0


def test_stops_inside_accepted_drafts(engine, baseline):
    """A stop token, a stop string and max_new_tokens that fall among right drafts end the output where plain
    decoding ends it."""
    truth, expected, _ = baseline
    spec = SpeculativeConfig(num_speculative_tokens=6)
    stop_id = expected[1][7]
    for kw in (dict(stop_token_ids=[stop_id]), dict(max_new_tokens=11), dict(stop=["e"])):
        kw = {"max_new_tokens": 30, "end_id": -1, **kw}
        plain, _ = _generate(engine, ALL, **kw)
        fast, stats = _generate(engine, ALL, spec, _oracle(truth, 6), **kw)
        assert [(o.output_token_ids, o.output_text, o.finish_reason) for o in fast] == \
            [(o.output_token_ids, o.output_text, o.finish_reason) for o in plain], kw
        assert stats.num_accepted_tokens > 0 and stats.kv.used_num_blocks == 0


@pytest.mark.parametrize("graphs", ["off", "static"])
def test_sampled_requests_draw_what_plain_sampling_draws(engine, graphs):
    """Seeded sampling (temperature, top-k, top-p, min-p) with drafts from its own plain run, right or wrong at a
    moving place: token for token the plain run's, with drafts kept."""
    sampling = dict(temperature=0.9, top_k=40, top_p=0.95, min_p=0.02, seed=11, max_new_tokens=30, end_id=-1)
    plain, _ = _generate(engine, ALL, **sampling)
    truth = {tuple(o.prompt_token_ids): o.output_token_ids for o in plain}
    assert len({tuple(o.output_token_ids) for o in plain}) == len(ALL)
    for wrong_at in (None, lambda s: len(s) % 4):
        fast, stats = _generate(engine, ALL, SpeculativeConfig(num_speculative_tokens=3), _oracle(truth, 3, wrong_at),
                                cuda_graphs=graphs, **sampling)
        assert [o.output_token_ids for o in fast] == [o.output_token_ids for o in plain]
        assert stats.num_accepted_tokens > 0
        if wrong_at is None:
            assert stats.num_accepted_tokens == stats.num_draft_tokens


def test_logits_processing_and_logprobs_with_drafts(engine):
    """Penalties, min_tokens with a stop token, bad words, logit_bias, log-probabilities and prompt log-probabilities,
    each beside the others in the same steps, with drafts from their own plain runs (right, or wrong at a moving
    place): the plain runs' tokens and log-probabilities, with drafts kept where a request may draft."""
    from dist_llm.parallel.state import destroy
    from dist_llm.runtime import ModelRunner
    from dist_llm.runtime.sequence import SamplingParams, Sequence

    asks = [dict(repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.4),
            dict(min_tokens=12, logit_bias={1: 100.0}),  # EOS (end_id 1) as soon as min_tokens allows
            dict(bad_words_ids=[[7], [3, 9]], logit_bias={5: 2.0, 11: -1.0}),
            dict(return_logprobs=True, top_logprobs=3), dict(temperature=0.8, seed=5, repetition_penalty=1.2),
            dict(prompt_logprobs=True), dict()]

    def run(spec=None, truth=None, wrong_at=None):
        try:
            runner = ModelRunner.from_dir(engine, device="cpu", speculative_config=spec)
            ex = runner.executor
            prompts = runner.tokenize(ALL)
            seqs = [Sequence(p, SamplingParams(max_new_tokens=24, end_id=1 if "min_tokens" in a else -1, **a))
                    for a in asks for p in prompts]
            if truth is not None:
                by_seq = {id(s): t for s, t in zip(seqs, truth)}

                def propose(seq):
                    if not can_draft(seq):
                        return []
                    done = len(seq) - seq.prompt_len
                    drafts = list(by_seq[id(seq)][done : done + 4])
                    j = wrong_at(seq) if wrong_at else None
                    if j is not None and j < len(drafts):
                        drafts[j] = (drafts[j] + 1) % 100
                    return drafts
                ex.scheduler.propose = propose
            for seq in seqs:  # all at once: every kind of request shares steps with the others
                ex.enqueue(seq)
            while ex.has_unfinished():
                ex.step()
            stats = ex.stats()
            runner.shutdown()
        finally:
            destroy()
        return seqs, stats

    from dist_llm.runtime.speculative import can_draft

    plain, _ = run()
    truth = [s.output_token_ids for s in plain]
    assert all(len(s.output_token_ids) == 13 and s.finish_reason == "stop" for s in plain[len(ALL) : 2 * len(ALL)])
    for wrong_at in (None, lambda s: len(s) % 5):
        fast, stats = run(SpeculativeConfig(num_speculative_tokens=4), truth, wrong_at)
        assert [s.output_token_ids for s in fast] == truth
        assert [s.finish_reason for s in fast] == [s.finish_reason for s in plain]
        assert stats.num_accepted_tokens > 0
        for a, b in zip(plain, fast):
            assert b.logprobs == pytest.approx(a.logprobs, abs=1e-4) and len(b.logprobs) == len(a.logprobs)
            ids = [[[t for t, _ in step] for step in x.top_logprobs] for x in (a, b)]
            assert ids[0] == ids[1]
            assert b.prompt_logprobs == pytest.approx(a.prompt_logprobs, abs=1e-4)
        if wrong_at is None:  # every request but the prompt_logprobs ones kept all its drafts
            assert stats.num_accepted_tokens == stats.num_draft_tokens


def test_short_token_budget_and_small_pool(engine, engine_small_budget, baseline):
    truth, _, _ = baseline
    spec = SpeculativeConfig(num_speculative_tokens=8)
    for eng, kw in ((engine_small_budget, {}), (engine, dict(num_kv_blocks=7))):
        kw = {**kw, "max_new_tokens": 30, "end_id": -1}
        prompts = ALL if eng is engine else [p[:60] for p in ALL]
        plain, plain_stats = _generate(eng, prompts, **kw)
        expected = {tuple(o.prompt_token_ids): o.output_token_ids for o in plain}
        fast, stats = _generate(eng, prompts, spec, _oracle(expected, 8), **kw)
        assert [o.output_token_ids for o in fast] == [o.output_token_ids for o in plain]
        assert stats.num_accepted_tokens > 0 and stats.kv.used_num_blocks == 0
        if "num_kv_blocks" in kw:
            assert stats.num_preemptions > 0


def test_cancel_while_drafts_are_in_flight(engine, baseline):
    from dist_llm.parallel.state import destroy
    from dist_llm.runtime import ModelRunner
    from dist_llm.runtime.sequence import SamplingParams, Sequence

    truth, _, _ = baseline
    try:
        runner = ModelRunner.from_dir(engine, device="cpu", speculative_config=SpeculativeConfig())
        runner.executor.scheduler.propose = _oracle(truth, 4, lambda s: 0)  # (wrong: left in, they would show)
        ex = runner.executor
        prompt = runner.tokenize([ALL[0]])[0]
        seq = Sequence(prompt, SamplingParams(max_new_tokens=30, end_id=-1))
        complete, cancelled_with = ex._complete, []

        def cancel_then_complete(done, result):  # the request is cancelled while its drafting step is in flight
            if seq.num_drafts and not cancelled_with:
                cancelled_with.append(seq.num_drafts)
                ex.cancel(seq.request_id)
            return complete(done, result)

        ex._complete = cancel_then_complete
        ex.enqueue(seq)
        for _ in range(100):
            if not ex.has_unfinished():
                break
            ex.step()
        free, total = ex.block_manager.num_free_blocks, ex.block_manager.num_blocks
        runner.shutdown()
    finally:
        destroy()
    assert cancelled_with and seq.finish_reason == "cancelled" and free == total
    assert seq.output_token_ids == truth[tuple(prompt)][: len(seq.output_token_ids)]  # no draft left in it


def test_misses_back_off_to_overlapped_decoding(engine, baseline, monkeypatch):
    """When lookups find nothing, the request decodes 1, 2, 4, 8, 8, ... plain steps between lookups, overlapped."""
    import dist_llm.runtime.executor as executor_module

    _, expected, _ = baseline
    lookups = []
    monkeypatch.setattr(executor_module, "ngram_draft", lambda tokens, *a: lookups.append(len(tokens)) or [])
    from dist_llm.parallel.state import destroy
    from dist_llm.runtime import ModelRunner

    try:
        runner = ModelRunner.from_dir(engine, device="cpu", speculative_config=SpeculativeConfig())
        out = runner.generate(input_texts=ALL[:1], max_new_tokens=30, end_id=-1)[0]
        inflight = runner.executor.max_inflight_seen
        runner.shutdown()
    finally:
        destroy()
    assert out.output_token_ids == expected[0]
    assert inflight == 2  # the plain steps between lookups overlap
    prompt_len = len(out.prompt_token_ids)
    # lookups after outputs 1, 3, 6, 11 and 20 (each miss skips 1, 2, 4, 8 steps; at 29 no draft fits in 30)
    assert [n - prompt_len for n in lookups] == [1, 3, 6, 11, 20]


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_under_mpirun(tiny_models, tmp_path_factory, tp, pp):
    root = tmp_path_factory.mktemp(f"spec_tp{tp}_pp{pp}")
    eng = convert_and_build(tiny_models["llama"], root, tp, pp)
    base = ["--engine_dir", eng, "--input_text", *ALL, "--max_new_tokens", "100", "--end_id", "-1", "--output_json"]
    plain, fast = root / "plain.json", root / "fast.json"
    run_dist(tp * pp, [*base, str(plain)])
    proc = run_dist(tp * pp, [*base, str(fast), "--speculative_method", "ngram", "--num_speculative_tokens", "4",
                              "--log_stats_interval", "1000"])
    tokens = [[o["output_token_ids"] for o in json.loads(p.read_text())] for p in (plain, fast)]
    assert tokens[0] == tokens[1]
    line = next(x for x in (proc.stdout + proc.stderr).splitlines() if "Draft acceptance rate" in x)
    assert "Draft acceptance rate: 0.0%" not in line


@pytest.mark.gpu
def test_captured_piecewise_graphs_on_gpu(engine, tiny_models):
    """On a GPU, drafting steps replay the piecewise graphs (sampled rows sized by tokens): the same tokens."""
    from dist_llm.parallel.state import destroy
    from dist_llm.runtime import ModelRunner

    def go(spec, oracle=None):
        try:
            runner = ModelRunner.from_dir(engine, device="cuda", cuda_graphs="on", speculative_config=spec)
            if oracle is not None:
                runner.executor.scheduler.propose = oracle
            outs = runner.generate(input_texts=ALL, max_new_tokens=30, end_id=-1)
            stats, steps = runner.executor.stats(), runner.executor.worker.piecewise_runner.steps_run
            runner.shutdown()
        finally:
            destroy()
        return outs, stats, steps

    plain, _, _ = go(None)
    truth = {tuple(o.prompt_token_ids): o.output_token_ids for o in plain}
    for wrong_at in (None, lambda s: len(s) % 6):
        fast, stats, steps = go(SpeculativeConfig(num_speculative_tokens=5), _oracle(truth, 5, wrong_at))
        assert [o.output_token_ids for o in fast] == [o.output_token_ids for o in plain]
        assert stats.num_accepted_tokens > 0 and steps > 2
