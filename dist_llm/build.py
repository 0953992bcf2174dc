"""python -m dist_llm.build: sharded checkpoint -> engine (one rank file per rank, in the runtime layout).

Paged KV cache and in-flight batching are always on in dist_llm: --paged_kv_cache and
--use_inflight_batching are accepted for TensorRT-LLM compatibility; --gemm_plugin has no effect.
Under `mpirun -n N` each MPI rank builds its own shard(s).
"""

from __future__ import annotations

import argparse
import shutil

from dist_llm.cli import run_main


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m dist_llm.build", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint_dir", help="directory written by `python -m dist_llm.convert`")
    p.add_argument("--output_dir", required=True, help="engine directory to write")
    p.add_argument("--max_batch_size", type=int, default=64)
    p.add_argument("--max_input_len", type=int, default=2048)
    p.add_argument("--max_seq_len", type=int, default=4096, help="prompt + generated tokens, at most")
    p.add_argument("--max_num_tokens", type=int, default=8192, help="tokens per forward step (chunked prefill budget)")
    p.add_argument("--tokens_per_block", type=int, default=64, help="KV cache block size in tokens")
    p.add_argument("--workers", type=int, default=1, help="build ranks in this many parallel processes")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output_dir")
    p.add_argument("--dummy_weights", action="store_true",
                   help="random weights made on the device at load time (benchmarks); needs --model")
    p.add_argument("--model", help="preset for --dummy_weights: llama-2-7b, llama-2-13b, llama-2-70b, llama-3-8b, "
                   "mistral-7b, llama-68m, tinyllama-1.1b (drafts), tiny")
    p.add_argument("--tp_size", type=int, default=1, help="with --dummy_weights")
    p.add_argument("--pp_size", type=int, default=1, help="with --dummy_weights")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"],
                   help="with --dummy_weights")
    p.add_argument("--paged_kv_cache", choices=["enable"], default="enable",
                   help="accepted for TensorRT-LLM compatibility; the KV cache is always paged")
    p.add_argument("--use_inflight_batching", action="store_true",
                   help="accepted for TensorRT-LLM compatibility; in-flight batching is always on")
    p.add_argument("--gemm_plugin", default=None, help="accepted for TensorRT-LLM compatibility; has no effect")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from dist_llm.checkpoint import builder
    from dist_llm.checkpoint.io import check_output_dir, make_staging_dir
    from dist_llm.config import BuildConfig
    from dist_llm.errors import DistLLMError
    from dist_llm.parallel.spmd import World

    cfg = BuildConfig(args.max_batch_size, args.max_input_len, args.max_seq_len, args.max_num_tokens,
                      args.tokens_per_block)
    if args.dummy_weights:
        if not args.model:
            raise DistLLMError("--dummy_weights needs --model PRESET (e.g. llama-2-7b)")
        builder.build_dummy(args.model, args.output_dir, cfg, args.tp_size, args.pp_size, args.dtype, args.overwrite)
        return
    if not args.checkpoint_dir:
        raise DistLLMError("--checkpoint_dir is required (or --dummy_weights --model PRESET)")
    world = World()
    if world.size == 1:
        builder.build(args.checkpoint_dir, args.output_dir, cfg, args.workers, args.overwrite)
        return
    # one MPI rank per engine rank (or several engine ranks each, round robin)
    engine = builder.engine_config(args.checkpoint_dir, cfg)
    check_output_dir(args.output_dir, args.overwrite)
    staging = world.bcast(make_staging_dir(args.output_dir) if world.rank == 0 else None)
    error = None
    try:
        for r in range(world.rank, engine.mapping.world_size, world.size):
            builder.build_rank(args.checkpoint_dir, staging, r)
    except Exception as e:  # gather every rank's outcome so that all exit together, none hangs
        error = f"rank {world.rank}: {e}"
    errors = [e for e in world.allgather(error) if e]
    if errors:
        if world.rank == 0:
            shutil.rmtree(staging, ignore_errors=True)
        world.barrier()  # the first rank to exit ends the job: not before rank 0 has removed the staging dir
        raise DistLLMError("; ".join(errors))
    if world.rank == 0:
        builder.finish_engine(args.checkpoint_dir, staging, args.output_dir, engine)
        print(f"wrote engine {args.output_dir} ({world.size} MPI ranks)")
    world.barrier()


if __name__ == "__main__":
    run_main(main)
