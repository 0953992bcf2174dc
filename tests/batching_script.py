"""Run under mpirun by test_batching.py: drives rank 0's executor directly and writes a JSON report."""

import json
import random
import sys

from dist_llm.runtime import ModelRunner
from dist_llm.runtime.executor import Executor
from dist_llm.runtime.sequence import SamplingParams, Sequence

engine, out_path = sys.argv[1], sys.argv[2]
runner = ModelRunner.from_dir(engine)
if not runner.is_leader:
    sys.exit(0)

rng = random.Random(0)
vocab = runner.engine.model.vocab_size
shared = [rng.randrange(3, vocab) for _ in range(40)]
requests = []
for i in range(50):
    prompt = [rng.randrange(3, vocab) for _ in range(rng.randrange(3, 60))]
    if i % 5 == 0:  # every fifth request shares a 40-token prefix
        prompt = shared + prompt[:10]
    sampled = i % 7 == 3
    params = dict(max_new_tokens=rng.randrange(4, 20), ignore_eos=True, temperature=0.8 if sampled else 0.0,
                  top_k=20 if sampled else 0, top_p=0.9 if sampled else 1.0, seed=1000 + i)
    requests.append((prompt, params))


def run(ex: Executor, waves: list[list[int]], cancel_after: dict[int, int] | None = None):
    """Submit `waves` of request indices two steps apart; cancel some after n of their tokens."""
    seqs = {}
    for w, wave in enumerate(waves):
        for i in wave:
            seqs[i] = Sequence(requests[i][0], SamplingParams(**requests[i][1]))
            ex.enqueue(seqs[i])
        for _ in range(2 if w < len(waves) - 1 else 0):
            ex.step()
        for i, n in (cancel_after or {}).items():
            if i in seqs and seqs[i].num_generated >= n and not seqs[i].is_finished:
                ex.cancel(seqs[i].request_id)
    while ex.has_unfinished():
        ex.step()
        for i, n in (cancel_after or {}).items():
            if seqs[i].num_generated >= n and not seqs[i].is_finished:
                ex.cancel(seqs[i].request_id)
    return seqs


def fresh_executor(num_blocks: int, policy: str = "max_utilization") -> Executor:
    return Executor(runner.executor.worker, runner.engine, num_blocks, runner.tokenizer,
                    capacity_scheduler_policy=policy)


report = {}
alone = {}
for i in range(len(requests)):
    ex = fresh_executor(runner.executor.block_manager.num_blocks)  # empty prefix cache: truly alone
    alone[i] = run(ex, [[i]])[i].output_token_ids
report["alone"] = alone

waves = [list(range(k, min(k + 7, 50))) for k in range(0, 50, 7)]
ex = fresh_executor(runner.executor.block_manager.num_blocks)
seqs = run(ex, waves)
report["staggered"] = {i: s.output_token_ids for i, s in seqs.items()}
report["cached_tokens"] = {i: s.reported_cached_tokens for i, s in seqs.items()}
report["staggered_free_blocks"] = [ex.block_manager.num_free_blocks, ex.block_manager.num_blocks]
report["max_inflight"] = ex.max_inflight_seen
report["pp_size"] = runner.engine.mapping.pp_size

small = fresh_executor(14)  # 14 blocks of 16 tokens: far too few for 16 running requests
seqs = run(small, waves)
report["preempted"] = {i: s.output_token_ids for i, s in seqs.items()}
report["num_preemptions"] = small.scheduler.num_preemptions
report["preempted_free_blocks"] = [small.block_manager.num_free_blocks, small.block_manager.num_blocks]

small = fresh_executor(14, "guaranteed_no_evict")  # the same pool: fewer at once, never preempted
seqs = run(small, waves)
report["no_evict"] = {i: s.output_token_ids for i, s in seqs.items()}
report["no_evict_preemptions"] = small.scheduler.num_preemptions
report["no_evict_free_blocks"] = [small.block_manager.num_free_blocks, small.block_manager.num_blocks]

ex = fresh_executor(runner.executor.block_manager.num_blocks)
seqs = run(ex, [list(range(12))], cancel_after={1: 2, 4: 1, 7: 3})
report["cancelled"] = {i: [s.finish_reason, s.num_generated] for i, s in seqs.items()}
report["cancel_free_blocks"] = [ex.block_manager.num_free_blocks, ex.block_manager.num_blocks]
report["cancel_outputs"] = {i: s.output_token_ids for i, s in seqs.items()}

chunks = list(runner.generate_stream(batch_input_ids=[requests[0][0], requests[2][0]], max_new_tokens=6,
                                     ignore_eos=True))
report["stream"] = [[c.index, c.new_token_ids, c.finished] for c in chunks]
report["stream_ref"] = [o.output_token_ids for o in runner.generate(
    batch_input_ids=[requests[0][0], requests[2][0]], max_new_tokens=6, ignore_eos=True)]
runner.shutdown()
with open(out_path, "w") as f:
    json.dump(report, f)
