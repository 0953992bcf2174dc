"""python -m dist_llm.convert: HF checkpoint -> sharded dist_llm checkpoint."""

from __future__ import annotations

import argparse

from dist_llm.cli import run_main


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m dist_llm.convert", description=__doc__)
    p.add_argument("--model_dir", required=True, help="HF checkpoint directory (config.json, *.safetensors, tokenizer)")
    p.add_argument("--output_dir", required=True, help="where the sharded checkpoint is written")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    p.add_argument("--tp_size", type=int, default=1, help="tensor-parallel size")
    p.add_argument("--pp_size", type=int, default=1, help="pipeline-parallel size")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output_dir")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from dist_llm.checkpoint.converter import convert

    convert(args.model_dir, args.output_dir, args.dtype, args.tp_size, args.pp_size, args.overwrite)


if __name__ == "__main__":
    run_main(main)
