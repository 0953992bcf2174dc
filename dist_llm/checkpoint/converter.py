"""HF checkpoint -> dist_llm sharded checkpoint (config.json + rank{r}.safetensors + tokenizer files).

Streams: each HF tensor is read once, cast, cut for every rank that holds a piece of it and written
straight into that rank's file, so peak memory stays near the largest tensor, not the model.
"""

from __future__ import annotations

import json
import os

import torch

import dist_llm
from dist_llm.checkpoint.hf_reader import HFCheckpoint
from dist_llm.checkpoint.io import atomic_output_dir, copy_files
from dist_llm.checkpoint.sharding import rank_shards, required_tensors, validate_parallelism
from dist_llm.checkpoint.st_writer import StreamingSafetensorsWriter
from dist_llm.config import DTYPES, MappingConfig
from dist_llm.errors import CheckpointError, DistLLMError
from dist_llm.parallel.mapping import Mapping

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_dtype(requested: str, ckpt: HFCheckpoint) -> str:
    if requested != "auto":
        if requested not in DTYPES:
            raise DistLLMError(f"--dtype {requested!r} is not one of auto, {', '.join(DTYPES)}")
        return requested
    found = ckpt.torch_dtype
    if found in DTYPES:
        return found
    stored = ckpt.tensors.dtype("model.embed_tokens.weight")
    return {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}.get(stored, "float32")


def convert(model_dir: str, output_dir: str, dtype: str = "auto", tp_size: int = 1, pp_size: int = 1,
            overwrite: bool = False, log=print) -> str:
    ckpt = HFCheckpoint(model_dir)
    cfg = ckpt.config
    mapping_cfg = MappingConfig(tp_size, pp_size)
    validate_parallelism(cfg, tp_size, pp_size)
    dtype = resolve_dtype(dtype, ckpt)
    target = TORCH_DTYPES[dtype]
    names = ckpt.tensors.names()
    missing = [n for n in required_tensors(cfg) if n not in ckpt.tensors.file_of]
    if missing:
        raise CheckpointError(f"tensor {missing[0]!r} is missing from {model_dir} ({len(missing)} missing in all)")
    # read in file order so each shard file is visited once
    names.sort(key=lambda n: (ckpt.tensors.file_of[n], n))
    shapes = {n: ckpt.tensors.shape(n) for n in names}
    plans = [rank_shards(cfg, Mapping(tp_size, pp_size, r), shapes) for r in range(mapping_cfg.world_size)]
    users: dict[str, list[tuple[int, object]]] = {}
    for r, shards in enumerate(plans):
        for s in shards:
            users.setdefault(s.source, []).append((r, s))

    with atomic_output_dir(output_dir, overwrite) as tmp:
        writers = [
            StreamingSafetensorsWriter(
                os.path.join(tmp, f"rank{r}.safetensors"),
                [(s.name, target, s.shape) for s in shards],
                metadata={"format": "pt", "producer": "dist_llm.convert", "rank": r},
            )
            for r, shards in enumerate(plans)
        ]
        try:
            for i, name in enumerate(names):
                if name not in users:
                    continue
                tensor = ckpt.tensors.get(name).to(target)
                for r, shard in users[name]:
                    writers[r].write(shard.name, shard.take(tensor))
                del tensor
                if log and (i + 1) % 50 == 0:
                    log(f"converted {i + 1}/{len(names)} tensors")
        finally:
            for w in writers:
                w.file.close()
        for w in writers:
            w.close()
        config = {
            "model": cfg.to_dict(),
            "dtype": dtype,
            "mapping": mapping_cfg.to_dict(),
            "quantization": {"quant_algo": None},
            "producer": {"dist_llm": dist_llm.__version__, "source": os.path.abspath(model_dir)},
        }
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        copy_files(ckpt.tokenizer_files(), tmp)
    if log:
        log(f"wrote {output_dir}: {cfg.architecture}, {dtype}, tp={tp_size} pp={pp_size}")
    return output_dir
