"""The decode graphs' per-step inputs: one device buffer, filled by one host-to-device copy a step.

Every per-step tensor the captured graphs read (input ids, positions, slots, lengths, sampling
parameters, block tables) is a view into one byte buffer on the device. The host fills a pinned mirror
of it, padding rows included, and one asynchronous copy moves the live prefix. Copies from pageable
memory would make each of the ~11 small copies wait for the stream (the driver stages them), so the
host could not run a step ahead of the GPU; pinned memory keeps the copy asynchronous.

Two pinned mirrors are used in turn, each with an event recorded after its copy: the host may be one
step ahead of the GPU, so it refills a mirror only once the copy that read it two steps ago has run.
"""

from __future__ import annotations

import math

import torch

# name, dtype, value in padding rows (and at start-up); block_tables comes last (its rows are copied up
# to the bucket only)
ROW_FIELDS = (
    ("input_ids", torch.int64, 0),
    ("positions", torch.int64, 0),
    ("slot_mapping", torch.int64, -1),  # padding rows write no KV
    ("seq_lens", torch.int32, 1),  # and attend to one token of block 0
    ("temperature", torch.float32, 0.0),
    ("top_k", torch.int32, 0),
    ("top_p", torch.float32, 1.0),
    ("seeds", torch.int64, 0),
    ("offsets", torch.int64, 0),
    ("prev_index", torch.int64, -1),
)
_ALIGN = 256


def _layout(max_bs: int, max_blocks: int) -> tuple[dict[str, tuple[int, torch.dtype, tuple]], int]:
    """{name: (byte offset, dtype, shape)} and the total size in bytes; block_tables starts where the row
    fields end."""
    fields, off = {}, 0
    for name, dtype, _ in ROW_FIELDS:
        fields[name] = (off, dtype, (max_bs,))
        off += -(-max_bs * dtype.itemsize // _ALIGN) * _ALIGN
    fields["block_tables"] = (off, torch.int32, (max_bs, max_blocks))
    return fields, off + max_bs * max_blocks * 4


def _views(buf: torch.Tensor, fields) -> dict[str, torch.Tensor]:
    return {name: buf[off : off + dtype.itemsize * math.prod(shape)].view(dtype).view(shape)
            for name, (off, dtype, shape) in fields.items()}  # fmt: skip


class StaticInputs:
    def __init__(self, max_bs: int, max_blocks: int, device: torch.device):
        self.fields, nbytes = _layout(max_bs, max_blocks)
        self.table_offset, self.table_row_bytes = self.fields["block_tables"][0], max_blocks * 4
        self.buffer = torch.zeros(nbytes, dtype=torch.uint8, device=device)
        self.dev = _views(self.buffer, self.fields)  # what the graphs read
        cuda = device.type == "cuda"
        self._host = [torch.zeros(nbytes, dtype=torch.uint8, pin_memory=cuda) for _ in range(2)]
        self._host_views = [_views(h, self.fields) for h in self._host]
        self._copied = [torch.cuda.Event() if cuda else None for _ in range(2)]
        self._turn = 0
        for views in [self.dev, *self._host_views]:
            for name, _, pad in ROW_FIELDS:
                views[name].fill_(pad)

    def pad(self, start: int, end: int) -> None:
        """Padding values in rows [start, end) of the device buffers (for captures)."""
        for name, _, pad in ROW_FIELDS:
            self.dev[name][start:end] = pad
        self.dev["block_tables"][start:end] = 0

    def load(self, plan, bucket: int) -> None:
        """The plan's b rows, then padding up to `bucket`, into the device buffers with one copy."""
        b, nb = plan.batch_size, plan.block_tables.shape[1]
        turn = self._turn
        self._turn ^= 1
        if self._copied[turn] is not None:
            self._copied[turn].synchronize()  # the copy that last read this mirror has run
        h = self._host_views[turn]
        for name, _, pad in ROW_FIELDS:
            src = getattr(plan, name)
            if src is None:  # prev_index: every input id is known
                h[name][:b] = pad
            else:
                h[name][:b] = src
            h[name][b:bucket] = pad
        h["block_tables"][:b, :nb] = plan.block_tables
        h["block_tables"][b:bucket] = 0
        self.upload(turn, bucket)
        if self._copied[turn] is not None:
            self._copied[turn].record()

    def upload(self, turn: int, bucket: int) -> None:
        """Host mirror `turn` to the device buffers, `bucket` rows, in one non-blocking copy: the row fields whole,
        the block table's live rows. (`load` fills the mirror first; benchmarks replay a step's copy with it.)"""
        end = self.table_offset + bucket * self.table_row_bytes
        self.buffer[:end].copy_(self._host[turn][:end], non_blocking=True)
