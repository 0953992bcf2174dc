"""Convert and build: shard layout, streaming memory, the safetensors writer."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dist_llm.checkpoint.converter import convert
from dist_llm.checkpoint.sharding import kv_heads_of_rank
from dist_llm.checkpoint.st_writer import StreamingSafetensorsWriter
from dist_llm.parallel.mapping import layer_range


def test_layer_ranges_are_contiguous_and_balanced():
    for layers in (4, 7, 32, 80):
        for pp in range(1, min(layers, 9) + 1):
            ranges = [layer_range(layers, pp, s) for s in range(pp)]
            assert ranges[0][0] == 0 and ranges[-1][1] == layers
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
            sizes = [e - s for s, e in ranges]
            assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_kv_heads_split_then_replicate():
    assert [kv_heads_of_rank(8, 2, r) for r in range(2)] == [(0, 4), (4, 4)]
    assert [kv_heads_of_rank(2, 8, r) for r in range(8)] == [(0, 1)] * 4 + [(1, 1)] * 4


def test_streaming_writer_round_trip(tmp_path):
    tensors = {"a": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.int64), "c": torch.randn(2, 2).bfloat16()}
    path = str(tmp_path / "x.safetensors")
    with StreamingSafetensorsWriter(path, [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]) as w:
        for k, v in tensors.items():
            w.write(k, v)
    with safe_open(path, "pt") as f:
        for k, v in tensors.items():
            assert torch.equal(f.get_tensor(k), v)
    with pytest.raises(RuntimeError, match="header order"):
        StreamingSafetensorsWriter(str(tmp_path / "y"), [("a", torch.float32, (1,)), ("b", torch.float32, (1,))]).write(
            "b", torch.zeros(1))


def test_checkpoint_config_and_shards(tiny_models, tmp_path):
    out = str(tmp_path / "ckpt")
    convert(tiny_models["llama"], out, "bfloat16", 2, 2, log=None)
    cfg = json.load(open(f"{out}/config.json"))
    assert cfg["mapping"] == {"world_size": 4, "tp_size": 2, "pp_size": 2}
    assert cfg["quantization"] == {"quant_algo": None} and cfg["dtype"] == "bfloat16"
    assert cfg["model"]["num_layers"] == 4
    with safe_open(f"{out}/rank1.safetensors", "pt") as f:  # stage 0, tp rank 1
        names = set(f.keys())
        assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names
        assert not any(n.startswith("model.layers.2.") for n in names)
        q = f.get_tensor("model.layers.0.self_attn.q_proj.weight")
        assert q.dtype == torch.bfloat16 and q.shape == (32, 64)  # 2 of 4 heads × head_dim 16
        assert f.get_tensor("model.layers.0.self_attn.o_proj.weight").shape == (64, 32)
    with safe_open(f"{out}/rank3.safetensors", "pt") as f:  # last stage
        assert {"lm_head.weight", "model.norm.weight"} <= set(f.keys())
        assert any(n.startswith("model.layers.3.") for n in f.keys())
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(__import__("os").listdir(out))


MEMORY_SCRIPT = r"""
import json, sys, torch
from dist_llm.checkpoint.converter import convert
import dist_llm.checkpoint.sharding, dist_llm.checkpoint.st_writer, safetensors.torch  # imports before the baseline
def status_mb(key):
    return int(open("/proc/self/status").read().split(key + ":")[1].split()[0]) / 1024
before = status_mb("VmRSS")
convert(sys.argv[1], sys.argv[2], "float32", 2, 2, log=None)
# VmHWM, not ru_maxrss: ru_maxrss survives exec and would count the parent's memory at fork
peak = status_mb("VmHWM")
print(json.dumps({"before": before, "peak": peak}))
"""


def test_convert_streams_tensor_by_tensor(tmp_path):
    """Peak memory during convert stays near the largest tensor, not the model size."""
    hidden, inter, layers, vocab = 512, 1536, 28, 16384
    cfg = {"architectures": ["LlamaForCausalLM"], "vocab_size": vocab, "hidden_size": hidden,
           "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": 8,
           "num_key_value_heads": 8, "max_position_embeddings": 512, "torch_dtype": "float32"}
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps(cfg))
    total, largest = 0, 0
    for part in range(4):  # four shard files, so reading crosses files
        tensors = {}
        for i in range(part * layers // 4, (part + 1) * layers // 4):
            p = f"model.layers.{i}."
            for n in "qkvo":
                tensors[p + f"self_attn.{n}_proj.weight"] = torch.randn(hidden, hidden)
            tensors[p + "mlp.gate_proj.weight"] = torch.randn(inter, hidden)
            tensors[p + "mlp.up_proj.weight"] = torch.randn(inter, hidden)
            tensors[p + "mlp.down_proj.weight"] = torch.randn(hidden, inter)
            tensors[p + "input_layernorm.weight"] = torch.ones(hidden)
            tensors[p + "post_attention_layernorm.weight"] = torch.ones(hidden)
        if part == 0:
            tensors["model.embed_tokens.weight"] = torch.randn(vocab, hidden)
        if part == 3:
            tensors["lm_head.weight"] = torch.randn(vocab, hidden)
            tensors["model.norm.weight"] = torch.ones(hidden)
        save_file(tensors, str(hf / f"model-{part}.safetensors"))
        total += sum(t.numel() * 4 for t in tensors.values())
        largest = max([largest] + [t.numel() * 4 for t in tensors.values()])
        del tensors
    proc = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(hf), str(tmp_path / "out")],
                          capture_output=True, text=True, check=True)
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    grew = m["peak"] - m["before"]
    print(f"convert grew by {grew:.0f} MB")
    total_mb, largest_mb = total / 2**20, largest / 2**20
    assert total_mb > 400  # the model is big enough for the check to mean something
    # one tensor, its cast and slices, and allocator slack: a few times the largest, far below the model
    assert grew < 4 * largest_mb + 64, f"convert grew by {grew:.0f} MB; largest tensor {largest_mb:.0f} MB"
    assert grew < total_mb / 3, f"convert grew by {grew:.0f} MB for a {total_mb:.0f} MB model"
