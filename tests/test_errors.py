"""Every bad input gets a clear error that names the thing and the fix, never a bare traceback or a hang."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time

import pytest
from conftest import convert_and_build, mpirun_cmd, run_cmd, run_dist

from dist_llm.checkpoint.converter import convert
from dist_llm.errors import CheckpointError, DistLLMError


def cli(module: str, *args, check=False):
    return run_cmd([sys.executable, "-m", module, *args], check=check, timeout=120)


def copy_model(src: str, dst) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def no_leftovers(parent) -> bool:
    return not [p for p in os.listdir(parent) if ".tmp-" in p]


def test_world_size_mismatch_fails_fast_on_every_rank(tiny_engine_tp2):
    start = time.time()
    proc = run_dist(1, ["--engine_dir", tiny_engine_tp2, "--input_text", "hi"], check=False, timeout=60)
    assert proc.returncode != 0
    assert time.time() - start < 30
    assert "needs tp_size*pp_size = 2*1 = 2 ranks but 1 was started" in proc.stderr
    assert "mpirun -n 2 python -m dist_llm.run" in proc.stderr
    proc = run_cmd(mpirun_cmd(4) + [sys.executable, "-m", "dist_llm.run", "--engine_dir", tiny_engine_tp2,
                                    "--input_text", "hi"], check=False, timeout=60)
    assert proc.returncode != 0
    assert proc.stderr.count("but 4 were started") == 4, proc.stderr  # every rank says it


@pytest.mark.parametrize("tp,pp,needle", [
    (3, 1, "--tp_size 3 does not divide num_attention_heads=4"),
    (1, 5, "--pp_size 5 exceeds the model's 4 layers"),
])
def test_convert_refuses_bad_parallelism(tiny_models, tmp_path, tp, pp, needle):
    proc = cli("dist_llm.convert", "--model_dir", tiny_models["llama"], "--output_dir", str(tmp_path / "out"),
               "--tp_size", str(tp), "--pp_size", str(pp))
    assert proc.returncode == 2
    assert needle in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists() and no_leftovers(tmp_path)


def test_convert_refuses_indivisible_intermediate(tmp_path):
    from dist_llm.testing.tiny_model import make_tiny_checkpoint

    hf = make_tiny_checkpoint(str(tmp_path / "hf"), "qwen2", intermediate_size=150)
    with pytest.raises(DistLLMError, match="--tp_size 4 does not divide intermediate_size=150"):
        convert(hf, str(tmp_path / "out"), "float32", 4, 1, log=None)


def test_unsupported_architecture(tiny_models, tmp_path):
    hf = copy_model(tiny_models["llama"], tmp_path / "hf")
    cfg = json.load(open(os.path.join(hf, "config.json")))
    cfg["architectures"] = ["GPT2LMHeadModel"]
    json.dump(cfg, open(os.path.join(hf, "config.json"), "w"))
    proc = cli("dist_llm.convert", "--model_dir", hf, "--output_dir", str(tmp_path / "out"))
    assert proc.returncode == 2
    assert "'GPT2LMHeadModel' is not supported" in proc.stderr
    assert "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM" in proc.stderr


def test_pytorch_bin_checkpoint_says_how_to_convert(tiny_models, tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    shutil.copy(os.path.join(tiny_models["llama"], "config.json"), hf)
    (hf / "pytorch_model.bin").write_bytes(b"\0" * 16)
    with pytest.raises(CheckpointError, match="PyTorch .bin checkpoint.*save_pretrained"):
        convert(str(hf), str(tmp_path / "out"), log=None)


def test_truncated_safetensors_names_the_file(tiny_models, tmp_path):
    hf = copy_model(tiny_models["llama"], tmp_path / "hf")
    shard = sorted(f for f in os.listdir(hf) if f.endswith(".safetensors"))[1]
    path = os.path.join(hf, shard)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    proc = cli("dist_llm.convert", "--model_dir", hf, "--output_dir", str(tmp_path / "out"))
    assert proc.returncode == 2
    assert shard in proc.stderr and "truncated or corrupted" in proc.stderr
    assert not (tmp_path / "out").exists() and no_leftovers(tmp_path)


def test_corrupted_header_names_the_file(tiny_models, tmp_path):
    hf = copy_model(tiny_models["llama"], tmp_path / "hf")
    shard = sorted(f for f in os.listdir(hf) if f.endswith(".safetensors"))[0]
    with open(os.path.join(hf, shard), "r+b") as f:
        f.seek(8)
        f.write(b"#garbage#")
    with pytest.raises(CheckpointError, match=f"{shard}.*truncated or corrupted"):
        convert(hf, str(tmp_path / "out"), log=None)


def test_missing_tensor_names_the_tensor(tiny_models, tmp_path):
    from safetensors.torch import load_file, save_file

    hf = copy_model(tiny_models["llama"], tmp_path / "hf")
    index = json.load(open(os.path.join(hf, "model.safetensors.index.json")))
    victim = "model.layers.2.mlp.up_proj.weight"
    shard = os.path.join(hf, index["weight_map"][victim])
    tensors = load_file(shard)
    del tensors[victim]
    save_file(tensors, shard, metadata={"format": "pt"})
    del index["weight_map"][victim]
    json.dump(index, open(os.path.join(hf, "model.safetensors.index.json"), "w"))
    with pytest.raises(CheckpointError, match=f"tensor '{victim}' is missing"):
        convert(hf, str(tmp_path / "out"), log=None)
    assert not (tmp_path / "out").exists() and no_leftovers(tmp_path)


def test_missing_tensor_in_engine_names_it(tiny_models, tmp_path):
    from safetensors.torch import load_file, save_file

    engine = convert_and_build(tiny_models["llama"], tmp_path, 1, 1)
    path = os.path.join(engine, "rank0.safetensors")
    tensors = load_file(path)
    del tensors["layers.1.mlp.down_proj.weight"]
    save_file(tensors, path)
    proc = run_dist(0, ["--engine_dir", engine, "--input_text", "hi"], check=False, timeout=60)
    assert proc.returncode == 2
    assert "tensor 'layers.1.mlp.down_proj.weight' is missing from" in proc.stderr


def test_existing_output_dir_needs_overwrite(tiny_models, tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    proc = cli("dist_llm.convert", "--model_dir", tiny_models["llama"], "--output_dir", str(out))
    assert proc.returncode == 2 and "already exists; pass --overwrite" in proc.stderr
    assert (out / "keep.txt").exists()
    cli("dist_llm.convert", "--model_dir", tiny_models["llama"], "--output_dir", str(out), "--overwrite", check=True)
    assert not (out / "keep.txt").exists() and (out / "rank0.safetensors").exists()
    engine = tmp_path / "engine"
    engine.mkdir()
    proc = cli("dist_llm.build", "--checkpoint_dir", str(out), "--output_dir", str(engine))
    assert proc.returncode == 2 and "already exists; pass --overwrite" in proc.stderr
    assert no_leftovers(tmp_path)


def test_build_refuses_seq_len_beyond_model(tiny_models, tmp_path):
    ckpt = str(tmp_path / "ckpt")
    convert(tiny_models["mistral"], ckpt, log=None)
    proc = cli("dist_llm.build", "--checkpoint_dir", ckpt, "--output_dir", str(tmp_path / "e"), "--max_seq_len", "4096")
    assert proc.returncode == 2 and "exceeds the model's max_position_embeddings 512" in proc.stderr


def test_missing_engine_dir(tmp_path):
    proc = run_dist(0, ["--engine_dir", str(tmp_path / "nope"), "--input_text", "hi"], check=False, timeout=60)
    assert proc.returncode == 2 and "engine.json not found" in proc.stderr


def test_prompt_too_long_is_refused(tiny_models, tmp_path):
    engine = convert_and_build(tiny_models["llama"], tmp_path, 1, 1, max_input_len=8, max_seq_len=64)
    proc = run_dist(0, ["--engine_dir", engine, "--input_text", "word " * 40], check=False, timeout=60)
    assert proc.returncode == 2 and "exceeds the engine's max_input_len 8" in proc.stderr
    proc = run_dist(0, ["--engine_dir", engine, "--input_text", "hi", "--max_new_tokens", "100"], check=False)
    assert proc.returncode == 2 and "exceeds the engine's max_seq_len 64" in proc.stderr


def test_bad_input_file(tiny_engine_tp2, tmp_path):
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"text": "no prompt field"}\n')
    proc = run_dist(0, ["--engine_dir", tiny_engine_tp2, "--input_file", str(bad)], check=False, timeout=60)
    assert proc.returncode == 2 and "p.jsonl:1: expected a JSON object with a 'prompt' field" in proc.stderr


@pytest.mark.parametrize("field,value,message", [
    ("max_new_tokens", 0, "max_new_tokens must be >= 1"),
    ("temperature", -0.5, "temperature must be >= 0"),
    ("top_k", -1, "top_k must be >= 0"),
    ("top_p", 0.0, "top_p must be in (0, 1]"),
    ("pad_id", -1, "pad_id must be a token id >= 0"),
])
def test_bad_sampling_params(field, value, message):
    from dist_llm.runtime.sequence import SamplingParams

    with pytest.raises(DistLLMError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        SamplingParams(**{field: value})
