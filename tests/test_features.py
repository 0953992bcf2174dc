"""Features around the core path: parallel and MPI builds, single-file HF checkpoints, --tokenizer_dir,
stop conditions, logprobs and seeded sampling.

Where the launcher is not what is under test, a 1-rank engine runs in this process (`in_process`).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from contextlib import contextmanager

import pytest
import torch
from conftest import PROMPTS, convert_and_build, mpirun_cmd, run_cmd, run_dist
from safetensors.torch import load_file

from dist_llm.errors import DistLLMError

BUILD = dict(max_batch_size=8, max_input_len=128, max_seq_len=256, max_num_tokens=512, tokens_per_block=16)
BUILD_ARGS = [a for k, v in BUILD.items() for a in (f"--{k}", str(v))]


@contextmanager
def in_process(engine: str):
    """A ModelRunner for a 1-rank engine in this process; torn down so that the next one can start."""
    from dist_llm.parallel.state import destroy
    from dist_llm.runtime import ModelRunner

    runner = None
    try:
        runner = ModelRunner.from_dir(engine, device="cpu")
        assert runner.is_leader
        yield runner
    finally:
        if runner is not None:
            runner.shutdown()
        destroy()


def no_leftovers(parent) -> bool:
    return not [p for p in os.listdir(parent) if ".tmp-" in p]


def assert_same_engine(got: str, want: str) -> None:
    ranks = sorted(f for f in os.listdir(want) if f.endswith(".safetensors"))
    assert ranks == [f"rank{r}.safetensors" for r in range(4)]
    assert sorted(f for f in os.listdir(got) if f.endswith(".safetensors")) == ranks
    for f in ranks:
        a, b = load_file(os.path.join(got, f)), load_file(os.path.join(want, f))
        assert list(a) == list(b), f
        for name in a:
            assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), f"{f}: {name}"
        with open(os.path.join(got, f), "rb") as fa, open(os.path.join(want, f), "rb") as fb:
            assert fa.read() == fb.read(), f"{f}: same tensors but different bytes"
    assert (sorted(f for f in os.listdir(got) if not f.endswith(".safetensors"))
            == sorted(f for f in os.listdir(want) if not f.endswith(".safetensors")))


@pytest.fixture(scope="module")
def ckpt_tp2_pp2(tiny_models, tmp_path_factory) -> str:
    from dist_llm.checkpoint.converter import convert

    out = str(tmp_path_factory.mktemp("feat_ckpt") / "ckpt")
    return convert(tiny_models["llama"], out, "float32", 2, 2, log=None)


@pytest.fixture(scope="module")
def engine_tp2_pp2(ckpt_tp2_pp2, tmp_path_factory) -> str:
    """The reference build: every rank in this process, one after the other (what --workers 1 runs)."""
    from dist_llm.checkpoint.builder import build
    from dist_llm.config import BuildConfig

    out = str(tmp_path_factory.mktemp("feat_ref") / "engine")
    return build(ckpt_tp2_pp2, out, BuildConfig(**BUILD), workers=1, log=None)


@pytest.fixture(scope="module")
def engine_1(tiny_models, tmp_path_factory) -> str:
    return convert_and_build(tiny_models["llama"], tmp_path_factory.mktemp("feat_engine1"), 1, 1)


# ---- building -----------------------------------------------------------------------------------


def test_build_workers_2_gives_the_same_engine(ckpt_tp2_pp2, engine_tp2_pp2, tmp_path):
    out = tmp_path / "engine"
    run_cmd([sys.executable, "-m", "dist_llm.build", "--checkpoint_dir", ckpt_tp2_pp2, "--output_dir", str(out),
             "--workers", "2", *BUILD_ARGS], timeout=120)
    assert_same_engine(str(out), engine_tp2_pp2)
    eng = json.loads((out / "engine.json").read_text())
    assert eng["mapping"] == {"world_size": 4, "tp_size": 2, "pp_size": 2}
    assert eng["build"] == BUILD
    assert eng["dtype"] == "float32"
    assert {"dist_llm", "torch", "transformers", "python", "built_at"} <= set(eng["versions"])
    ref = json.loads(open(os.path.join(engine_tp2_pp2, "engine.json")).read())
    assert {k: v for k, v in eng.items() if k != "versions"} == {k: v for k, v in ref.items() if k != "versions"}
    assert no_leftovers(tmp_path)


def test_build_under_mpirun_gives_the_same_engine(ckpt_tp2_pp2, engine_tp2_pp2, tmp_path):
    """2 MPI ranks build the 4 engine ranks (round robin) and rank 0 publishes the directory."""
    out = tmp_path / "engine"
    proc = run_cmd(mpirun_cmd(2) + [sys.executable, "-m", "dist_llm.build", "--checkpoint_dir", ckpt_tp2_pp2,
                                    "--output_dir", str(out), *BUILD_ARGS], timeout=120)
    assert "(2 MPI ranks)" in proc.stdout
    assert_same_engine(str(out), engine_tp2_pp2)
    assert json.loads((out / "engine.json").read_text())["mapping"]["world_size"] == 4
    assert no_leftovers(tmp_path)


def test_build_under_mpirun_fails_on_every_rank(ckpt_tp2_pp2, tmp_path):
    """Engine rank 3 belongs to MPI rank 1: its missing shard must end both ranks, not leave rank 0 waiting."""
    ckpt = shutil.copytree(ckpt_tp2_pp2, tmp_path / "ckpt")
    (ckpt / "rank3.safetensors").unlink()
    out = tmp_path / "engine"
    start = time.time()
    proc = run_cmd(mpirun_cmd(2) + [sys.executable, "-m", "dist_llm.build", "--checkpoint_dir", str(ckpt),
                                    "--output_dir", str(out), *BUILD_ARGS], check=False, timeout=60)
    assert proc.returncode != 0
    assert time.time() - start < 30
    missing = f"{ckpt / 'rank3.safetensors'} is missing: the checkpoint has 4 ranks"
    for rank in (0, 1):
        assert f"[rank {rank}] error: rank 1: {missing}" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists() and no_leftovers(tmp_path)


# ---- checkpoints and tokenizers -----------------------------------------------------------------


def test_single_file_checkpoint(tiny_models, engine_1, tmp_path):
    from dist_llm.checkpoint.hf_reader import HFCheckpoint
    from dist_llm.testing.tiny_model import make_tiny_checkpoint

    # conftest makes tiny_models["llama"] with seed 0 and the default (sharded) max_shard_size
    hf = make_tiny_checkpoint(str(tmp_path / "hf"), "llama", seed=0, max_shard_size="100MB")
    assert sorted(f for f in os.listdir(hf) if "safetensors" in f) == ["model.safetensors"]
    sharded = HFCheckpoint(tiny_models["llama"]).tensors
    assert len(set(sharded.file_of.values())) > 1
    single = HFCheckpoint(hf).tensors
    assert sorted(single.names()) == sorted(sharded.names())
    assert all(torch.equal(single.get(n), sharded.get(n)) for n in single.names())

    engine = convert_and_build(hf, tmp_path, 1, 1)
    outputs = []
    for e in (engine, engine_1):
        with in_process(e) as runner:
            outputs.append(runner.generate(input_texts=PROMPTS, max_new_tokens=12))
    assert [o.output_token_ids for o in outputs[0]] == [o.output_token_ids for o in outputs[1]]
    assert all(o.output_token_ids for o in outputs[0])


def test_tokenizer_dir(tiny_models, engine_1, tmp_path):
    from dist_llm.checkpoint.hf_reader import TOKENIZER_FILES

    engine = shutil.copytree(engine_1, tmp_path / "engine")
    removed = [f for f in TOKENIZER_FILES if f != "generation_config.json" and (engine / f).exists()]
    assert "tokenizer.json" in removed
    for f in removed:
        (engine / f).unlink()
    with in_process(engine_1) as runner:
        before = runner.generate(input_texts=PROMPTS[:2], max_new_tokens=8)

    args = ["--engine_dir", str(engine), "--input_text", *PROMPTS[:2], "--max_new_tokens", "8"]
    proc = run_dist(0, args, check=False, timeout=60)
    assert proc.returncode == 2
    assert f"error: no tokenizer in {engine}; pass --tokenizer_dir or --input_ids" in proc.stderr
    assert "Traceback" not in proc.stderr
    out = tmp_path / "out.json"
    run_dist(0, [*args, "--tokenizer_dir", tiny_models["llama"], "--output_json", str(out)], timeout=60)
    got = json.loads(out.read_text())
    assert [o["output_token_ids"] for o in got] == [o.output_token_ids for o in before]
    assert [o["output_text"] for o in got] == [o.output_text for o in before]

    # the Python form: token ids need no tokenizer; text gets the same clear error
    with in_process(str(engine)) as runner:
        with pytest.raises(DistLLMError, match=f"no tokenizer in {engine}"):
            runner.generate(input_texts=PROMPTS[:1], max_new_tokens=8)
        outs = runner.generate(batch_input_ids=[o.prompt_token_ids for o in before], max_new_tokens=8)
    assert [o.output_token_ids for o in outs] == [o.output_token_ids for o in before]
    assert all(o.output_text is None for o in outs)


# ---- generation ---------------------------------------------------------------------------------


def test_stop_conditions(engine_1):
    """vLLM's rules: a stop token stays in output_token_ids but not in output_text; a stop string is cut."""
    n = 24
    with in_process(engine_1) as runner:
        tok = runner.tokenizer

        def gen(**kw):
            return runner.generate(input_texts=[PROMPTS[0]], **{"max_new_tokens": n, "end_id": -1, **kw})[0]

        base = gen()
        greedy, text = base.output_token_ids, base.output_text
        assert len(greedy) == n and base.finish_reason == "length" and base.logprobs == []
        assert text == tok.decode(greedy, skip_special_tokens=True)
        pieces = [tok.decode([g]) for g in greedy]

        def readable(piece: str) -> bool:
            return len(piece.strip()) >= 2 and piece.isascii() and piece.isprintable()

        # a stop token: the first occurrence, at k, of a token with readable text
        k = next(i for i in range(3, n) if greedy[i] not in greedy[:i] and readable(pieces[i]))
        t = greedy[k]
        stopped = {
            "stop_token_ids": gen(stop_token_ids=[t]),
            "end_id": gen(end_id=t),  # end_id is EOS for this request
            "stop_token_ids+ignore_eos": gen(stop_token_ids=[t], ignore_eos=True),
        }
        for how, o in stopped.items():
            assert o.output_token_ids == greedy[: k + 1], how
            assert o.finish_reason == "stop", how
            assert o.output_text == tok.decode(greedy[:k], skip_special_tokens=True), how
        past = gen(end_id=t, ignore_eos=True)
        assert past.output_token_ids == greedy and past.finish_reason == "length"
        short = gen(max_new_tokens=3)
        assert short.output_token_ids == greedy[:3] and short.finish_reason == "length"
        assert short.padded_output_token_ids is None
        padded = gen(stop_token_ids=[t], pad_id=7)  # TensorRT-LLM's layout: max_new_tokens ids
        assert padded.output_token_ids == greedy[: k + 1]
        assert padded.padded_output_token_ids == greedy[: k + 1] + [7] * (n - k - 1)
        assert gen(pad_id=7).padded_output_token_ids == greedy

        # a stop string: a piece of the greedy text that first appears after its start
        stop = next(p for p in pieces[2:] if readable(p) and text.index(p) > 0)
        j = next(j for j in range(1, n + 1) if stop in tok.decode(greedy[:j], skip_special_tokens=True))
        o = gen(stop=[stop])
        assert o.finish_reason == "stop"
        assert o.output_text == text[: text.index(stop)]
        assert o.output_token_ids == greedy[:j]  # up to the token that completed the string


def test_logprobs_match_transformers(tiny_models, engine_1):
    from transformers import AutoModelForCausalLM

    n = 8
    with in_process(engine_1) as runner:
        outputs = runner.generate(input_texts=PROMPTS, max_new_tokens=n, return_logprobs=True)
    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float32).eval()
    for o in outputs:
        assert len(o.logprobs) == len(o.output_token_ids) > 0
        assert all(lp <= 0 for lp in o.logprobs)
        ids = torch.tensor([o.prompt_token_ids])
        with torch.no_grad():
            hf = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                                output_logits=True, return_dict_in_generate=True)
        assert hf.sequences[0, ids.shape[1]:].tolist() == o.output_token_ids
        for step, (token, lp) in enumerate(zip(o.output_token_ids, o.logprobs)):
            want = torch.log_softmax(hf.logits[step][0].float(), dim=-1)[token].item()
            assert abs(lp - want) < 1e-4, f"step {step}: {lp} vs {want}"


def test_seeded_sampling_is_independent_of_the_batch(engine_1):
    from dist_llm.runtime.sequence import SamplingParams, Sequence

    n = 24
    sampling = dict(temperature=0.9, top_p=0.8, end_id=-1)
    with in_process(engine_1) as runner:
        alone = runner.generate(input_texts=[PROMPTS[0]], max_new_tokens=n, seed=5, **sampling)[0].output_token_ids
        # the same request among 4 others with their own seeds (and other settings) in one batch
        prompts = [PROMPTS[1], PROMPTS[2], PROMPTS[0], PROMPTS[0], "The rank zero coordinator"]
        params = [
            SamplingParams(max_new_tokens=n, temperature=1.0, top_k=20, seed=1, end_id=-1),
            SamplingParams(max_new_tokens=n // 2, seed=2, end_id=-1),  # greedy
            SamplingParams(max_new_tokens=n, seed=5, **sampling),  # the request above
            SamplingParams(max_new_tokens=n, seed=6, **sampling),  # the same prompt, another seed
            SamplingParams(max_new_tokens=n, temperature=0.7, seed=7, end_id=-1),
        ]
        seqs = [Sequence(p, sp) for p, sp in zip(runner.tokenize(prompts), params)]
        for s in seqs:
            runner.executor.enqueue(s)
        while not all(s.is_finished for s in seqs):
            runner.executor.step()
        unseeded = runner.generate(input_texts=[PROMPTS[0]], max_new_tokens=n, **sampling)[0]
    assert len(alone) == n
    assert seqs[2].output_token_ids == alone
    assert seqs[3].output_token_ids != alone
    assert [len(s.output_token_ids) for s in seqs] == [n, n // 2, n, n, n]
    assert len(unseeded.output_token_ids) == n and unseeded.finish_reason == "length"


def test_min_p(engine_1):
    """min_p 1 keeps only the likeliest token, so hot sampling turns greedy; below 1 the same seed samples
    something else (both in one batch, with a greedy row beside them)."""
    from dist_llm.runtime.sequence import SamplingParams, Sequence

    n = 16
    with in_process(engine_1) as runner:
        prompt = runner.tokenize([PROMPTS[0]])[0]
        params = [SamplingParams(max_new_tokens=n, end_id=-1),  # greedy
                  SamplingParams(max_new_tokens=n, temperature=1.5, min_p=1.0, seed=3, end_id=-1),
                  SamplingParams(max_new_tokens=n, temperature=1.5, min_p=0.3, seed=3, end_id=-1),
                  SamplingParams(max_new_tokens=n, temperature=1.5, seed=3, end_id=-1)]
        seqs = [Sequence(prompt, p) for p in params]
        for s in seqs:
            runner.executor.enqueue(s)
        while not all(s.is_finished for s in seqs):
            runner.executor.step()
    greedy, one, low, off = (s.output_token_ids for s in seqs)
    assert one == greedy and len(greedy) == n
    assert off != greedy and low != greedy
    assert low != off  # min_p 0.3 dropped tokens that min_p 0 sampled


def test_request_larger_than_the_pool_is_refused_and_the_others_run(engine_1):
    """A request whose prompt + max_new_tokens can never fit the KV pool is refused at admission with the
    numbers; the rest of the call runs on."""
    from dist_llm.parallel.state import destroy
    from dist_llm.runtime import ModelRunner

    try:
        runner = ModelRunner.from_dir(engine_1, device="cpu", num_kv_blocks=4)  # 4 blocks of 16 tokens
        outputs = runner.generate(batch_input_ids=[[5, 6, 7], list(range(3, 60))], max_new_tokens=10, ignore_eos=True)
        runner.shutdown()
    finally:
        destroy()
    ok, refused = outputs
    assert ok.finish_reason == "length" and len(ok.output_token_ids) == 10
    assert refused.finish_reason == "rejected" and refused.output_token_ids == []
    assert "needs 5 KV blocks but the pool has 4" in refused.error
