"""The one-shot all-reduce kernel (`kernels/all_reduce.py`) against `reference.all_reduce_ref`.

On the CPU, Triton's interpreter runs programs one after another, so ranks that wait for each other
cannot run there together. W = 1 runs the whole path (copy-in, both barriers, the sum, the in-place store)
and checks that the barriers leave the signal pad zeroed for the next call; for W = 2 and 4, each rank
runs alone with its peers' part done beforehand (their data in their buffers, their signals in its pad),
which checks the rank-order sum and where every flag is set and consumed.

On a GPU, W = 2 and 4 ranks are simulated on one device: W buffers and W signal pads, one kernel per
simulated rank, each on its own stream so that they run concurrently (each grid has at most 32 programs,
so all are resident at once). Every rank must produce the reference bit for bit, call after call (the
barrier's reuse), also replayed from a CUDA graph that forks into one branch per rank.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from conftest import launch_on_streams  # noqa: E402

from dist_llm.kernels.all_reduce import (  # noqa: E402
    MAX_PROGRAMS,
    TILE_BYTES,
    num_programs,
    one_shot_all_reduce,
    signal_pad_ints,
)
from dist_llm.kernels.reference import all_reduce_ref  # noqa: E402

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
DTYPE_IDS = ["bf16", "fp16", "fp32"]
CAPACITY = 1 << 20
# one element; odd sizes inside one tile; one past a bf16 tile; 4096 (an 8 KB decode row); enough tiles
# that programs loop (more than MAX_PROGRAMS tiles in bf16); the whole buffer in fp32
NUMELS = [1, 7, 1000, 4097, 4096 * 8 + 3, 140_001, CAPACITY // 4]


class Ranks:
    """W simulated ranks on one device: each one's symmetric buffer, signal pad and the address tables."""

    def __init__(self, world_size: int, device=DEVICE):
        self.world_size = world_size
        self.buffers = [torch.full((CAPACITY,), 0xFF, dtype=torch.uint8, device=device) for _ in range(world_size)]
        self.pads = [torch.zeros(signal_pad_ints(world_size), dtype=torch.int32, device=device)
                     for _ in range(world_size)]  # fmt: skip
        self.buffer_ptrs = torch.tensor([b.data_ptr() for b in self.buffers], dtype=torch.int64, device=device)
        self.signal_ptrs = torch.tensor([p.data_ptr() for p in self.pads], dtype=torch.int64, device=device)

    def call(self, rank: int, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return one_shot_all_reduce(x, out, self.buffer_ptrs, self.signal_ptrs, rank, self.world_size, CAPACITY)

    def pads_clear(self) -> bool:
        return all(p.count_nonzero().item() == 0 for p in self.pads)


def rand(numel: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(numel, generator=g).to(dtype).to(DEVICE)


def test_reference_sums_in_fp32_and_rounds_once():
    a, b = torch.tensor([1.0], dtype=torch.bfloat16), torch.tensor([2.0**-8], dtype=torch.bfloat16)
    # bf16 steps: 1 + 2^-8 is a tie that rounds (to even) back to 1, twice; in fp32 the sum is 1 + 2^-7 exactly
    assert ((a + b) + b).item() == 1.0
    assert all_reduce_ref([a, b, b]).item() == 1.0078125
    assert all_reduce_ref([a]).equal(a)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("numel", NUMELS)
def test_one_rank_in_place_matches_reference(numel, dtype):
    ranks = Ranks(1)
    x = rand(numel, dtype, seed=numel)
    expected = all_reduce_ref([x])
    for _ in range(2):  # a second call reuses the flags the first one left zeroed
        y = x.clone()
        assert ranks.call(0, y, y) is y
        assert torch.equal(y, expected)
        assert ranks.pads_clear()
    assert torch.equal(ranks.buffers[0][: x.nbytes].view(dtype), x)  # the copy-in landed in the rank's buffer


def test_separate_out_leaves_x_alone():
    ranks = Ranks(1)
    x = rand(3000, torch.bfloat16, seed=1)
    x_before, out = x.clone(), torch.full_like(x, float("nan"))
    ranks.call(0, x, out)
    assert torch.equal(x, x_before) and torch.equal(out, x)


def test_grid_is_bounded_and_launch_checks_sizes():
    assert num_programs(1, torch.bfloat16) == 1
    assert num_programs(TILE_BYTES // 2 + 1, torch.bfloat16) == 2
    assert num_programs(CAPACITY, torch.bfloat16) == MAX_PROGRAMS
    ranks = Ranks(1)
    too_big = torch.zeros(CAPACITY // 4 + 1, dtype=torch.float32, device=DEVICE)
    with pytest.raises(AssertionError, match="do not fit"):
        ranks.call(0, too_big, too_big)
    with pytest.raises(AssertionError, match="takes"):
        ints = torch.zeros(8, dtype=torch.int32, device=DEVICE)
        ranks.call(0, ints, ints)


def test_one_shot_object_checks_the_handle_and_reduces_in_place():
    """`custom_all_reduce.OneShotAllReduce` (algo "barrier") over a stand-in for torch's symmetric-memory handle."""
    from types import SimpleNamespace

    from dist_llm.parallel.custom_all_reduce import OneShotAllReduce, buffer_bytes

    assert buffer_bytes(1) == 4 * CAPACITY  # this kernel's region, then the Lamport kernel's 3 slots
    buf = torch.zeros(buffer_bytes(1) + 64, dtype=torch.uint8, device=DEVICE)
    pad = torch.zeros(signal_pad_ints(1), dtype=torch.int32, device=DEVICE)
    handle = SimpleNamespace(rank=0, world_size=1, offset=64, buffer_ptrs=[buf.data_ptr()],
                             signal_pad_ptrs=[pad.data_ptr()], signal_pad_size=pad.nbytes)  # fmt: skip
    ar = OneShotAllReduce(buf[64:], handle, buf.device, algo="barrier")
    assert ar.capacity == CAPACITY
    x = rand(5000, torch.float32, seed=3)
    y = x.clone()
    assert ar.fits(y) and ar(y) is y and torch.equal(y, x)
    assert torch.equal(buf[64 : 64 + x.nbytes].view(torch.float32), x)  # copied into the first CAPACITY bytes
    assert not ar.fits(torch.zeros(CAPACITY + 2, dtype=torch.uint8, device=DEVICE))  # too big, and uint8
    assert not ar.fits(torch.zeros(CAPACITY // 2 + 1, dtype=torch.bfloat16, device=DEVICE))
    assert not ar.fits(torch.zeros(64, 2, dtype=torch.float32, device=DEVICE).t())  # not contiguous
    with pytest.raises(RuntimeError, match="not the tensor"):
        OneShotAllReduce(buf[: buffer_bytes(1)], handle, buf.device)  # the offset says it starts 64 bytes in
    with pytest.raises(RuntimeError, match="signal pads"):
        OneShotAllReduce(buf[64:], SimpleNamespace(**{**vars(handle), "signal_pad_size": 4}), buf.device)
    with pytest.raises(RuntimeError, match="ranks need"):
        OneShotAllReduce(buf[64 : 64 + CAPACITY], handle, buf.device)


def _flag(barrier: int, program: int, world_size: int, sender: int) -> int:
    return (barrier * MAX_PROGRAMS + program) * world_size + sender


def _preset_arrivals(ranks: Ranks, rank: int, numel: int, dtype: torch.dtype) -> None:
    """Set `rank`'s flags from every other rank, in both barriers of every program, as if they had arrived:
    `rank` can then run alone. (Its signal to itself goes through the protocol like any other.)"""
    w = ranks.world_size
    for barrier in (0, 1):
        for program in range(num_programs(numel, dtype)):
            for sender in range(w):
                if sender != rank:
                    ranks.pads[rank][_flag(barrier, program, w, sender)] = 1


@pytest.mark.timeout(300)  # a flag at the wrong index would spin forever in the interpreter
@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("numel", [7, 4096 * 40 + 3])  # one program; 81 fp32 tiles: 32 programs that loop
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_each_rank_alone_with_its_peers_arrival_simulated(world_size, numel, dtype):
    """Rank by rank (the interpreter runs one at a time): the peers' data is put in their buffers and their
    signals in this rank's pad beforehand. The rank must sum the W buffers in rank order, consume exactly
    the flags the peers would have set, and leave its own signal at flag (barrier, program, itself) of
    every peer's pad, for that peer to consume. (fp32 inputs catch a wrong summation order: the fp32 sum
    of a few bf16 values is nearly always exact in any order.)"""
    xs = [rand(numel, dtype, seed=10 * world_size + r) for r in range(world_size)]
    expected = all_reduce_ref(xs)
    programs = num_programs(numel, dtype)
    for rank in range(world_size):
        ranks = Ranks(world_size)
        for peer in range(world_size):
            if peer != rank:
                ranks.buffers[peer][: xs[peer].nbytes].view(dtype).copy_(xs[peer])
        _preset_arrivals(ranks, rank, numel, dtype)
        out = xs[rank].clone()
        ranks.call(rank, out, out)
        assert torch.equal(out, expected), f"rank {rank} of {world_size}"
        assert ranks.pads[rank].count_nonzero() == 0
        for peer in range(world_size):
            if peer != rank:
                want = torch.zeros_like(ranks.pads[peer])
                for barrier in (0, 1):
                    want[[_flag(barrier, b, world_size, rank) for b in range(programs)]] = 1
                assert torch.equal(ranks.pads[peer], want), f"rank {rank}'s signals on peer {peer}'s pad"


# ------------------------------------------------------------------------------- GPU: W ranks, one device


def _load_alone(ranks: Ranks, numel: int, dtype: torch.dtype) -> None:
    """Compile and load every simulated rank's kernel variant (for this numel and dtype) before any two run
    at once: loading a kernel may synchronize the device (CUDA lazy loading), which would deadlock against
    a peer already spinning in its barrier. Each rank runs alone; then every pad is cleared."""
    for rank in range(ranks.world_size):
        _preset_arrivals(ranks, rank, numel, dtype)
        x = torch.zeros(numel, dtype=dtype, device=DEVICE)
        ranks.call(rank, x, x)
        torch.cuda.synchronize()
        for pad in ranks.pads:
            pad.zero_()


@pytest.mark.gpu
@pytest.mark.timeout(180, method="thread")  # a broken barrier hangs inside CUDA: only a thread timeout ends it
@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_simulated_ranks_on_one_gpu(world_size, dtype):
    ranks = Ranks(world_size)
    streams = [torch.cuda.Stream() for _ in range(world_size)]
    for numel in [1, 4097, 4096 * 8, 140_001, CAPACITY // dtype.itemsize]:
        _load_alone(ranks, numel, dtype)
        for it in range(3):  # new data every call: a stale read of the last call's buffer would show
            xs = [rand(numel, dtype, seed=1000 * it + r) for r in range(world_size)]
            expected = all_reduce_ref(xs)
            outs = [x.clone() for x in xs]
            launch_on_streams(ranks.call, outs, outs, streams)  # in place, as tp_all_reduce calls it
            torch.cuda.synchronize()
            for rank, out in enumerate(outs):
                assert torch.equal(out, expected), f"rank {rank} of {world_size}, numel {numel}, call {it}"
            assert ranks.pads_clear()


@pytest.mark.gpu
@pytest.mark.timeout(180, method="thread")
@pytest.mark.parametrize("world_size", [2, 4])
def test_simulated_ranks_replayed_from_a_cuda_graph(world_size):
    """The same launches, captured once per rank in one graph (a branch per rank, 8 calls in a row each),
    replayed with new inputs: the flags must come back to zero after every call without host help."""
    dtype, numel, calls = torch.bfloat16, 4096 * 4 + 5, 8
    ranks = Ranks(world_size)
    streams = [torch.cuda.Stream() for _ in range(world_size)]
    bufs = [torch.zeros(numel, dtype=dtype, device=DEVICE) for _ in range(world_size)]
    _load_alone(ranks, numel, dtype)
    launch_on_streams(ranks.call, bufs, bufs, streams)  # an eager round before the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            launch_on_streams(ranks.call, bufs, bufs, streams)
    for it in range(4):
        xs = [rand(numel, dtype, seed=100 * it + r) for r in range(world_size)]
        for buf, x in zip(bufs, xs):
            buf.copy_(x)
        expected = xs
        for _ in range(calls):  # the graph all-reduces its own result again, `calls` times
            expected = [all_reduce_ref(expected)] * world_size
        graph.replay()
        torch.cuda.synchronize()
        for rank, buf in enumerate(bufs):
            assert torch.equal(buf, expected[0]), f"rank {rank}, replay {it}"
        assert ranks.pads_clear()
