"""The graphs' per-step inputs: one device buffer, filled by one host-to-device copy a step.

Every per-step tensor a captured graph (or the eager kernels between a piecewise step's graphs) reads
(input ids, positions, slots, lengths, sampling parameters, block tables) is a view into one byte buffer on
the device. The host fills a pinned mirror of it, padding included, and one asynchronous copy moves the live
prefix. Copies from pageable memory would make each of the ~11 small copies wait for the stream (the driver
stages them), so the host could not run a step ahead of the GPU; pinned memory keeps the copy asynchronous.

Two pinned mirrors are used in turn, each with an event recorded after its copy: the host may be one
step ahead of the GPU, so it refills a mirror only once the copy that read it two steps ago has run.

A field counts rows (sequences), rows + 1 (`cu_seqlens_q`), tokens or sampled rows: `sizes` gives the largest count of
each. block_tables, [rows, max_blocks], comes last, so a step copies only its live rows of it.
"""

from __future__ import annotations

import math

import torch

from dist_llm.runtime.plan import SAMPLING_FIELDS


def sampling_fields(kind: str) -> tuple:
    """The sampler's arguments (plan.SAMPLING_FIELDS) as fields whose length counts `kind`; padding rows are greedy."""
    specs = {"temperature": (torch.float32, 0.0), "top_k": (torch.int32, 0), "top_p": (torch.float32, 1.0),
             "min_p": (torch.float32, 0.0), "seeds": (torch.int64, 0), "offsets": (torch.int64, 0)}
    return tuple((name, *specs[name], kind) for name in SAMPLING_FIELDS)


# the decode graphs' fields: name, dtype, value in padding rows (and at start-up), what the length counts
DECODE_FIELDS = (
    ("input_ids", torch.int64, 0, "row"),
    ("positions", torch.int64, 0, "row"),
    ("slot_mapping", torch.int64, -1, "row"),  # padding rows write no KV
    ("seq_lens", torch.int32, 1, "row"),  # and attend to one token of block 0
    *sampling_fields("row"),
    ("prev_index", torch.int64, -1, "row"),
)
_ALIGN = 256


def _layout(fields, sizes: dict[str, int], max_blocks: int) -> tuple[dict[str, tuple[int, torch.dtype, tuple]], int]:
    """{name: (byte offset, dtype, shape)} and the total size in bytes; block_tables starts where the fields end."""
    layout, off = {}, 0
    for name, dtype, _, kind in fields:
        n = sizes["row"] + 1 if kind == "row+1" else sizes[kind]
        layout[name] = (off, dtype, (n,))
        off += -(-n * dtype.itemsize // _ALIGN) * _ALIGN
    layout["block_tables"] = (off, torch.int32, (sizes["row"], max_blocks))
    return layout, off + sizes["row"] * max_blocks * 4


def _views(buf: torch.Tensor, layout) -> dict[str, torch.Tensor]:
    return {name: buf[off : off + dtype.itemsize * math.prod(shape)].view(dtype).view(shape)
            for name, (off, dtype, shape) in layout.items()}  # fmt: skip


class StaticInputs:
    def __init__(self, max_bs: int, max_blocks: int, device: torch.device, fields=DECODE_FIELDS,
                 max_tokens: int = 0):  # fmt: skip
        self.fields = fields
        # ("sample": the rows a step samples, one per sequence or more with speculative drafts; never above its tokens)
        sizes = {"row": max_bs, "token": max_tokens, "sample": max(max_bs, max_tokens)}
        self.layout, nbytes = _layout(fields, sizes, max_blocks)
        self.table_offset, self.table_row_bytes = self.layout["block_tables"][0], max_blocks * 4
        self.buffer = torch.zeros(nbytes, dtype=torch.uint8, device=device)
        self.dev = _views(self.buffer, self.layout)  # what the graphs read
        cuda = device.type == "cuda"
        self._host = [torch.zeros(nbytes, dtype=torch.uint8, pin_memory=cuda) for _ in range(2)]
        self._host_views = [_views(h, self.layout) for h in self._host]
        self._copied = [torch.cuda.Event() if cuda else None for _ in range(2)]
        self._turn = 0
        for views in [self.dev, *self._host_views]:
            for name, _, pad, _ in fields:
                views[name].fill_(pad)

    def sampling(self, rows: int) -> dict[str, torch.Tensor]:
        """The sampler's arguments (plan.SAMPLING_FIELDS) for the first `rows` rows, as device views."""
        return {name: self.dev[name][:rows] for name in SAMPLING_FIELDS}

    def pad(self) -> None:
        """Padding values in every entry of the device buffers (for captures)."""
        for name, _, pad, _ in self.fields:
            self.dev[name].fill_(pad)
        self.dev["block_tables"].zero_()

    def load(self, values: dict, counts: dict[str, tuple[int, int]], block_tables: torch.Tensor,
             table_rows: int) -> None:  # fmt: skip
        """Each field's value (a CPU tensor; None: padding throughout) in its first entries, then padding up to
        the padded count of its kind (`counts`: {kind: (live, padded)}); block_tables' rows, then zero rows up
        to `table_rows`; all into the device buffers with one copy."""
        turn = self._turn
        self._turn ^= 1
        if self._copied[turn] is not None:
            self._copied[turn].synchronize()  # the copy that last read this mirror has run
        h = self._host_views[turn]
        for name, _, pad, kind in self.fields:
            live, padded = counts[kind]
            src = values[name]
            if src is None:  # prev_index: every input id is known
                h[name][:live] = pad
            else:
                h[name][:live] = src
            h[name][live:padded] = pad
        b, nb = block_tables.shape
        h["block_tables"][:b, :nb] = block_tables
        h["block_tables"][b:table_rows] = 0
        self.upload(turn, table_rows)
        if self._copied[turn] is not None:
            self._copied[turn].record()

    def upload(self, turn: int, table_rows: int) -> None:
        """Host mirror `turn` to the device buffers in one non-blocking copy: the fields whole, the block
        table's first `table_rows` rows. (`load` fills the mirror first; benchmarks replay a step's copy with it.)"""
        end = self.table_offset + table_rows * self.table_row_bytes
        self.buffer[:end].copy_(self._host[turn][:end], non_blocking=True)
