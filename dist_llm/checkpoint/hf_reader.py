"""Reading an HF checkpoint directory tensor by tensor, with errors that name the file and the tensor."""

from __future__ import annotations

import glob
import json
import os
import struct

import torch

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


_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


class SafetensorsFile:
    """One safetensors file read with positioned reads, not mmap.

    `safe_open` maps the file, and every page it touches stays in the process's resident set while
    the file is open, so converting a single-file 15 GB checkpoint would look like 15 GB of memory.
    Reading each tensor into its own buffer keeps the footprint at one tensor.
    """

    def __init__(self, path: str):
        self.path = path
        try:
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise ValueError("shorter than the 8-byte header length")
                (n,) = struct.unpack("<Q", head)
                if n > size - 8:
                    raise ValueError(f"header length {n} exceeds the file size {size}")
                header = json.loads(f.read(n))
        except FileNotFoundError:
            raise CheckpointError(f"{path} does not exist") from None
        except (ValueError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path} is truncated or corrupted (bad header: {e})") from None
        header.pop("__metadata__", None)
        self.data_start = 8 + n
        self.entries = header
        end = max((v["data_offsets"][1] for v in header.values()), default=0)
        if self.data_start + end > size:
            raise CheckpointError(
                f"{path} is truncated or corrupted: its header needs {self.data_start + end} bytes, the file has {size}"
            )

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def get(self, name: str) -> torch.Tensor:
        e = self.entries[name]
        if e["dtype"] not in _ST_DTYPES:
            raise CheckpointError(f"tensor {name!r} in {self.path} has unsupported dtype {e['dtype']}")
        begin, end = e["data_offsets"]
        buf = bytearray(end - begin)
        with open(self.path, "rb") as f:
            f.seek(self.data_start + begin)
            if f.readinto(buf) != len(buf):
                raise CheckpointError(f"{self.path} is truncated: tensor {name!r} is cut short")
        if not buf:
            return torch.empty(e["shape"], dtype=_ST_DTYPES[e["dtype"]])
        return torch.frombuffer(buf, dtype=_ST_DTYPES[e["dtype"]]).reshape(e["shape"])


class SafetensorsFiles:
    """Tensor name -> file, over one or several safetensors files."""

    def __init__(self, files: dict[str, str]):
        self.file_of = files
        self._open: dict[str, SafetensorsFile] = {}

    def _handle(self, path: str) -> SafetensorsFile:
        if path not in self._open:
            if not os.path.isfile(path):
                raise CheckpointError(f"{path} is listed in the checkpoint but does not exist")
            self._open[path] = SafetensorsFile(path)
        return self._open[path]

    def names(self) -> list[str]:
        return list(self.file_of)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._handle(self.file_of[name]).shape(name)

    def dtype(self, name: str) -> str:
        return self._handle(self.file_of[name]).entries[name]["dtype"]

    def get(self, name: str) -> torch.Tensor:
        path = self.file_of.get(name)
        if path is None:
            raise CheckpointError(f"tensor {name!r} is missing from the checkpoint")
        handle = self._handle(path)
        if name not in handle.entries:
            raise CheckpointError(f"tensor {name!r} is listed for {path} but the file does not contain it")
        return handle.get(name)

    @classmethod
    def from_files(cls, paths: list[str]) -> SafetensorsFiles:
        st = cls({})
        for path in paths:
            for name in st._handle(path).entries:
                st.file_of[name] = path
        return st


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
        paths = [os.path.join(self.model_dir, f) for f in TOKENIZER_FILES]
        return [p for p in paths if os.path.isfile(p)]
