"""A streaming safetensors writer: the header is written from shapes alone, then tensors one at a time.

`safetensors.torch.save_file` needs every tensor of a file in memory at once; converting a 70B model
rank by rank must not. The file format is the published one (8-byte little-endian header length,
JSON header with dtype/shape/data_offsets, then the raw bytes), so `safe_open` reads it as usual.
"""

from __future__ import annotations

import json
import struct

import torch

_DTYPE_NAMES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.float8_e4m3fn: "F8_E4M3",
}


class StreamingSafetensorsWriter:
    def __init__(self, path: str, specs: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata=None):
        self.path = path
        self.order = [name for name, _, _ in specs]
        self.specs = {name: (dtype, tuple(shape)) for name, dtype, shape in specs}
        header, offset = {}, 0
        if metadata:
            header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
        for name, dtype, shape in specs:
            nbytes = torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size()
            offsets = [offset, offset + nbytes]
            header[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": offsets}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # keep the data section 8-byte aligned
        self.file = open(path, "wb")
        self.file.write(struct.pack("<Q", len(raw)))
        self.file.write(raw)
        self.next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self.next >= len(self.order) or self.order[self.next] != name:
            expected = self.order[self.next] if self.next < len(self.order) else "nothing"
            raise RuntimeError(f"{self.path}: tensors must be written in header order; got {name}, expected {expected}")
        dtype, shape = self.specs[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise RuntimeError(
                f"{self.path}: tensor {name} is {tensor.dtype}{tuple(tensor.shape)}, header says {dtype}{shape}"
            )
        data = tensor.detach().to("cpu").contiguous()
        self.file.write(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
        self.next += 1

    def close(self) -> None:
        if self.next != len(self.order):
            missing = self.order[self.next :]
            self.file.close()
            raise RuntimeError(f"{self.path}: {len(missing)} tensors were never written, first {missing[0]}")
        self.file.close()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.file.close()
