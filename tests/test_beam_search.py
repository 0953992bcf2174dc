"""Beam search (runtime/beam_search.py) against transformers' `generate(num_beams=...)`: the same hypotheses,
in the same order, with the same scores, in process and under mpirun (tp=2, pp=2)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import PROMPTS, convert_and_build, run_dist
from test_features import in_process

from dist_llm.errors import DistLLMError
from dist_llm.runtime.sequence import SamplingParams, Sequence

PAD = 2  # the tiny tokenizer's <pad>: transformers fills finished hypotheses with it

# (num_beams, n, max_new_tokens, length_penalty, early_stopping, EOS: positions in the greedy output)
CASES = [
    (2, 1, 12, 1.0, False, ()),  # the model's own EOS
    (4, 4, 10, 1.0, False, (0,)),  # EOS is the likeliest first token: a hypothesis of one token
    (3, 3, 12, 1.0, True, (1,)),
    (4, 4, 12, 0.0, "never", (1,)),
    (2, 2, 12, 1.5, False, (0, 1)),  # two EOS ids: 3 x num_beams candidates a step
    (5, 3, 9, -1.0, False, (2,)),
    (3, 3, 12, 0.0, True, (7,)),  # an EOS ranked below num_beams must not finish (only the first num_beams may)
]


def hf_beams(model, prompt, num_beams, n, max_new, lp, es, eos):
    out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new, do_sample=False, num_beams=num_beams,
                         num_return_sequences=n, length_penalty=lp, early_stopping=es, eos_token_id=eos,
                         pad_token_id=PAD, return_dict_in_generate=True, output_scores=True)
    return [s[len(prompt) :].tolist() for s in out.sequences], out.sequences_scores.tolist()


def assert_same(ours_tokens, ours_scores, hf_tokens, hf_scores, what):
    for j, (o, h) in enumerate(zip(ours_tokens, hf_tokens)):
        assert h[: len(o)] == o and all(t == PAD for t in h[len(o) :]), f"{what}: hypothesis {j}: {o} vs {h}"
    assert len(ours_tokens) == len(hf_tokens)
    assert ours_scores == pytest.approx(hf_scores, abs=2e-4), what


@pytest.fixture(scope="module")
def hf_model(tiny_models):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def engine(tiny_models, tmp_path_factory) -> str:
    return convert_and_build(tiny_models["llama"], tmp_path_factory.mktemp("beam_engine"), 1, 1)


def test_matches_transformers(engine, hf_model):
    reasons, lengths = set(), set()
    with in_process(engine) as runner:
        prompts = runner.tokenize(PROMPTS[:3])
        for num_beams, n, max_new, lp, es, eos_at in CASES:
            for prompt in prompts:
                greedy = runner.generate(batch_input_ids=[prompt], max_new_tokens=max_new, end_id=-1)[0]
                eos = [greedy.output_token_ids[i] for i in eos_at] or [runner.tokenizer.eos_token_id]
                with torch.no_grad():
                    hf_tokens, hf_scores = hf_beams(hf_model, prompt, num_beams, n, max_new, lp, es, eos)
                outs = runner.generate(batch_input_ids=[prompt], max_new_tokens=max_new, num_beams=num_beams, n=n,
                                       length_penalty=lp, early_stopping=es, end_id=eos[0], stop_token_ids=eos[1:])
                assert len(outs) == n
                assert [o.sequence_index for o in outs] == (list(range(n)) if n > 1 else [None])
                assert_same([o.output_token_ids for o in outs], [o.score for o in outs], hf_tokens, hf_scores,
                            f"beams {num_beams}, n {n}, lp {lp}, early_stopping {es}")
                for o in outs:
                    assert o.finish_reason == ("stop" if o.output_token_ids[-1] in eos else "length")
                    reasons.add(o.finish_reason)
                    lengths.add(len(o.output_token_ids) == max_new)
        bm = runner.executor.block_manager
        bm.check_invariants()
        assert bm.num_free_blocks == bm.num_blocks
    assert reasons == {"stop", "length"} and lengths == {True, False}  # both endings were compared


def test_steps_reuse_the_kv_and_other_requests_run_beside(engine):
    """After the first, a beam's step request takes all but its last, partial block from the prefix cache, and
    has the prompt's priority; a plain request queued before the search runs to the same tokens as alone."""
    with in_process(engine) as runner:
        ex = runner.executor
        prompt = runner.tokenize([" ".join(PROMPTS)])[0][:40]  # two full blocks of 16
        alone = runner.generate(batch_input_ids=[prompt[:9]], max_new_tokens=30, end_id=-1)[0].output_token_ids
        steps, enqueue = [], ex.enqueue
        ex.enqueue = lambda seq: steps.append(seq) or enqueue(seq)
        plain = Sequence(prompt[:9], SamplingParams(max_new_tokens=30, end_id=-1))
        enqueue(plain)
        runner.generate(batch_input_ids=[prompt], max_new_tokens=12, num_beams=3, end_id=-1, priority=4)
        while not plain.is_finished:
            ex.step()
    assert plain.output_token_ids == alone
    later = [s for s in steps if s.num_generated > 1]  # step requests past the first step
    assert later and all(s.reported_cached_tokens >= 32 for s in later), [s.reported_cached_tokens for s in later]
    assert {s.priority for s in steps} == {4}  # the prompt's priority reaches every step


def test_early_stop_heuristic():
    """transformers' heuristic, on made-up log-probabilities: with early_stopping False it assumes a running beam
    can do no better than its score at the current length, so once every slot is finished by a better score the
    search ends, even where length_penalty 2 would have rewarded going on ([5, 0] would score -1.6 / 4 = -0.4)."""
    from dist_llm.runtime.beam_search import BeamSearch

    search = BeamSearch(1, {0}, max_new_tokens=3, length_penalty=2.0)
    assert not search.step(torch.tensor([[-1.0, -1.5]]), torch.tensor([[0, 5]]))  # EOS first: [0] finishes at -1.0
    assert search.beams == [[5]] and search.best(1)[0].tokens == [0] and search.best(1)[0].score == -1.0
    never = BeamSearch(1, {0}, max_new_tokens=3, length_penalty=2.0, early_stopping="never")  # max length assumed
    assert never.step(torch.tensor([[-1.0, -1.5]]), torch.tensor([[0, 5]]))
    assert never.step(torch.tensor([[-0.1, -0.2]]), torch.tensor([[0, 6]]))
    assert never.best(1)[0].tokens == [5, 0] and never.best(1)[0].score == pytest.approx(-0.4)


def test_bad_settings(engine):
    for kw, match in ((dict(num_beams=2, temperature=0.7), "temperature > 0"),
                      (dict(num_beams=2, n=3), "n \\(3\\) must be <= num_beams"),
                      (dict(num_beams=2, stop=["x"], min_tokens=1), "min_tokens, stop"),
                      (dict(num_beams=0), "num_beams must be"),
                      (dict(num_beams=2, early_stopping="sometimes"), "early_stopping")):
        with pytest.raises(DistLLMError, match=match):
            SamplingParams(**kw)
    with in_process(engine) as runner:
        with pytest.raises(DistLLMError, match="lower num_beams"):
            runner.generate(input_texts=[PROMPTS[0]], num_beams=11)  # 22 candidates a step
        with pytest.raises(DistLLMError, match="streaming takes no beam search"):
            next(runner.generate_stream(input_texts=[PROMPTS[0]], num_beams=2))
        outs = runner.generate(batch_input_ids=[list(range(3, 200)), [5, 6]], max_new_tokens=4, num_beams=2, n=2)
    assert [o.finish_reason for o in outs[:2]] == ["rejected"] * 2 and "max_input_len" in outs[0].error
    assert [len(o.output_token_ids) for o in outs[2:]] == [4, 4]


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_cli_under_mpirun_matches_transformers(tp, pp, tiny_models, hf_model, tmp_path):
    engine = convert_and_build(tiny_models["llama"], tmp_path, tp, pp)
    path = tmp_path / "beams.json"
    run_dist(tp * pp, ["--engine_dir", engine, "--input_text", *PROMPTS[:2], "--max_new_tokens", "10",
                       "--num_beams", "3", "--n", "2", "--length_penalty", "0.8", "--output_json", str(path)])
    got = json.loads(path.read_text())
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_models["llama"])
    for i, text in enumerate(PROMPTS[:2]):
        with torch.no_grad():
            hf = hf_beams(hf_model, tok(text)["input_ids"], 3, 2, 10, 0.8, False, [tok.eos_token_id])
        mine = got[2 * i : 2 * i + 2]
        assert [o["sequence_index"] for o in mine] == [0, 1] and mine[0]["input_text"] == text
        assert_same([o["output_token_ids"] for o in mine], [o["score"] for o in mine], *hf, f"prompt {i}")
