"""Sharded checkpoint -> engine: each rank's tensors in the exact layout the runtime loads
(fused qkv, fused gate_up, runtime names), plus engine.json with the limits and versions."""

from __future__ import annotations

import json
import os
import platform
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import torch
import transformers

import dist_llm
from dist_llm.checkpoint.hf_reader import SafetensorsFiles, read_json
from dist_llm.checkpoint.io import (
    atomic_output_dir,
    check_output_dir,
    copy_files,
    make_staging_dir,
    publish_staging_dir,
)
from dist_llm.checkpoint.st_writer import StreamingSafetensorsWriter
from dist_llm.config import BuildConfig, EngineConfig, MappingConfig, ModelConfig
from dist_llm.errors import CheckpointError, DistLLMError
from dist_llm.parallel.mapping import Mapping

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def engine_plan(cfg: ModelConfig, mapping: Mapping) -> list[tuple[str, list[str]]]:
    """(engine tensor name, checkpoint tensors concatenated along dim 0 to make it), in file order."""
    plan = []
    if mapping.is_first_stage:
        plan.append(("embed_tokens.weight", ["model.embed_tokens.weight"]))
    start, end = mapping.layer_range(cfg.num_layers)
    for i in range(start, end):
        src, dst = f"model.layers.{i}.", f"layers.{i}."
        attn = src + "self_attn."
        plan.append((dst + "input_layernorm.weight", [src + "input_layernorm.weight"]))
        plan.append((dst + "self_attn.qkv_proj.weight", [attn + f"{x}_proj.weight" for x in "qkv"]))
        if cfg.qkv_bias:
            plan.append((dst + "self_attn.qkv_proj.bias", [attn + f"{x}_proj.bias" for x in "qkv"]))
        plan.append((dst + "self_attn.o_proj.weight", [attn + "o_proj.weight"]))
        if cfg.o_bias:
            plan.append((dst + "self_attn.o_proj.bias", [attn + "o_proj.bias"]))
        plan.append((dst + "post_attention_layernorm.weight", [src + "post_attention_layernorm.weight"]))
        plan.append((dst + "mlp.gate_up_proj.weight", [src + "mlp.gate_proj.weight", src + "mlp.up_proj.weight"]))
        plan.append((dst + "mlp.down_proj.weight", [src + "mlp.down_proj.weight"]))
    if mapping.is_last_stage:
        plan.append(("norm.weight", ["model.norm.weight"]))
        single_stage_tied = cfg.tie_word_embeddings and mapping.is_first_stage
        if not single_stage_tied:
            plan.append(("lm_head.weight", ["lm_head.weight"]))
    return plan


def build_rank(checkpoint_dir: str, staging_dir: str, rank: int) -> str:
    """Write staging_dir/rank{rank}.safetensors. Memory: one fused tensor at a time."""
    ckpt_cfg = read_json(os.path.join(checkpoint_dir, "config.json"))
    cfg = ModelConfig.from_dict(ckpt_cfg["model"])
    m = ckpt_cfg["mapping"]
    mapping = Mapping(m["tp_size"], m["pp_size"], rank)
    path = os.path.join(checkpoint_dir, f"rank{rank}.safetensors")
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} is missing: the checkpoint has {m['world_size']} ranks")
    src = SafetensorsFiles.from_files([path])
    plan = engine_plan(cfg, mapping)
    for _, parts in plan:
        for p in parts:
            if p not in src.file_of:
                raise CheckpointError(f"tensor {p!r} is missing from {path}")
    specs = []
    for name, parts in plan:
        shapes = [src.shape(p) for p in parts]
        specs.append((name, TORCH_DTYPES[ckpt_cfg["dtype"]], (sum(s[0] for s in shapes), *shapes[0][1:])))
    out = os.path.join(staging_dir, f"rank{rank}.safetensors")
    with StreamingSafetensorsWriter(out, specs, metadata={"format": "pt", "producer": "dist_llm.build"}) as w:
        for name, parts in plan:
            tensors = [src.get(p) for p in parts]
            w.write(name, tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=0))
    return out


def check_limits(cfg: ModelConfig, build: BuildConfig) -> None:
    if build.max_seq_len > cfg.max_position_embeddings and not cfg.rope_scaling:
        raise DistLLMError(
            f"--max_seq_len {build.max_seq_len} exceeds the model's max_position_embeddings "
            f"{cfg.max_position_embeddings}; lower it"
        )
    if cfg.sliding_window and build.max_seq_len > cfg.sliding_window:
        raise DistLLMError(
            f"sliding-window attention is not supported yet: use --max_seq_len <= sliding_window ({cfg.sliding_window})"
        )


def versions() -> dict:
    return {
        "dist_llm": dist_llm.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def engine_config(checkpoint_dir: str, build: BuildConfig) -> EngineConfig:
    ckpt_cfg = read_json(os.path.join(checkpoint_dir, "config.json"))
    if "model" not in ckpt_cfg or "mapping" not in ckpt_cfg:
        raise DistLLMError(
            f"{checkpoint_dir}/config.json is not a dist_llm checkpoint; run `python -m dist_llm.convert` first"
        )
    cfg = ModelConfig.from_dict(ckpt_cfg["model"])
    check_limits(cfg, build)
    m = ckpt_cfg["mapping"]
    return EngineConfig(
        model=cfg,
        mapping=MappingConfig(m["tp_size"], m["pp_size"]),
        build=build,
        dtype=ckpt_cfg["dtype"],
        quantization=ckpt_cfg.get("quantization", {"quant_algo": None}),
        versions=versions(),
    )


def build_dummy(preset: str, output_dir: str, build: BuildConfig, tp_size: int, pp_size: int, dtype: str,
                overwrite: bool = False) -> str:
    """An engine of engine.json alone: random weights are made on the device at load time."""
    from dist_llm.checkpoint.presets import preset_config
    from dist_llm.checkpoint.sharding import validate_parallelism

    cfg = ModelConfig.from_hf(preset_config(preset))
    validate_parallelism(cfg, tp_size, pp_size)
    check_limits(cfg, build)
    engine = EngineConfig(model=cfg, mapping=MappingConfig(tp_size, pp_size), build=build, dtype=dtype,
                          versions=versions(), weights="dummy")
    with atomic_output_dir(output_dir, overwrite) as tmp:
        with open(os.path.join(tmp, "engine.json"), "w") as f:
            json.dump(engine.to_dict(), f, indent=2)
    return output_dir


def tokenizer_files(checkpoint_dir: str) -> list[str]:
    skip = {"config.json"}
    return [
        os.path.join(checkpoint_dir, f) for f in sorted(os.listdir(checkpoint_dir))
        if f not in skip and not f.endswith(".safetensors")
    ]


def finish_engine(checkpoint_dir: str, staging: str, output_dir: str, engine: EngineConfig) -> None:
    with open(os.path.join(staging, "engine.json"), "w") as f:
        json.dump(engine.to_dict(), f, indent=2)
    copy_files(tokenizer_files(checkpoint_dir), staging)
    publish_staging_dir(staging, output_dir)


def build(checkpoint_dir: str, output_dir: str, build_config: BuildConfig, workers: int = 1,
          overwrite: bool = False, log=print) -> str:
    """Build every rank in this process (or `workers` processes)."""
    engine = engine_config(checkpoint_dir, build_config)
    check_output_dir(output_dir, overwrite)
    staging = make_staging_dir(output_dir)
    try:
        ranks = range(engine.mapping.world_size)
        if workers > 1:
            with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
                list(pool.map(build_rank, [checkpoint_dir] * len(ranks), [staging] * len(ranks), ranks))
        else:
            for r in ranks:
                build_rank(checkpoint_dir, staging, r)
        finish_engine(checkpoint_dir, staging, output_dir, engine)
    except BaseException:
        import shutil

        shutil.rmtree(staging, ignore_errors=True)
        raise
    if log:
        log(f"wrote engine {output_dir}: {engine.model.architecture}, {engine.dtype}, "
            f"tp={engine.mapping.tp_size} pp={engine.mapping.pp_size}")
    return output_dir
