"""What every benchmark shares: the ceilings measured in the same run, and the run's header."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform

import torch


def copy_bandwidth_gbs(nbytes: int = 2 << 30, iters: int = 20) -> float:
    """Device-to-device copy rate, counting bytes read + written (the decode roofline's denominator)."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1e3 / iters
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / seconds / 1e9


def batch1_parser(doc: str) -> argparse.ArgumentParser:
    """The arguments of the batch-1 benchmarks on a dummy-weight model: --output_dir, --model, --input_len and
    --output_len (128 and 256, as bench_latency.py's)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", required=True)
    p.add_argument("--model", default="llama-2-7b")
    p.add_argument("--input_len", type=int, default=128)
    p.add_argument("--output_len", type=int, default=256)
    return p


def dummy_engine(preset: str, output_dir: str, max_num_tokens: int = 2048, name: str | None = None) -> str:
    """A one-GPU bf16 engine of the preset with random weights, at OUTPUT_DIR/NAME (engine_PRESET): max batch 8,
    inputs of 512 tokens, sequences of 1024, blocks of 64."""
    from dist_llm.checkpoint.builder import build_dummy
    from dist_llm.config import BuildConfig

    build = BuildConfig(8, 512, 1024, max_num_tokens, 64)
    return build_dummy(preset, f"{output_dir}/{name or 'engine_' + preset}", build, 1, 1, "bfloat16", overwrite=True)


def header() -> dict:
    import triton

    return {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        # dist_llm's own switches (DIST_LLM_GEMV_PREFETCH, DIST_LLM_AR_NORM, ...): what an A/B run changed
        "switches": {k: v for k, v in sorted(os.environ.items()) if k.startswith("DIST_LLM_")},
    }


@contextlib.contextmanager
def triton_compiles():
    """The names of the Triton kernels compiled (or loaded from the disk cache) inside the block, as a list
    filled in as they happen: a timed run should see none (each costs the host ~1 s, which the GPU idles
    through). Through Triton's jit_post_compile_hook; where this Triton has none, the list stays empty."""
    import triton

    names: list[str] = []
    runtime = getattr(getattr(triton, "knobs", None), "runtime", None)
    if runtime is None or not hasattr(runtime, "jit_post_compile_hook"):
        yield names
        return
    previous = runtime.jit_post_compile_hook

    def hook(**kwargs):
        names.append(kwargs["fn"].name)
        return previous(**kwargs) if previous is not None else None

    runtime.jit_post_compile_hook = hook
    try:
        yield names
    finally:
        runtime.jit_post_compile_hook = previous


def write_json(output_dir: str, name: str, data) -> str:
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, name)
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
    return path


def hf_generate_tok_s(model: str, batch: int, in_len: int, out_len: int) -> float:
    """HF transformers eager `generate` on the same shapes, random bf16 weights made on the GPU: the baseline.
    Returns output tokens per second over the whole batch (static batching)."""
    import time

    from transformers import AutoConfig, AutoModelForCausalLM

    from dist_llm.checkpoint.presets import preset_config

    cfg_dict = preset_config(model)
    kind = "mistral" if "Mistral" in cfg_dict["architectures"][0] else "llama"
    cfg = AutoConfig.for_model(kind, **{k: v for k, v in cfg_dict.items() if k != "architectures"})
    with torch.device("cuda"):
        m = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    ids = torch.randint(3, cfg.vocab_size, (batch, in_len), device="cuda")
    with torch.no_grad():
        m.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)  # warm-up
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        m.generate(ids, max_new_tokens=out_len, min_new_tokens=out_len, do_sample=False)
        torch.cuda.synchronize()
    tok_s = batch * out_len / (time.perf_counter() - t0)
    del m
    torch.cuda.empty_cache()
    return tok_s


def profile_decode(runner, steps: int = 8) -> dict:
    """Batch-1 decode steps under torch.profiler on this rank: the top kernels by GPU time per step, and the
    wall time and the coordinator's host time per step (the gap between the two sums is the GPU waiting on
    the host, or on another rank)."""
    import time

    from torch.profiler import ProfilerActivity, profile

    from dist_llm.runtime.sequence import SamplingParams, Sequence

    ex = runner.executor
    prompt = list(range(3, 3 + min(128, runner.engine.build.max_input_len)))
    seq = Sequence(prompt, SamplingParams(max_new_tokens=steps + 9, ignore_eos=True))
    ex.enqueue(seq)
    for _ in range(8):
        ex.step()
    host0 = dict(ex.host_seconds)
    on_gpu = ex.worker.device.type == "cuda"  # on the CPU only wall and host time mean something
    with profile(activities=[ProfilerActivity.CUDA if on_gpu else ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            ex.step()
        wall = time.perf_counter() - t0
    host = {k: 1e6 * (v - host0[k]) / steps for k, v in ex.host_seconds.items()}
    while not seq.is_finished:
        ex.step()
    table = kernel_table(prof, steps)
    return {"kernels": table, "wall_us_per_step": 1e6 * wall / steps,
            "kernel_us_per_step": sum(k["us_per_step"] for k in table), "host_us_per_step": host,
            "timeline": kernel_timeline(device_intervals(prof), steps)}


def graph_step_us(runner, iters: int = 200) -> dict | None:
    """The batch-1 greedy decode graph replayed back to back on the GPU, µs per step by CUDA events: alone, and
    with the step's two copies around it (the inputs from pinned memory, the sampled id back), as a step runs
    them. Against the decode loop's µs per step, what is left is the host and the launch boundaries. None without
    a captured graph. Run it after generation: the replays rewrite one KV slot and the sampled-id buffer."""
    w = runner.executor.worker
    gr = w.graph_runner
    graph = gr.graphs.get((1, "greedy")) if gr is not None else None
    if graph is None:
        return None
    variants = {"replay": lambda: graph.replay(),
                "copies_replay": lambda: (gr.inputs.upload(0, 1), graph.replay(), w.token_return.start(gr.tokens[:1]))}
    out = {}
    for name, fn in variants.items():
        for _ in range(10):
            fn()
        t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        t0.record()
        for _ in range(iters):
            fn()
        t1.record()
        t1.synchronize()
        out[f"{name}_us"] = 1e3 * t0.elapsed_time(t1) / iters
    return out


def device_intervals(prof) -> list[tuple[float, float, str]]:
    """(start µs, end µs, name) of every GPU activity (kernels, copies, memsets) a torch.profiler run recorded."""
    from torch.autograd import DeviceType

    return [(e.time_range.start, e.time_range.end, e.name) for e in prof.events()
            if e.device_type == DeviceType.CUDA and e.time_range.end > e.time_range.start]


def kernel_timeline(intervals: list[tuple[float, float, str]], steps: int, top: int = 8) -> dict:
    """Where the GPU sat idle between `steps` steps' activities (`device_intervals`): the span, the time with
    no activity at all, and the idle gaps grouped by the activity that ended last before them and the one that
    started after them, longest total first, per step. With programmatic dependent launch a kernel starts
    before the one it waits for ends, so overlapping activities count once in the busy time; what is left
    is time no kernel covered (a launch boundary PDL does not span, or the host)."""
    if not intervals:
        return {"span_us_per_step": 0.0, "idle_us_per_step": 0.0, "gaps": []}
    intervals = sorted(intervals)
    gaps: dict[tuple[str, str], list[float]] = {}
    idle = 0.0
    end, last = intervals[0][1], intervals[0][2]
    for start, stop, name in intervals[1:]:
        if start > end:
            idle += start - end
            gaps.setdefault((last, name), []).append(start - end)
        if stop > end:
            end, last = stop, name
    span = end - intervals[0][0]
    rows = [{"after": a[:60], "before": b[:60], "us_per_step": sum(v) / steps, "per_step": len(v) / steps}
            for (a, b), v in gaps.items()]
    rows.sort(key=lambda r: -r["us_per_step"])
    return {"span_us_per_step": span / steps, "idle_us_per_step": idle / steps, "gaps": rows[:top]}


def print_timeline(tl: dict, indent: str = "  ") -> None:
    """kernel_timeline's summary and its longest idle gaps, a line each."""
    print(f"{indent}GPU span {tl['span_us_per_step']:.1f} us/step, idle (no activity) {tl['idle_us_per_step']:.1f}")
    for g in tl["gaps"]:
        print(f"{indent}  idle {g['us_per_step']:6.1f} us/step in {g['per_step']:.1f} gaps: {g['after']} -> "
              f"{g['before']}")


def print_kernels(rows: list[dict], indent: str = "  ") -> None:
    """kernel_table's rows, one line each: time per step, calls per step, name."""
    for k in rows:
        print(f"{indent}{k['us_per_step']:8.1f} us  x{k['calls_per_step']:.0f}  {k['kernel']}")


def kernel_table(prof, steps: int) -> list[dict]:
    """A torch.profiler run's GPU kernels, as time and calls per step, longest first."""
    rows = []
    for evt in prof.key_averages():
        t = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0)
        if t > 0:
            rows.append({"kernel": evt.key[:90], "us_per_step": t / steps, "calls_per_step": evt.count / steps})
    rows.sort(key=lambda r: -r["us_per_step"])
    return rows
