"""The coordinator's own cost per step: schedule + step plan + completion, with a stub worker that returns
sampled ids at once, so no model runs. Runs anywhere (CPU is fine): it measures Python, not the GPU.

    python benchmarks/bench_host.py [--batch_sizes 1 64 256] [--output_dir bench_out/host]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import header, write_json  # noqa: E402


class StubWorker:
    """Stands in for a Worker: samples random ids instantly."""

    def __init__(self):
        from dist_llm.parallel.mapping import Mapping

        self.mapping = Mapping()

    def execute(self, plan):
        from dist_llm.runtime.plan import StepResult

        return StepResult(token_ids=torch.randint(3, 30000, (plan.batch_size,)))


def measure(batch: int, steps: int, model: str) -> dict:
    from dist_llm.checkpoint.presets import preset_config
    from dist_llm.config import BuildConfig, EngineConfig, MappingConfig, ModelConfig
    from dist_llm.runtime.executor import Executor
    from dist_llm.runtime.sequence import SamplingParams, Sequence

    engine = EngineConfig(ModelConfig.from_hf(preset_config(model)), MappingConfig(),
                          BuildConfig(max(batch, 1), 2048, 4096, 8192, 64), "bfloat16")
    ex = Executor(StubWorker(), engine, num_blocks=batch * 8 + 16)
    for _ in range(batch):
        ex.enqueue(Sequence(list(range(3, 131)), SamplingParams(max_new_tokens=steps + 8, ignore_eos=True)))
    ex.step()  # the prefill step
    t0 = time.perf_counter()
    for _ in range(steps):
        ex.step()
    step_ms = (time.perf_counter() - t0) / steps * 1e3
    seqs = list(ex.requests.values())
    t0 = time.perf_counter()
    for _ in range(steps):
        batch_plan = ex._plan(_decode_batch(seqs))
    plan_ms = (time.perf_counter() - t0) / steps * 1e3
    del batch_plan
    return {"batch": batch, "step_ms": step_ms, "plan_ms": plan_ms}


def _decode_batch(seqs):
    from dist_llm.runtime.scheduler import ScheduledBatch

    return ScheduledBatch(seqs, [1] * len(seqs), [])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 64, 256])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--model", default="llama-2-7b")
    p.add_argument("--output_dir")
    args = p.parse_args()
    from dist_llm.parallel.state import set_single_process_state

    set_single_process_state(torch.device("cpu"))
    rows = [measure(b, args.steps, args.model) for b in args.batch_sizes]
    info = header()
    print(f"# coordinator cost per decode step (stub worker), {info['date']}, python {info['python']}")
    print("| batch | whole step ms | of which the step plan ms |")
    print("| --- | --- | --- |")
    for r in rows:
        print(f"| {r['batch']} | {r['step_ms']:.2f} | {r['plan_ms']:.2f} |")
    if args.output_dir:
        write_json(args.output_dir, "host.json", {**info, "rows": rows, "command": "python " + " ".join(sys.argv)})


if __name__ == "__main__":
    main()
