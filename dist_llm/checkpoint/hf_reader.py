"""Reading an HF checkpoint directory tensor by tensor, with errors that name the file and the tensor."""

from __future__ import annotations

import glob
import json
import os

import torch
from safetensors import safe_open

from dist_llm.config import ModelConfig
from dist_llm.errors import CheckpointError, DistLLMError

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "generation_config.json", "chat_template.jinja",
)


def read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise DistLLMError(f"{path} not found") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None


class SafetensorsFiles:
    """Tensor name -> file, over one or several safetensors files."""

    def __init__(self, files: dict[str, str]):
        self.file_of = files
        self._open: dict[str, object] = {}

    def _handle(self, path: str):
        if path not in self._open:
            try:
                self._open[path] = safe_open(path, framework="pt")
            except FileNotFoundError:
                raise CheckpointError(f"{path} is listed in the checkpoint but does not exist") from None
            except Exception as e:  # safetensors raises its own error types for bad headers / short files
                raise CheckpointError(f"{path} is truncated or corrupted ({type(e).__name__}: {e})") from None
        return self._open[path]

    def names(self) -> list[str]:
        return list(self.file_of)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(self.file_of[name]).get_slice(name).get_shape())

    def dtype(self, name: str) -> str:
        return self._handle(self.file_of[name]).get_slice(name).get_dtype()

    def get(self, name: str) -> torch.Tensor:
        path = self.file_of.get(name)
        if path is None:
            raise CheckpointError(f"tensor {name!r} is missing from the checkpoint")
        try:
            return self._handle(path).get_tensor(name)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"cannot read tensor {name!r} from {path}: {type(e).__name__}: {e}") from None

    @classmethod
    def from_files(cls, paths: list[str]) -> SafetensorsFiles:
        files = {}
        for path in paths:
            try:
                with safe_open(path, framework="pt") as f:
                    for name in f.keys():
                        files[name] = path
            except Exception as e:
                raise CheckpointError(f"{path} is truncated or corrupted ({type(e).__name__}: {e})") from None
        return cls(files)


class HFCheckpoint:
    def __init__(self, model_dir: str):
        if not os.path.isdir(model_dir):
            raise DistLLMError(f"--model_dir {model_dir} is not a directory")
        self.model_dir = model_dir
        self.hf_config = read_json(os.path.join(model_dir, "config.json"))
        gen_path = os.path.join(model_dir, "generation_config.json")
        gen = read_json(gen_path) if os.path.isfile(gen_path) else None
        self.config = ModelConfig.from_hf(self.hf_config, gen)
        self.tensors = self._index()

    @property
    def torch_dtype(self) -> str | None:
        return self.hf_config.get("torch_dtype") or self.hf_config.get("dtype")

    def _index(self) -> SafetensorsFiles:
        index = os.path.join(self.model_dir, "model.safetensors.index.json")
        if os.path.isfile(index):
            weight_map = read_json(index).get("weight_map")
            if not weight_map:
                raise CheckpointError(f"{index} has no weight_map")
            files = {name: os.path.join(self.model_dir, f) for name, f in weight_map.items()}
            for path in set(files.values()):
                if not os.path.isfile(path):
                    raise CheckpointError(f"{path} is listed in {index} but does not exist")
            st = SafetensorsFiles(files)
            for path in set(files.values()):
                st._handle(path)  # opens and validates every shard's header now
            return st
        paths = sorted(glob.glob(os.path.join(self.model_dir, "*.safetensors")))
        if paths:
            return SafetensorsFiles.from_files(paths)
        if glob.glob(os.path.join(self.model_dir, "*.bin")) or glob.glob(os.path.join(self.model_dir, "*.pt")):
            raise CheckpointError(
                f"{self.model_dir} holds a PyTorch .bin checkpoint; dist_llm reads safetensors only. Convert it "
                "with: python -c \"from transformers import AutoModelForCausalLM as M; "
                f"M.from_pretrained('{self.model_dir}').save_pretrained('OUT_DIR', safe_serialization=True)\""
            )
        raise CheckpointError(f"no *.safetensors files in {self.model_dir}")

    def tokenizer_files(self) -> list[str]:
        return [os.path.join(self.model_dir, f) for f in TOKENIZER_FILES if os.path.isfile(os.path.join(self.model_dir, f))]
