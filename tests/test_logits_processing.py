"""logit_bias, min_tokens and the repetition, presence and frequency penalties (runtime/logits_processing.py):
the device function against a per-row loop, the host's inputs, and greedy generation against transformers'
`generate` with the same settings (its own processors, and OpenAI's penalties as a LogitsProcessor), in
process and under mpirun at tp=2 × pp=2."""

from __future__ import annotations

import json
import math
import os

import torch

if not torch.cuda.is_available():  # fill_pending's Triton kernel, through the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from conftest import PROMPTS, convert_and_build, run_dist  # noqa: E402
from test_features import in_process  # noqa: E402

from dist_llm.errors import DistLLMError  # noqa: E402
from dist_llm.kernels import get_ops  # noqa: E402
from dist_llm.runtime.logits_processing import apply_logits_processing, build_logits_inputs  # noqa: E402
from dist_llm.runtime.sequence import PENDING, SamplingParams, Sequence  # noqa: E402

N = 24
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def engine_1(tiny_models, tmp_path_factory) -> str:
    return convert_and_build(tiny_models["llama"], tmp_path_factory.mktemp("lp_engine1"), 1, 1)


# ---- the device function ------------------------------------------------------------------------


def loop_reference(logits, rows):
    """One row at a time, in the documented order; `rows[r]` = (prompt, output, params) or None (untouched)."""
    x = logits.float().clone()
    for r, row in enumerate(rows):
        if row is None:
            continue
        prompt, output, p, stops = row
        for t, b in p.logit_bias.items():
            x[r, t] += b
        if len(output) < p.min_tokens:
            for t in stops:
                x[r, t] = -math.inf
        for t in set(prompt + output):
            v = x[r, t]
            x[r, t] = v / p.repetition_penalty if v > 0 else v * p.repetition_penalty
        for t in set(output):
            x[r, t] -= p.frequency_penalty * output.count(t) + p.presence_penalty
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_processing_matches_a_loop_over_rows(dtype, backend):
    """Odd shapes, a PENDING last token filled from the previous step's ids, rows without processing untouched."""
    gen = torch.Generator().manual_seed(0)
    vocab, bsz = 37, 5
    logits = (torch.randn(bsz, vocab, generator=gen) * 3).to(dtype)
    sampled = torch.tensor([11, 4, 29, 8, 30], dtype=torch.int64)  # the previous step's ids, by its rows
    params = [
        SamplingParams(max_new_tokens=9, repetition_penalty=1.7, presence_penalty=0.5, frequency_penalty=0.3),
        None,  # no processing
        SamplingParams(max_new_tokens=9, logit_bias={3: 2.5, 36: -1.25}, min_tokens=6),
        SamplingParams(max_new_tokens=9, repetition_penalty=0.6, frequency_penalty=-1.5, logit_bias={0: 1.0}),
        SamplingParams(max_new_tokens=9, presence_penalty=-2.0, min_tokens=5),
    ]
    prompts = [[1, 2, 3, 2], [5, 6], [7, 7, 8], [9, 10, 1], [12]]
    outputs = [[2, 5, 5, PENDING], [], [13, 14], [10, 10, 9, 10], [12, 12, 33, PENDING]]
    feeds = [2, None, None, None, 0]  # rows of the previous step holding the PENDING tokens
    seqs, rows = [], []
    for prompt, output, p, feed in zip(prompts, outputs, params, feeds):
        s = Sequence(prompt, p or SamplingParams(max_new_tokens=9))
        s.token_ids += output
        s.num_computed_tokens, s.feed = len(s) - 1, None if feed is None else (0, feed)  # a decode row each
        seqs.append(s)
    stops = {14, 20}
    li = build_logits_inputs(seqs, [1] * len(seqs), lambda seq: stops)
    for (prompt, output, p), feed in zip(zip(prompts, outputs, params), feeds):
        filled = [int(sampled[feed]) if t == PENDING else t for t in output]
        rows.append(None if p is None else (prompt, filled, p, stops))
    want = loop_reference(logits, rows)
    ops = get_ops(backend)
    got = apply_logits_processing(logits.to(DEVICE), li.to(DEVICE), sampled.to(DEVICE), ops.fill_pending).cpu()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert torch.equal(got[1], logits[1].float())  # bit for bit
    assert got[2, 14] == -math.inf and got[4, 14] == -math.inf and got[2, 3] == logits[2, 3].float() + 2.5


def test_inputs_skip_rows_that_do_not_sample_and_end_bans_at_min_tokens():
    p = SamplingParams(max_new_tokens=8, min_tokens=2, repetition_penalty=1.25)
    chunk = Sequence([1, 2, 3, 4], p)  # a prompt chunk of 2 of its 4 tokens: no sample this step
    done = Sequence([5, 6], p)
    done.token_ids += [7, 8]  # two outputs already: min_tokens reached
    done.num_computed_tokens = 3
    li = build_logits_inputs([chunk, done], [2, 1], lambda seq: {0})  # (the chunk: tokens 0-1 of 4)
    assert li.bias_rows.tolist() == [] and li.seen_token_ids.tolist() == [5, 6, 7, 8]
    assert li.seen_lengths.tolist() == [0, 4] and li.seen_prompt_lens.tolist() == [0, 2]
    assert li.seen_feeds.tolist() == [-1, -1]
    assert li.penalties.tolist() == [[1.0, 0.0, 0.0], [1.25, 0.0, 0.0]]
    assert li.use_repetition and not li.use_output_penalties
    plain = Sequence([1, 2], SamplingParams(max_new_tokens=4))
    assert build_logits_inputs([plain], [2], lambda seq: {0}) is None
    # one output so far: the next token may not be a stop token yet
    early = Sequence([5, 6], SamplingParams(max_new_tokens=8, min_tokens=2))
    early.token_ids.append(PENDING)
    early.num_computed_tokens, early.feed = 2, (0, 4)
    li = build_logits_inputs([early], [1], lambda seq: {2, 0})
    assert li.bias_token_ids.tolist() == [0, 2] and li.bias_values.tolist() == [-math.inf, -math.inf]
    assert li.seen_token_ids.numel() == 0 and li.seen_feeds.tolist() == [-1]  # (no penalties: not needed)


@pytest.mark.parametrize("kw,match", [
    (dict(repetition_penalty=0.0), "repetition_penalty must be > 0"),
    (dict(presence_penalty=2.5), "presence_penalty must be in"),
    (dict(frequency_penalty=-3), "frequency_penalty must be in"),
    (dict(min_tokens=20), r"min_tokens must be in \[0, max_new_tokens = 16\]"),
    (dict(logit_bias={"x": 1}), "logit_bias must map token ids"),
    (dict(logit_bias={-1: 1.0}), "token ids must be >= 0"),
    (dict(logit_bias={3: float("nan")}), "biases finite"),
    (dict(top_logprobs=3), "top_logprobs needs return_logprobs=True"),
    (dict(return_logprobs=True, top_logprobs=21), r"top_logprobs must be in \[0, 20\]"),
    (dict(bad_words_ids=[[1], []]), "bad_words_ids must be a list of non-empty lists"),
    (dict(bad_words_ids=[3]), "bad_words_ids must be a list of non-empty lists"),
])
def test_bad_settings_are_named(kw, match):
    with pytest.raises(DistLLMError, match=match):
        SamplingParams(**kw)
    assert SamplingParams(logit_bias={"7": 2}).logit_bias == {7: 2.0}  # JSON's string keys


# ---- generation against transformers -----------------------------------------------------------


class OpenAIPenalties:
    """presence and frequency penalties over the generated tokens, as a transformers LogitsProcessor."""

    def __init__(self, prompt_len: int, presence: float, frequency: float):
        self.prompt_len, self.presence, self.frequency = prompt_len, presence, frequency

    def __call__(self, input_ids, scores):
        for b in range(scores.shape[0]):
            counts = torch.bincount(input_ids[b, self.prompt_len :], minlength=scores.shape[1]).to(scores.dtype)
            scores[b] -= self.frequency * counts + self.presence * (counts > 0).to(scores.dtype)
        return scores


def hf_generate(model, prompt, n, presence=0.0, frequency=0.0, logit_bias=None, eos=None, **kw):
    from transformers import LogitsProcessorList

    ids = torch.tensor([prompt])
    procs = LogitsProcessorList([OpenAIPenalties(ids.shape[1], presence, frequency)] if presence or frequency else [])
    bias = {(t,): b for t, b in (logit_bias or {}).items()} or None
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             eos_token_id=eos, pad_token_id=0, logits_processor=procs, sequence_bias=bias, **kw)
    return out[0, ids.shape[1] :].tolist()


@pytest.fixture(scope="module")
def hf_model(tiny_models):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float32).eval()


def test_greedy_with_processing_matches_transformers(engine_1, hf_model):
    """Each setting alone and all together, one prompt at a time; each changes the tokens (so the test can fail)."""
    cases = [
        dict(repetition_penalty=1.5),
        dict(repetition_penalty=0.7),
        dict(presence_penalty=1.5),
        dict(frequency_penalty=0.9),
        dict(presence_penalty=-1.0, frequency_penalty=-0.5),
        dict(logit_bias={17: 4.0, 101: 2.5}),
        dict(repetition_penalty=1.3, presence_penalty=0.4, frequency_penalty=0.6, logit_bias={17: 3.0}),
    ]
    with in_process(engine_1) as runner:
        prompts = runner.tokenize(PROMPTS)
        plain = [o.output_token_ids for o in runner.generate(batch_input_ids=prompts, max_new_tokens=N, end_id=-1)]
        for kw in cases:
            outs = runner.generate(batch_input_ids=prompts, max_new_tokens=N, end_id=-1, **kw)
            changed = False
            for prompt, base, o in zip(prompts, plain, outs):
                want = hf_generate(hf_model, prompt, N, presence=kw.get("presence_penalty", 0.0),
                                   frequency=kw.get("frequency_penalty", 0.0), logit_bias=kw.get("logit_bias"),
                                   repetition_penalty=kw.get("repetition_penalty"))
                assert o.output_token_ids == want, kw
                changed |= want != base
            assert changed, f"{kw} changed no prompt's tokens"


def test_min_tokens_matches_transformers(engine_1, hf_model):
    """A stop token that greedy reaches at step 3: min_tokens=8 holds it off (transformers' min_new_tokens), and
    a stop string waits as well."""
    with in_process(engine_1) as runner:
        prompt = runner.tokenize([PROMPTS[0]])[0]
        greedy = runner.generate(batch_input_ids=[prompt], max_new_tokens=N, end_id=-1)[0].output_token_ids
        k = next(i for i in range(2, N) if greedy[i] not in greedy[:i])
        stop = greedy[k]
        short = runner.generate(batch_input_ids=[prompt], max_new_tokens=N, end_id=stop)[0]
        held = runner.generate(batch_input_ids=[prompt], max_new_tokens=N, end_id=stop, min_tokens=8)[0]
        by_ids = runner.generate(batch_input_ids=[prompt], max_new_tokens=N, end_id=-1, stop_token_ids=[stop],
                                 min_tokens=8)[0]
        ignored = runner.generate(batch_input_ids=[prompt], max_new_tokens=N, end_id=stop, ignore_eos=True,
                                  min_tokens=8)[0]
    assert short.output_token_ids == greedy[: k + 1] and short.finish_reason == "stop"
    want = hf_generate(hf_model, prompt, N, eos=stop, min_new_tokens=8)
    assert stop not in want[:8] and len(want) > 8
    assert held.output_token_ids == want
    assert by_ids.output_token_ids == want
    assert ignored.output_token_ids == greedy  # ignore_eos: end_id is no stop, so nothing is masked


def test_processed_request_is_independent_of_the_batch(engine_1):
    """A penalised request among plain, sampled and other penalised ones, overlapped, gives its tokens alone."""
    pen = dict(repetition_penalty=1.4, frequency_penalty=0.5, logit_bias={17: 2.0}, end_id=-1)
    with in_process(engine_1) as runner:
        prompts = runner.tokenize(PROMPTS)
        alone = runner.generate(batch_input_ids=[prompts[1]], max_new_tokens=N, **pen)[0].output_token_ids
        params = [
            SamplingParams(max_new_tokens=N, end_id=-1),
            SamplingParams(max_new_tokens=N, **pen),
            SamplingParams(max_new_tokens=N // 2, temperature=0.8, seed=3, presence_penalty=1.0, end_id=-1),
            SamplingParams(max_new_tokens=N, min_tokens=4, end_id=-1),
        ]
        seqs = [Sequence(p, sp) for p, sp in zip([prompts[0], prompts[1], prompts[2], prompts[1]], params)]
        for s in seqs:
            runner.executor.enqueue(s)
            runner.executor.step()  # staggered: rows join while others decode
        while not all(s.is_finished for s in seqs):
            runner.executor.step()
        plain = runner.generate(batch_input_ids=[prompts[0]], max_new_tokens=N, end_id=-1)[0].output_token_ids
    assert seqs[1].output_token_ids == alone
    assert seqs[0].output_token_ids == plain
    assert [len(s.output_token_ids) for s in seqs] == [N, N, N // 2, N]


@pytest.mark.parametrize("tp,pp,graphs", [(2, 1, "off"), (2, 2, "off"), (2, 1, "static"), (1, 2, "static")])
def test_penalties_under_mpirun(tp, pp, graphs, tiny_models, hf_model, tmp_path):
    """The flags of `python -m dist_llm.run`: at tp=2 the PENDING tokens come from every rank's own sampled ids
    (overlap scheduling); at pp=2 rank 0 is not the sampling rank; "static" runs the decode graphs' path (the
    variant that stops at the logits) eagerly, on every stage."""
    from transformers import AutoTokenizer

    engine = convert_and_build(tiny_models["llama"], tmp_path, tp, pp)
    out = tmp_path / "out.json"
    run_dist(tp * pp, ["--engine_dir", engine, "--device", "cpu", "--input_text", *PROMPTS, "--max_new_tokens", str(N),
                       "--end_id", "-1", "--cuda_graphs", graphs,
                       "--repetition_penalty", "1.3", "--presence_penalty", "0.5", "--frequency_penalty", "0.4",
                       "--output_json", str(out), "--quiet"])
    tok = AutoTokenizer.from_pretrained(tiny_models["llama"])
    changed = False
    for o, text in zip(json.loads(out.read_text()), PROMPTS):
        ids = tok(text).input_ids
        want = hf_generate(hf_model, ids, N, presence=0.5, frequency=0.4, repetition_penalty=1.3)
        assert o["output_token_ids"] == want
        changed |= want != hf_generate(hf_model, ids, N)
    assert changed


def test_bad_penalty_flag_fails_before_start_up(engine_1):
    proc = run_dist(0, ["--engine_dir", engine_1, "--input_text", "x", "--presence_penalty", "3"], check=False,
                    timeout=60)
    assert proc.returncode != 0 and "presence_penalty must be in [-2, 2]" in proc.stderr


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_decode_graphs_stop_at_the_logits_for_processed_rows(device, tiny_models, tmp_path):
    """Decode steps with processed rows (or log-probabilities) replay the "logits" variant of their bucket's graph
    and sample eagerly after it: the same tokens and log-probabilities as eager steps; plain steps keep the
    graphs that sample inside."""
    from test_cuda_graphs import staggered_outputs

    from dist_llm.parallel.state import destroy
    from dist_llm.runtime import ModelRunner

    # fp32 on the GPU too: bf16 matmuls round otherwise at a padded bucket's row count than at the real one
    engine = convert_and_build(tiny_models["llama"], tmp_path, 1, 1, max_batch_size=8)
    mode = "on" if device == "cuda" else "static"
    pen = dict(repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.3, logit_bias={17: 1.5})
    try:
        runner = ModelRunner.from_dir(engine, device=device, kernel_backend="triton" if device == "cuda" else "torch",
                                      cuda_graphs=mode, num_kv_blocks=256)
        graphs_runner = runner.executor.worker.graph_runner
        reqs = [([5, 9, 14, 3], dict(max_new_tokens=20, ignore_eos=True, **pen)),
                ([7, 7, 21], dict(max_new_tokens=20, ignore_eos=True, temperature=0.9, seed=4, **pen)),
                ([8, 30, 2, 2, 6], dict(max_new_tokens=12, ignore_eos=True, return_logprobs=True, top_logprobs=3))]
        eager = staggered_outputs(runner, reqs, graphs_on=False, sequences=True)
        before = graphs_runner.steps_run
        graphs = staggered_outputs(runner, reqs, graphs_on=True, sequences=True)
        assert graphs_runner.logits_steps >= 20 and graphs_runner.steps_run - before == graphs_runner.logits_steps
        if device == "cuda":
            assert any(mode == "logits" for _, mode in graphs_runner.graphs)
        plain = staggered_outputs(runner, [(p, dict(max_new_tokens=20, ignore_eos=True)) for p, _ in reqs],
                                  graphs_on=True)
        assert graphs_runner.steps_run - before > graphs_runner.logits_steps  # plain steps: the sampling graphs
        runner.shutdown()
    finally:
        destroy()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    assert [s.output_token_ids for s in graphs] == [s.output_token_ids for s in eager]
    assert graphs[0].output_token_ids != plain[0]
    g, e = graphs[2], eager[2]
    assert [[t for t, _ in step] for step in g.top_logprobs] == [[t for t, _ in step] for step in e.top_logprobs]
    assert len(g.logprobs) == 12 and max(abs(a - b) for a, b in zip(g.logprobs, e.logprobs)) < 1e-4


def test_token_ids_outside_the_vocabulary_are_refused(engine_1):
    with in_process(engine_1) as runner:
        vocab = runner.engine.model.vocab_size
        for kw, name in ((dict(logit_bias={vocab: 1.0}), "logit_bias"), (dict(stop_token_ids=[vocab + 3]),
                         "stop_token_ids"), (dict(end_id=vocab, min_tokens=2), "end_id"),
                         (dict(stop_token_ids=[-5]), "stop_token_ids")):
            out = runner.generate(batch_input_ids=[[5, 6]], max_new_tokens=4, **kw)[0]
            assert out.finish_reason == "rejected" and f"{name} token id" in out.error and str(vocab) in out.error
        assert runner.generate(batch_input_ids=[[5, 6]], max_new_tokens=4, end_id=-1)[0].finish_reason == "length"


def test_top_logprobs_match_transformers(engine_1, hf_model):
    """Each step's k most likely ids and their log-probabilities, from the raw logits even when penalties chose
    the token; rows asking for fewer get their first k; nothing with top_logprobs = 0."""
    with in_process(engine_1) as runner:
        prompts = runner.tokenize(PROMPTS[:2])
        seqs = [Sequence(prompts[0], SamplingParams(max_new_tokens=6, end_id=-1, return_logprobs=True,
                                                    top_logprobs=5, repetition_penalty=1.6)),
                Sequence(prompts[1], SamplingParams(max_new_tokens=6, end_id=-1, return_logprobs=True, top_logprobs=2)),
                Sequence(prompts[1], SamplingParams(max_new_tokens=6, end_id=-1, return_logprobs=True))]
        for s in seqs:
            runner.executor.enqueue(s)
        while not all(s.is_finished for s in seqs):
            runner.executor.step()
    assert seqs[2].top_logprobs == [] and len(seqs[2].logprobs) == 6
    for s, k in zip(seqs[:2], (5, 2)):
        ids = torch.tensor([s.token_ids])  # prompt + output: the logits before each output token in one forward
        with torch.no_grad():
            logp = torch.log_softmax(hf_model(ids).logits[0, s.prompt_len - 1 : -1].float(), dim=-1)
        assert len(s.top_logprobs) == len(s.output_token_ids) == 6
        for step, (token, lp, top) in enumerate(zip(s.output_token_ids, s.logprobs, s.top_logprobs)):
            want_v, want_i = logp[step].topk(k)
            assert [t for t, _ in top] == want_i.tolist(), f"step {step}"
            assert max(abs(v - w) for (_, v), w in zip(top, want_v.tolist())) < 1e-4
            assert abs(lp - logp[step, token].item()) < 1e-4
    # the penalty picked tokens that are not the raw argmax at some step: the log-probs are the raw ones anyway
    assert any(top[0][0] != t for top, t in zip(seqs[0].top_logprobs, seqs[0].output_token_ids))


def test_logprobs_in_the_cli_json(engine_1, tiny_models, tmp_path):
    """One process, and two pipeline stages (the last stage sends them to rank 0): the same JSON."""
    got = []
    for n, engine in ((0, engine_1), (2, convert_and_build(tiny_models["llama"], tmp_path, 1, 2))):
        out = tmp_path / f"out{n}.json"
        run_dist(n, ["--engine_dir", engine, "--device", "cpu", "--input_text", PROMPTS[0], "--max_new_tokens", "4",
                     "--end_id", "-1",
                     "--return_logprobs", "--top_logprobs", "3", "--output_json", str(out), "--quiet"])
        got.append(json.loads(out.read_text())[0])
    o = got[0]
    assert len(o["logprobs"]) == len(o["top_logprobs"]) == 4
    assert all(len(step) == 3 and step[0][1] >= step[1][1] >= step[2][1] for step in o["top_logprobs"])
    assert all(lp <= step[0][1] for lp, step in zip(o["logprobs"], o["top_logprobs"]))
    assert got[1]["output_token_ids"] == o["output_token_ids"]
    ids = [[[t for t, _ in step] for step in g["top_logprobs"]] for g in got]
    assert ids[1] == ids[0]
    assert max(abs(a - b) for a, b in zip(got[1]["logprobs"], o["logprobs"])) < 1e-4


# ---- bad words --------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bad_words_inputs_and_the_pending_token(backend):
    """A word's last token is banned where its other tokens end the sequence, the prompt included; where the last
    of them is still PENDING, the ban holds only if the previous step sampled it."""
    sampled = torch.tensor([40, 7, 9], dtype=torch.int64)  # the previous step's ids, by its rows
    words = [[30], [5, 31], [6, 7, 32], [8, 33], [2, 9, 34]]
    p = SamplingParams(max_new_tokens=9, bad_words_ids=words)
    known = Sequence([1, 2], p)
    known.token_ids += [5]  # [5, 31] holds; [6, 7, 32] does not
    known.num_computed_tokens = 2
    pending = Sequence([1, 6], p)
    pending.token_ids += [PENDING]  # 7 if the previous step's row 1 (=7) is it: [6, 7, 32] holds
    pending.num_computed_tokens, pending.feed = 2, (0, 1)
    other = Sequence([2], p)
    other.token_ids += [PENDING]  # row 0 sampled 40, not 8 or 9: [8, 33] and [2, 9, 34] wait on it and fail
    other.num_computed_tokens, other.feed = 1, (0, 0)
    prompt_only = Sequence([3, 8], p)  # a prompt's last token counts: [8, 33] holds at the first output
    li = build_logits_inputs([known, pending, other, prompt_only], [1, 1, 1, 2], lambda seq: set())
    assert li.bias_conditional
    logits = torch.zeros(4, 40)
    got = apply_logits_processing(logits.to(DEVICE), li.to(DEVICE), sampled.to(DEVICE), get_ops(backend).fill_pending)
    banned = [sorted(torch.nonzero(row == -math.inf).flatten().tolist()) for row in got.cpu()]
    assert banned == [[30, 31], [30, 32], [30], [30, 33]]


def test_bad_words_match_transformers(engine_1, hf_model):
    """Greedy with bad words taken from the greedy output (one, two and three tokens long, and one that starts in
    the prompt), each alone, against transformers' bad_words_ids. Overlap scheduling is on, so a word's
    next-to-last token is still PENDING when the step that must ban its last token is planned."""
    with in_process(engine_1) as runner:
        prompts = runner.tokenize(PROMPTS)
        plain = [o.output_token_ids for o in runner.generate(batch_input_ids=prompts, max_new_tokens=N, end_id=-1)]
        g, compared = plain[0], 0
        for word, k, row in (([g[2]], 2, 0), ([g[5], g[6]], 6, 0), ([g[9], g[10], g[11]], 11, 0),
                             ([prompts[1][-1], plain[1][0]], 0, 1)):
            if word[-1] in word[:-1] or word[-1] in plain[row][:k]:
                continue  # (the word's last token earlier on would ban it there first)
            outs = runner.generate(batch_input_ids=prompts, max_new_tokens=N, end_id=-1, bad_words_ids=[word])
            for prompt, o in zip(prompts, outs):
                assert o.output_token_ids == hf_generate(hf_model, prompt, N, bad_words_ids=[word]), word
            got = outs[row].output_token_ids
            assert got[:k] == plain[row][:k] and got[k] != plain[row][k], (word, k)  # banned exactly there
            compared += 1
    assert compared >= 3


def test_bad_words_under_mpirun_on_the_graph_path(tiny_models, hf_model, tmp_path):
    """tp=2 through the decode graphs' static path ("logits" variant), the flag as JSON."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_models["llama"])
    ids = tok(PROMPTS[0]).input_ids
    greedy = hf_generate(hf_model, ids, N)
    words = [[greedy[3]], [greedy[7], greedy[8]]]
    engine = convert_and_build(tiny_models["llama"], tmp_path, 2, 1)
    out = tmp_path / "out.json"
    run_dist(2, ["--engine_dir", engine, "--device", "cpu", "--input_text", PROMPTS[0], "--max_new_tokens", str(N),
                 "--end_id", "-1", "--cuda_graphs", "static", "--bad_words_ids", json.dumps(words),
                 "--output_json", str(out), "--quiet"])
    got = json.loads(out.read_text())[0]["output_token_ids"]
    assert got == hf_generate(hf_model, ids, N, bad_words_ids=words) and got != greedy
