"""Model shapes for dummy-weight engines (benchmarks): HF config.json fields of the released models."""

from __future__ import annotations

from dist_llm.errors import DistLLMError

_LLAMA = {"architectures": ["LlamaForCausalLM"], "rms_norm_eps": 1e-5, "hidden_act": "silu", "bos_token_id": 1,
          "eos_token_id": 2, "rope_theta": 10000.0, "vocab_size": 32000, "max_position_embeddings": 4096}

PRESETS = {
    "llama-2-7b": {**_LLAMA, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": 32},
    "llama-2-13b": {**_LLAMA, "hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40,
                    "num_attention_heads": 40, "num_key_value_heads": 40},
    "llama-2-70b": {**_LLAMA, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
                    "num_attention_heads": 64, "num_key_value_heads": 8},
    "llama-3-8b": {**_LLAMA, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256, "rope_theta": 500000.0,
                   "max_position_embeddings": 8192, "bos_token_id": 128000, "eos_token_id": 128001},
    "mistral-7b": {**_LLAMA, "architectures": ["MistralForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
                   "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                   "max_position_embeddings": 32768, "rope_theta": 1000000.0, "sliding_window": None},
    # draft models for speculative decoding against the Llama-2 vocabulary (JackFram/llama-68m, TinyLlama-1.1B)
    "llama-68m": {**_LLAMA, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 2,
                  "num_attention_heads": 12, "num_key_value_heads": 12, "max_position_embeddings": 2048},
    "tinyllama-1.1b": {**_LLAMA, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
                       "num_attention_heads": 32, "num_key_value_heads": 4, "max_position_embeddings": 2048},
    # tiny, for CPU tests of the dummy path and the scaling benchmark
    "tiny": {**_LLAMA, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "vocab_size": 512,
             "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024},
}


def preset_config(name: str) -> dict:
    if name not in PRESETS:
        raise DistLLMError(f"unknown --model preset {name!r}; choose one of {', '.join(PRESETS)}")
    return dict(PRESETS[name])
