"""Small configuration dataclasses. The architecture is read from the HF config, never redeclared."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field

from dist_llm.errors import DistLLMError

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear")
DTYPES = ("float32", "float16", "bfloat16")


@dataclass
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    rope_scaling: dict | None = None
    partial_rotary_factor: float = 1.0
    qkv_bias: bool = False
    o_bias: bool = False
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    bos_token_id: int | None = None
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise DistLLMError(
                f"architecture {self.architecture!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if self.num_heads % self.num_kv_heads:
            raise DistLLMError(
                f"num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}"
            )
        rope_type = (self.rope_scaling or {}).get("rope_type", "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise DistLLMError(
                f"rope_scaling type {rope_type!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}"
            )

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @classmethod
    def from_hf(cls, hf: dict, generation_config: dict | None = None) -> ModelConfig:
        """Read an HF `config.json` dict (transformers 4 or 5 spelling)."""
        archs = hf.get("architectures") or []
        if len(archs) != 1:
            raise DistLLMError(
                f"config.json must name exactly one architecture, got {archs!r}; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        arch = archs[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise DistLLMError(
                f"architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        # transformers 5 folds rope_theta and rope_scaling into rope_parameters
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        if "type" in rope and "rope_type" not in rope:
            rope["rope_type"] = rope.pop("type")
        theta = float(rope.pop("rope_theta", hf.get("rope_theta", 10000.0)))
        partial = float(rope.pop("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)))
        rope_scaling = rope if rope.get("rope_type", "default") != "default" else None
        num_heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // num_heads
        if hf.get("mlp_bias"):
            raise DistLLMError("mlp_bias=True is not supported (no released Llama/Mistral/Qwen2 uses it)")
        if hf.get("hidden_act", "silu") != "silu":
            raise DistLLMError(f"hidden_act {hf.get('hidden_act')!r} is not supported; only 'silu'")
        sliding = hf.get("sliding_window")
        if arch == "Qwen2ForCausalLM" and not hf.get("use_sliding_window", False):
            sliding = None
        gen = generation_config or {}
        eos = gen.get("eos_token_id", hf.get("eos_token_id"))
        eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        attention_bias = bool(hf.get("attention_bias", False))
        return cls(
            architecture=arch,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            rope_scaling=rope_scaling,
            partial_rotary_factor=partial,
            qkv_bias=attention_bias or arch == "Qwen2ForCausalLM",
            o_bias=attention_bias,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            sliding_window=sliding,
            eos_token_ids=eos_ids,
            bos_token_id=gen.get("bos_token_id", hf.get("bos_token_id")),
            pad_token_id=gen.get("pad_token_id", hf.get("pad_token_id")),
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        return cls(**d)


@dataclass
class BuildConfig:
    max_batch_size: int = 64
    max_input_len: int = 2048
    max_seq_len: int = 4096
    max_num_tokens: int = 8192
    tokens_per_block: int = 64

    def __post_init__(self):
        for name in ("max_batch_size", "max_input_len", "max_seq_len", "max_num_tokens", "tokens_per_block"):
            if getattr(self, name) <= 0:
                raise DistLLMError(f"--{name} must be positive, got {getattr(self, name)}")
        if self.max_input_len > self.max_seq_len:
            raise DistLLMError(
                f"--max_input_len ({self.max_input_len}) exceeds --max_seq_len ({self.max_seq_len})"
            )
        if self.tokens_per_block & (self.tokens_per_block - 1) or self.tokens_per_block < 8:
            raise DistLLMError(f"--tokens_per_block must be a power of two >= 8, got {self.tokens_per_block}")


@dataclass
class MappingConfig:
    tp_size: int = 1
    pp_size: int = 1

    def __post_init__(self):
        if self.tp_size < 1 or self.pp_size < 1:
            raise DistLLMError(f"tp_size and pp_size must be >= 1, got tp={self.tp_size} pp={self.pp_size}")

    @property
    def world_size(self) -> int:
        return self.tp_size * self.pp_size

    def to_dict(self) -> dict:
        return {"world_size": self.world_size, "tp_size": self.tp_size, "pp_size": self.pp_size}


@dataclass
class EngineConfig:
    model: ModelConfig
    mapping: MappingConfig
    build: BuildConfig
    dtype: str
    quantization: dict = field(default_factory=lambda: {"quant_algo": None})
    versions: dict = field(default_factory=dict)
    weights: str = "files"  # "files": rank{r}.safetensors; "dummy": random, made on the device at load

    def __post_init__(self):
        if self.weights not in ("files", "dummy"):
            raise DistLLMError(f"engine weights must be 'files' or 'dummy', got {self.weights!r}")
        if self.dtype not in DTYPES:
            raise DistLLMError(f"engine dtype {self.dtype!r} is not one of {DTYPES}")

    def to_dict(self) -> dict:
        return {
            "model": self.model.to_dict(),
            "mapping": self.mapping.to_dict(),
            "build": dataclasses.asdict(self.build),
            "dtype": self.dtype,
            "quantization": self.quantization,
            "versions": self.versions,
            "weights": self.weights,
        }

    @classmethod
    def load(cls, engine_dir: str) -> EngineConfig:
        path = os.path.join(engine_dir, "engine.json")
        if not os.path.isfile(path):
            raise DistLLMError(
                f"{path} not found: --engine_dir must be a directory written by `python -m dist_llm.build`"
            )
        with open(path) as f:
            d = json.load(f)
        m = d["mapping"]
        return cls(
            model=ModelConfig.from_dict(d["model"]),
            mapping=MappingConfig(tp_size=m["tp_size"], pp_size=m["pp_size"]),
            build=BuildConfig(**d["build"]),
            dtype=d["dtype"],
            quantization=d.get("quantization", {"quant_algo": None}),
            versions=d.get("versions", {}),
            weights=d.get("weights", "files"),
        )
