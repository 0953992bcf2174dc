"""Decode steps from static, bucket-padded buffers (the CUDA-graph path). On the CPU the "static" mode
runs that path eagerly; on a GPU "on" replays captured graphs. Both must give the eager tokens."""

from __future__ import annotations

import json
import random

import pytest
import torch
from conftest import PROMPTS, convert_and_build, run_dist

from dist_llm.runtime.cuda_graphs import batch_buckets
from dist_llm.runtime.piecewise_graphs import token_buckets


def test_buckets_cover_every_batch_size():
    assert batch_buckets(1) == [1]
    assert batch_buckets(8) == [1, 2, 4, 8]
    assert batch_buckets(40) == [1, 2, 4, 8, 16, 32, 40]
    for max_bs in (1, 5, 16, 17, 64, 100):
        buckets = batch_buckets(max_bs)
        assert buckets == sorted(set(buckets)) and buckets[-1] == max_bs
        assert all(any(b >= n for b in buckets) for n in range(1, max_bs + 1))


def test_token_buckets_cover_every_step_size():
    assert token_buckets(16) == [16]
    assert token_buckets(100) == [16, 32, 64, 100]
    assert token_buckets(512) == [16, 32, 64, 128, 192, 256, 320, 384, 448, 512]
    for max_tokens in (16, 17, 130, 200, 512, 1000):
        buckets = token_buckets(max_tokens)
        assert buckets == sorted(set(buckets)) and buckets[-1] == max_tokens
        assert all(any(b >= n for b in buckets) for n in range(1, max_tokens + 1))
    with pytest.raises(ValueError, match="max_tokens >= 16"):
        token_buckets(8)


def staggered_outputs(runner, requests, graphs_on: bool, steps_between: int = 3, overlap: bool = True,
                      sequences: bool = False) -> list:
    """Requests join one by one while the others decode, so batch sizes (and buckets) keep changing. Their output
    token ids, or with `sequences` the finished Sequence objects."""
    from dist_llm.runtime.executor import Executor
    from dist_llm.runtime.sequence import SamplingParams, Sequence

    worker = runner.executor.worker
    saved = worker.graph_runner, worker.piecewise_runner
    if not graphs_on:
        worker.graph_runner = worker.piecewise_runner = None
    try:
        ex = Executor(worker, runner.engine, runner.executor.block_manager.num_blocks, runner.tokenizer,
                      overlap=overlap)
        seqs = []
        for prompt, params in requests:
            seqs.append(Sequence(prompt, SamplingParams(**params)))
            ex.enqueue(seqs[-1])
            for _ in range(steps_between):
                ex.step()
        while ex.has_unfinished():
            ex.step()
        return seqs if sequences else [s.output_token_ids for s in seqs]
    finally:
        worker.graph_runner, worker.piecewise_runner = saved


def make_requests(vocab: int, n: int, max_new: int):
    rng = random.Random(1)
    reqs = []
    for i in range(n):
        params = dict(max_new_tokens=rng.randrange(max_new // 2, max_new), ignore_eos=True)
        if i % 3 == 1:
            params.update(temperature=0.8, seed=i, min_p=0.1 if i % 2 else 0.0)
        if i % 3 == 2:
            params.update(temperature=1.0, top_k=10, top_p=0.9, seed=i)
        reqs.append(([rng.randrange(3, vocab) for _ in range(rng.randrange(2, 30))], params))
    return reqs


@pytest.mark.parametrize("kernels,n,max_new,min_static", [("torch", 7, 24, 20), ("triton", 3, 5, 3)])
def test_static_path_matches_eager(kernels, n, max_new, min_static, tiny_models, tmp_path):
    from dist_llm.parallel.state import destroy
    from dist_llm.runtime import ModelRunner

    engine = convert_and_build(tiny_models["llama"], tmp_path, 1, 1, max_batch_size=8)
    device = "cuda" if kernels == "triton" and torch.cuda.is_available() else "cpu"  # no interpreter there
    try:
        # a small pool: one sized from free memory would keep ~90% of the card cached after this test
        runner = ModelRunner.from_dir(engine, device=device, kernel_backend=kernels, cuda_graphs="static",
                                      num_kv_blocks=256)
        assert runner.executor.worker.graph_runner.buckets == [1, 2, 4, 8]
        reqs = make_requests(runner.engine.model.vocab_size, n, max_new)
        eager = staggered_outputs(runner, reqs, graphs_on=False, overlap=False)
        static = staggered_outputs(runner, reqs, graphs_on=True)
        assert runner.executor.worker.graph_runner.steps_run >= min_static  # decode steps took the static path
        assert runner.executor.worker.piecewise_runner.steps_run >= n  # and prompts the piecewise one
        runner.shutdown()
    finally:
        destroy()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    assert static == eager  # the static path, with overlap scheduling, against eager steps without it


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_static_path_under_mpirun(tp, pp, tiny_models, tmp_path):
    """Tensor parallelism, and pipeline stages that each run their part from static buffers."""
    engine = convert_and_build(tiny_models["llama"], tmp_path, tp, pp, max_batch_size=4)
    outs = []
    for mode in ("off", "static"):
        path = tmp_path / f"{mode}.json"
        run_dist(tp * pp, ["--engine_dir", engine, "--device", "cpu", "--input_text", *PROMPTS,
                           "--max_new_tokens", "12",
                     "--cuda_graphs", mode, "--output_json", str(path), "--quiet"])
        outs.append([o["output_token_ids"] for o in json.loads(path.read_text())])
    assert outs[0] == outs[1]


def test_graphs_refuse_what_they_cannot_capture(tiny_engine_tp2):
    proc = run_dist(2, ["--engine_dir", tiny_engine_tp2, "--input_text", "hi", "--cuda_graphs", "on",
                        "--device", "cpu"], check=False, timeout=120)
    assert proc.returncode != 0 and "--cuda_graphs on needs --device cuda" in proc.stderr


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 5])
def test_captured_graphs_match_eager_over_256_steps(batch, tiny_models, tmp_path):
    from dist_llm.parallel.state import destroy
    from dist_llm.runtime import ModelRunner

    engine = convert_and_build(tiny_models["llama"], tmp_path, 1, 1, dtype="bfloat16", max_batch_size=8,
                               max_seq_len=320)
    try:
        runner = ModelRunner.from_dir(engine, device="cuda", cuda_graphs="on", num_kv_blocks=256)
        reqs = [(p, dict(max_new_tokens=256, ignore_eos=True)) for p, _ in
                make_requests(runner.engine.model.vocab_size, batch, 8)]
        # the same scheduler (overlapped) both ways, so every step has the same rows in both runs: at one row the
        # decode GEMVs fold the norms (kernels/gemv_norm.py) and round otherwise than at several, so a request's
        # last bits follow its batch's size, as in any runtime that picks kernels by batch size; without overlap
        # a finished request leaves a step earlier, and steps would differ in size
        eager = staggered_outputs(runner, reqs, graphs_on=False, overlap=True)
        worker = runner.executor.worker
        warmup_steps = worker.piecewise_runner.steps_run  # start-up's compile warm-up runs through it
        graphs = staggered_outputs(runner, reqs, graphs_on=True)
        assert len(worker.graph_runner.graphs) > 0
        # the prompts (alone, and beside the decode rows of requests already running) replayed piecewise graphs
        assert len(worker.piecewise_runner.graphs) == len(worker.piecewise_runner.buckets)
        assert worker.piecewise_runner.steps_run - warmup_steps >= batch
        runner.shutdown()
    finally:
        destroy()
        torch.cuda.empty_cache()
    assert graphs == eager


def test_piecewise_max_tokens_is_checked():
    from dist_llm.errors import DistLLMError
    from dist_llm.runtime import ModelRunner

    with pytest.raises(DistLLMError, match="--piecewise_graph_max_tokens must be 0 .off. or at least 16"):
        ModelRunner.from_dir("/nonexistent/engine", piecewise_graph_max_tokens=8)
