"""Model registry: HF architecture name -> (module class, weight-name rules)."""

from __future__ import annotations

from dist_llm.config import SUPPORTED_ARCHITECTURES
from dist_llm.errors import DistLLMError


def get_model_class(architecture: str):
    from dist_llm.models import llama

    registry = {
        "LlamaForCausalLM": llama.LlamaForCausalLM,
        "MistralForCausalLM": llama.MistralForCausalLM,
        "Qwen2ForCausalLM": llama.Qwen2ForCausalLM,
    }
    if architecture not in registry:
        raise DistLLMError(
            f"architecture {architecture!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return registry[architecture]
