"""Tiny random-weight HF checkpoints with a locally trained tokenizer, for the demo and the tests.

Nothing is downloaded: the tokenizer is trained with `tokenizers` on a small built-in corpus, the
model is made by `transformers` with random weights and saved with `save_pretrained`, sharded.

    python -m dist_llm.testing.tiny_model --output_dir /tmp/tiny --arch llama
"""

from __future__ import annotations

import argparse
import os

import torch

CORPUS = """Explain quantum computing in simple terms.
The quick brown fox jumps over the lazy dog.
Tensor parallelism splits each layer across GPUs; pipeline parallelism splits the layers.
A paged KV cache stores keys and values in fixed-size blocks, like virtual memory pages.
In-flight batching admits new requests while others are still decoding.
Once upon a time, in a land far away, there lived a curious engineer who loved fast inference.
The rank zero coordinator schedules every step and broadcasts the plan to all ranks.
""" * 4

ARCHS = ("llama", "mistral", "qwen2")


def train_tokenizer(out_dir: str, vocab_size: int = 384):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS.splitlines(), trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(out_dir)
    return fast


def make_config(arch: str, vocab_size: int, bos: int, eos: int, **overrides):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=160, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5,
        initializer_range=0.15, bos_token_id=bos, eos_token_id=eos, tie_word_embeddings=False,
    )
    if arch == "llama":
        rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64, "rope_theta": 10000.0}
        cfg = LlamaConfig(**{**common, **overrides})
        cfg.rope_parameters = rope
        cfg.rope_scaling = rope
    elif arch == "mistral":
        cfg = MistralConfig(**{**common, "sliding_window": None, **overrides})
    elif arch == "qwen2":
        cfg = Qwen2Config(**{**common, "num_key_value_heads": 4, **overrides})
    else:
        raise ValueError(f"unknown arch {arch!r}; choose one of {ARCHS}")
    return cfg


def make_tiny_checkpoint(out_dir: str, arch: str = "llama", seed: int = 0, max_shard_size: str = "200KB",
                         **config_overrides) -> str:
    """Write an HF checkpoint directory and return it."""
    from transformers import AutoModelForCausalLM

    os.makedirs(out_dir, exist_ok=True)
    tok = train_tokenizer(out_dir)
    vocab = len(tok)
    cfg = make_config(arch, vocab, tok.bos_token_id, tok.eos_token_id, **config_overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # norms and biases are 1 and 0 by default: make them count
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn_like(p))
    model.save_pretrained(out_dir, max_shard_size=max_shard_size)
    return out_dir


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", required=True)
    p.add_argument("--arch", default="llama", choices=ARCHS)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    make_tiny_checkpoint(args.output_dir, args.arch, args.seed)
    print(f"wrote a tiny random {args.arch} checkpoint to {args.output_dir}")


if __name__ == "__main__":
    main()
