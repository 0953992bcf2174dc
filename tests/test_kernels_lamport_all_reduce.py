"""The barrier-free one-shot all-reduce (`kernels/lamport_all_reduce.py`) against `reference.all_reduce_ref`,
and its place in `parallel/custom_all_reduce.py`.

On the CPU, Triton's interpreter runs programs one after another, so a rank that waits for its peers cannot
run together with them. W = 1 runs the whole path call after call (the slot rotation, the state the last
program advances, the clear of the previous call's slot, also after a bigger call). For W = 2 and 4, each
rank runs alone with its own buffer's current slot holding its peers' contributions already (as their
pushes would have left it) and the previous slot holding the previous call's words: it must produce the
reference, push its own words into every peer's buffer, clear the previous slot and advance its state.

On a GPU, W = 2 and 4 ranks are simulated on one device: W buffers, one kernel per simulated rank, each on
its own stream so that they run concurrently (each grid has at most 32 programs, so all are resident at
once). Every rank must produce the reference bit for bit, call after call and size after size (the slot
rotation and the clears under real concurrency), with ranks that run ahead of each other, and replayed
from a CUDA graph that forks into one branch per rank.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from conftest import launch_on_streams  # noqa: E402

from dist_llm.kernels.lamport_all_reduce import (  # noqa: E402
    SENTINEL,
    SLOTS,
    buffer_bytes,
    init_buffer,
    lamport_all_reduce,
    lamport_all_reduce_rms_norm,
    new_state,
)
from dist_llm.kernels.reference import all_reduce_ref  # noqa: E402

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
DTYPES = [torch.bfloat16, torch.float16]
DTYPE_IDS = ["bf16", "fp16"]
SLOT_BYTES = 1 << 20  # custom_all_reduce.CAPACITY_BYTES
MULTI_TILE = 4096 * 40 + 3  # 41 bf16 tiles: 32 programs, some of which loop


class Ranks:
    """W simulated ranks on one device: each one's symmetric buffer and state, and the address table."""

    def __init__(self, world_size: int, device=DEVICE):
        self.world_size = world_size
        self.buffers = [init_buffer(torch.empty(buffer_bytes(world_size, SLOT_BYTES), dtype=torch.uint8, device=device))
                        for _ in range(world_size)]  # fmt: skip
        self.states = [new_state(device) for _ in range(world_size)]
        self.buffer_ptrs = torch.tensor([b.data_ptr() for b in self.buffers], dtype=torch.int64, device=device)

    def call(self, rank: int, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return lamport_all_reduce(x, out, self.buffer_ptrs, self.states[rank], rank, self.world_size, SLOT_BYTES)

    def words(self, owner: int) -> torch.Tensor:
        """`owner`'s buffer as [slot, segment, word] int16."""
        return self.buffers[owner].view(torch.int16).view(SLOTS, self.world_size, SLOT_BYTES // 2)

    def reset(self) -> None:
        for buffer, state in zip(self.buffers, self.states):
            init_buffer(buffer)
            state.zero_()


def rand(numel: int, dtype: torch.dtype, seed: int, wide: bool = False) -> torch.Tensor:
    """Normal values; `wide` scales each by 2^[-e, e) (e = 24 in bf16, 10 in fp16, whose range is narrow), so
    that fp32 sums round and their order shows. Element 0 is -0.0 on every rank (its sum is the -0.0
    caveat), element 1 is -0.0 on seeds divisible by 3."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(numel, generator=g)
    if wide:
        e = 24 if dtype == torch.bfloat16 else 10
        x = x * torch.exp2(torch.randint(-e, e, (numel,), generator=g).float())
    x[0] = -0.0
    if numel > 1 and seed % 3 == 0:
        x[1] = -0.0
    return x.to(dtype).to(DEVICE)


def pushed(x: torch.Tensor) -> torch.Tensor:
    """The words a rank writes for x: its bits, -0.0 made +0.0."""
    bits = x.view(torch.int16)
    return torch.where(bits == SENTINEL, torch.zeros_like(bits), bits)


def expected(xs: list[torch.Tensor]) -> torch.Tensor:
    """The reference sum, but +0.0 where every rank's value is -0.0 (the sentinel caveat)."""
    out = all_reduce_ref(xs).clone()
    all_negative_zero = torch.stack([x.view(torch.int16) == SENTINEL for x in xs]).all(dim=0)
    out[all_negative_zero] = 0.0
    return out


def in_use(world_size: int, slot: int, numel: int, segments=None) -> torch.Tensor:
    """[slot, segment, word] bool: the words that are not the sentinel after a call of `numel` in `slot`,
    in `segments` (all by default)."""
    mask = torch.zeros(SLOTS, world_size, SLOT_BYTES // 2, dtype=torch.bool, device=DEVICE)
    for p in range(world_size) if segments is None else segments:
        mask[slot, p, :numel] = True
    return mask


def test_sentinel_is_negative_zero_in_both_dtypes_and_init_fills_it():
    for dtype in DTYPES:
        assert torch.tensor([-0.0], dtype=dtype).view(torch.int16).item() == SENTINEL
    buf = init_buffer(torch.zeros(64, dtype=torch.uint8))
    assert buf.tolist() == [0x00, 0x80] * 32  # 0x8000, little-endian
    assert buffer_bytes(4, SLOT_BYTES) == 3 * 4 * SLOT_BYTES
    assert new_state("cpu").tolist() == [0, 0, 0]


def test_reference_with_the_negative_zero_caveat():
    xs = [torch.tensor([-0.0, -0.0, 1.0], dtype=torch.bfloat16), torch.tensor([-0.0, 2.0, -1.0], dtype=torch.bfloat16)]
    assert all_reduce_ref(xs).view(torch.int16).tolist() == [SENTINEL, 0x4000, 0]  # -0.0, 2.0, +0.0
    assert expected(xs).view(torch.int16).tolist() == [0, 0x4000, 0]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_one_rank_call_after_call_rotates_slots_and_clears_the_previous_one(dtype):
    """W = 1, the whole path: each call uses the next slot, leaves exactly its own words in it, clears the
    previous call's slot (also after a bigger call than itself: the state keeps the previous numel) and
    counts its programs out. In place and out of place, alternately."""
    ranks = Ranks(1)
    for call, numel in enumerate([7, MULTI_TILE, 1000, 1, 4097, 4096, 5]):
        x = rand(numel, dtype, seed=call)
        in_place = call % 2 == 0
        out = x.clone() if in_place else torch.full_like(x, float("nan"))
        assert ranks.call(0, out if in_place else x, out) is out
        assert torch.equal(out, expected([x])), f"call {call}, numel {numel}"
        assert out[0].view(torch.int16).item() == 0  # -0.0 comes back +0.0
        slot = call % SLOTS
        assert ranks.states[0].tolist() == [(slot + 1) % SLOTS, numel, 0]
        assert torch.equal(ranks.words(0) != SENTINEL, in_use(1, slot, numel)), f"call {call}: stale words"
        assert torch.equal(ranks.words(0)[slot, 0, :numel], pushed(x))


# odd sizes inside one tile, one past a tile; one multi-tile case only (the interpreter is slow)
ALONE_CASES = [(w, n, d) for w in (2, 4) for n in (7, 1000, 4097) for d in DTYPES] + [(4, MULTI_TILE, torch.bfloat16)]


@pytest.mark.timeout(300)  # a word left at the sentinel would spin forever in the interpreter
@pytest.mark.parametrize("world_size, numel, dtype", ALONE_CASES, ids=lambda v: str(v).removeprefix("torch."))
def test_each_rank_alone_with_its_peers_pushes_simulated(world_size, numel, dtype):
    """Rank by rank (the interpreter runs one at a time), in a different slot each, after a previous call of
    another size: the peers' words are put in this rank's current slot beforehand, the previous call's in
    its previous slot. The rank must sum in rank order (wide-range inputs: another order would round
    differently), push its words into segment `rank` of every buffer, clear its previous slot, and advance
    its state."""
    xs = [rand(numel, dtype, seed=10 * world_size + r, wide=True) for r in range(world_size)]
    want = expected(xs)
    for rank in range(world_size):
        ranks = Ranks(world_size)
        slot, prev_numel = (rank + 1) % SLOTS, [numel + 4999, 3][rank % 2]
        prev = (slot + SLOTS - 1) % SLOTS
        ranks.states[rank].copy_(torch.tensor([slot, prev_numel, 0], dtype=torch.int32))
        own = ranks.words(rank)
        own[prev, :, :prev_numel] = 0x1234  # the previous call's words, all seen by then
        for peer in range(world_size):
            if peer != rank:
                own[slot, peer, :numel] = pushed(xs[peer])
        in_place = rank % 2 == 0
        out = xs[rank].clone() if in_place else torch.empty_like(xs[rank])
        ranks.call(rank, out if in_place else xs[rank], out)
        assert torch.equal(out, want), f"rank {rank} of {world_size}"
        assert ranks.states[rank].tolist() == [(slot + 1) % SLOTS, numel, 0]
        assert torch.equal(own != SENTINEL, in_use(world_size, slot, numel)), f"rank {rank}: own buffer"
        for peer in range(world_size):
            assert torch.equal(ranks.words(peer)[slot, rank, :numel], pushed(xs[rank])), f"rank {rank} -> {peer}"
            if peer != rank:
                mask = in_use(world_size, slot, numel, segments=[rank])
                assert torch.equal(ranks.words(peer) != SENTINEL, mask), f"rank {rank} wrote elsewhere on {peer}"


def test_separate_out_leaves_x_alone():
    ranks = Ranks(1)
    x = rand(3000, torch.bfloat16, seed=1)
    x_before, out = x.clone(), torch.full_like(x, float("nan"))
    ranks.call(0, x, out)
    assert torch.equal(x, x_before) and torch.equal(out, expected([x]))


def test_launch_refuses_fp32_and_sizes_that_do_not_fit():
    ranks = Ranks(1)
    x = torch.zeros(16, dtype=torch.float32, device=DEVICE)
    with pytest.raises(AssertionError, match="takes bf16 or fp16"):
        ranks.call(0, x, x)
    too_big = torch.zeros(SLOT_BYTES // 2 + 1, dtype=torch.bfloat16, device=DEVICE)
    with pytest.raises(AssertionError, match="do not fit"):
        ranks.call(0, too_big, too_big)
    empty = torch.zeros(0, dtype=torch.bfloat16, device=DEVICE)
    assert ranks.call(0, empty, empty) is empty and ranks.states[0].tolist() == [0, 0, 0]  # no launch, no call


# --------------------------------------------------------------------------- custom_all_reduce wiring


def _one_rank_all_reduce(algo=None):
    """`OneShotAllReduce` of one rank over a stand-in for torch's symmetric-memory handle (64 bytes into its
    allocation, as the handle's offset says), its buffer prepared as `_prepare` leaves it."""
    from types import SimpleNamespace

    from dist_llm.kernels.all_reduce import signal_pad_ints
    from dist_llm.parallel.custom_all_reduce import OneShotAllReduce, buffer_bytes

    alloc = init_buffer(torch.empty(buffer_bytes(1) + 64, dtype=torch.uint8, device=DEVICE))
    pad = torch.zeros(signal_pad_ints(1), dtype=torch.int32, device=DEVICE)
    handle = SimpleNamespace(rank=0, world_size=1, offset=64, buffer_ptrs=[alloc.data_ptr()],
                             signal_pad_ptrs=[pad.data_ptr()], signal_pad_size=pad.nbytes)  # fmt: skip
    kwargs = {} if algo is None else {"algo": algo}
    return OneShotAllReduce(alloc[64:], handle, alloc.device, **kwargs), alloc, pad


def test_one_shot_object_runs_lamport_by_default_and_barrier_on_request():
    from dist_llm.parallel.custom_all_reduce import CAPACITY_BYTES

    ar, alloc, _pad = _one_rank_all_reduce()
    assert ar.algo == "lamport" and ar.capacity == CAPACITY_BYTES == SLOT_BYTES
    bf16, fp32 = rand(5000, torch.bfloat16, seed=3), rand(300, torch.float32, seed=4)
    assert ar.fits(bf16) and ar.fits(bf16.half())
    assert not ar.fits(fp32) and ar.fits(fp32, "barrier")  # fp32 stays on NCCL, or takes the barrier kernel
    assert not ar.fits(torch.zeros(CAPACITY_BYTES // 2 + 1, dtype=torch.bfloat16, device=DEVICE))
    lamport_words = alloc[64 + CAPACITY_BYTES :].view(torch.int16).view(SLOTS, 1, -1)  # after the barrier's region
    for call in range(4):  # interleaved with the barrier kernel, which keeps to its own region
        y = bf16.clone()
        assert ar(y) is y and torch.equal(y, expected([bf16]))
        assert torch.equal(lamport_words[call % SLOTS, 0, : bf16.numel()], pushed(bf16))
        z = fp32.clone()
        assert ar(z, "barrier") is z and torch.equal(z, fp32)
        assert ar.lamport_state.tolist() == [(call + 1) % SLOTS, bf16.numel(), 0]
    assert torch.equal(lamport_words != SENTINEL, in_use(1, 3 % SLOTS, bf16.numel()))  # call 3's words only
    barrier_ar, _, _ = _one_rank_all_reduce("barrier")
    assert barrier_ar.fits(fp32) and barrier_ar(fp32.clone()).equal(fp32)
    with pytest.raises(ValueError, match="choose one of"):
        _one_rank_all_reduce("ring")


def test_algorithm_comes_from_the_env_and_must_agree(monkeypatch):
    import dataclasses

    from dist_llm.parallel import custom_all_reduce as car

    monkeypatch.delenv(car.ALGO_ENV, raising=False)
    assert car._local_facts(0, torch.device("cpu"), 2).algo == "lamport"
    monkeypatch.setenv(car.ALGO_ENV, "barrier")
    assert car._local_facts(0, torch.device("cpu"), 2).algo == "barrier"
    monkeypatch.setenv(car.ALGO_ENV, "ring")
    assert "DIST_LLM_CUSTOM_AR_ALGO='ring'" in car._local_facts(0, torch.device("cpu"), 2).error
    facts = [car.RankFacts(rank=r, host="h", device=r, enabled=True) for r in range(2)]
    assert car.refusal(facts) is None
    assert car.refusal([facts[0], dataclasses.replace(facts[1], algo="barrier")]) == (
        "the tp ranks set DIST_LLM_CUSTOM_AR_ALGO differently: lamport, barrier",
        True,
    )


@pytest.mark.gpu
def test_prepare_fills_the_symmetric_buffer_with_the_sentinel():
    from dist_llm.parallel.custom_all_reduce import _prepare, buffer_bytes

    buf = _prepare(torch.device("cuda", torch.cuda.current_device()), [torch.cuda.current_device()])
    assert buf.nbytes == buffer_bytes(1) and bool((buf.view(torch.int16) == SENTINEL).all())


# ------------------------------------------------------------------------------- GPU: W ranks, one device


def _load_alone(ranks: Ranks, numels, dtype: torch.dtype, launch=None) -> None:
    """Compile and load every simulated rank's kernel variant (for these numels and dtype) before any two
    run at once: loading a kernel may synchronize the device (CUDA lazy loading), which would deadlock
    against a peer already waiting for words. Each rank runs alone, its peers' words put in place first;
    then every buffer and state is reset. `launch(rank, x)` makes the call (default: the plain all-reduce,
    in place)."""
    torch.cuda._sleep(1)  # loaded too: the tests delay ranks with it
    for numel in numels:
        for rank in range(ranks.world_size):
            ranks.reset()
            ranks.words(rank)[0, :, :numel] = 0
            x = torch.zeros(numel, dtype=dtype, device=DEVICE)
            if launch is None:
                ranks.call(rank, x, x)
            else:
                launch(rank, x)
            torch.cuda.synchronize()
    ranks.reset()
    torch.cuda.synchronize()


@pytest.mark.gpu
@pytest.mark.timeout(180, method="thread")  # a lost word hangs inside CUDA: only a thread timeout ends it
@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_simulated_ranks_on_one_gpu(world_size, dtype):
    """Sizes up and down without a reset in between: each call must clear what the previous one left."""
    numels = [1, 4097, 4096 * 8, 140_001, SLOT_BYTES // 2, 4096, 3, MULTI_TILE, 8]
    ranks = Ranks(world_size)
    streams = [torch.cuda.Stream() for _ in range(world_size)]
    _load_alone(ranks, numels, dtype)
    call = 0
    for numel in numels:
        for it in range(3):  # new data every call: a stale word of an earlier call would show
            xs = [rand(numel, dtype, seed=1000 * it + 10 * r + world_size, wide=it == 1) for r in range(world_size)]
            outs = [x.clone() for x in xs]
            launch_on_streams(ranks.call, outs, outs, streams, delay_rank=call % (world_size + 1))  # in place
            torch.cuda.synchronize()
            want = expected(xs)
            for rank, out in enumerate(outs):
                assert torch.equal(out, want), f"rank {rank} of {world_size}, numel {numel}, call {call}"
            call += 1
    slot = (call - 1) % SLOTS
    for rank in range(world_size):
        assert ranks.states[rank].tolist() == [call % SLOTS, numels[-1], 0]
        assert torch.equal(ranks.words(rank) != SENTINEL, in_use(world_size, slot, numels[-1])), f"rank {rank}"


@pytest.mark.gpu
@pytest.mark.timeout(180, method="thread")
@pytest.mark.parametrize("world_size", [2, 4])
def test_ranks_running_calls_ahead_of_each_other(world_size):
    """Each rank's calls enqueued in one go, rank after rank, with a late start: a rank may finish call c
    and push call c + 1 into a peer that is still in call c (the case the third slot is for)."""
    dtype, numel, calls = torch.bfloat16, 4096 * 2 + 5, 12
    ranks = Ranks(world_size)
    _load_alone(ranks, [numel], dtype)
    streams = [torch.cuda.Stream() for _ in range(world_size)]
    xs = [rand(numel, dtype, seed=r) for r in range(world_size)]
    bufs = [x.clone() for x in xs]
    main = torch.cuda.current_stream()
    for rank, stream in enumerate(streams):
        stream.wait_stream(main)
        with torch.cuda.stream(stream):
            torch.cuda._sleep(50_000 * rank)
            for _ in range(calls):
                ranks.call(rank, bufs[rank], bufs[rank])  # each call reduces the previous call's result
    for stream in streams:
        main.wait_stream(stream)
    torch.cuda.synchronize()
    want = xs
    for _ in range(calls):
        want = [expected(want)] * world_size
    for rank, buf in enumerate(bufs):
        assert torch.equal(buf, want[0]), f"rank {rank}"


@pytest.mark.gpu
@pytest.mark.timeout(180, method="thread")
@pytest.mark.parametrize("world_size", [2, 4])
def test_simulated_ranks_replayed_from_a_cuda_graph(world_size):
    """The same launches, captured once per rank in one graph (a branch per rank, 8 calls in a row each),
    replayed with new inputs: the slot and the clears advance on the device, with no host help."""
    dtype, numel, calls = torch.bfloat16, 4096 * 4 + 5, 8
    ranks = Ranks(world_size)
    streams = [torch.cuda.Stream() for _ in range(world_size)]
    bufs = [torch.zeros(numel, dtype=dtype, device=DEVICE) for _ in range(world_size)]
    _load_alone(ranks, [numel], dtype)
    launch_on_streams(ranks.call, bufs, bufs, streams)  # an eager round before the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            launch_on_streams(ranks.call, bufs, bufs, streams)
    for it in range(4):  # 8 calls a replay: the slot goes round 3 times and lands somewhere else each time
        xs = [rand(numel, dtype, seed=100 * it + r) for r in range(world_size)]
        for buf, x in zip(bufs, xs):
            buf.copy_(x)
        want = xs
        for _ in range(calls):  # the graph all-reduces its own result again, `calls` times
            want = [expected(want)] * world_size
        graph.replay()
        torch.cuda.synchronize()
        for rank, buf in enumerate(bufs):
            assert torch.equal(buf, want[0]), f"rank {rank}, replay {it}"
        done = 1 + calls * (it + 1)
        assert all(s.tolist() == [done % SLOTS, numel, 0] for s in ranks.states)


# ------------------------------------------------------------------- the all-reduce fused with add + RMSNorm

EPS = 1e-5


def _norm_inputs(rows: int, hidden: int, dtype: torch.dtype, seed: int, w_dtype=None):
    g = torch.Generator().manual_seed(seed)
    residual = torch.randn(rows, hidden, generator=g).to(dtype).to(DEVICE)
    weight = (1.0 + 0.1 * torch.randn(hidden, generator=g)).to(w_dtype or dtype).to(DEVICE)
    return residual, weight


def _unfused(summed: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor):
    """What the two launches leave: the all-reduce's result, then `fused_add_rms_norm` in place."""
    from dist_llm.kernels.rmsnorm import fused_add_rms_norm

    x, res = summed.clone(), residual.clone()
    fused_add_rms_norm(x, res, weight, EPS)
    return x, res


class NormRanks(Ranks):
    def call_norm(self, rank: int, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor) -> None:
        lamport_all_reduce_rms_norm(
            x, residual, weight, EPS, self.buffer_ptrs, self.states[rank], rank, self.world_size, SLOT_BYTES
        )


# (rows, hidden): one row and a few; past the 32-program grid (rows loop); odd widths; a 70B-wide row
NORM_SHAPES = [(1, 64), (3, 1000), (2, 4096), (35, 40), (1, 8192)]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_fused_norm_one_rank_equals_all_reduce_then_norm_and_shares_the_state(dtype):
    """W = 1, interleaved with the plain all-reduce on one state: bit for bit the two launches it replaces
    (x and residual), the slot and previous numel advanced alike, the previous slot cleared."""
    ranks = NormRanks(1)
    for call, (rows, hidden) in enumerate(NORM_SHAPES + [(1, 7)]):
        w_dtype = torch.float32 if call == 1 else None  # the weight's dtype wins the product: no rounding to x's
        residual, weight = _norm_inputs(rows, hidden, dtype, seed=call, w_dtype=w_dtype)
        x = rand(rows * hidden, dtype, seed=call).view(rows, hidden)
        want_x, want_res = _unfused(expected([x.view(-1)]).view(rows, hidden), residual, weight)
        got_x, got_res = x.clone(), residual.clone()
        ranks.call_norm(0, got_x, got_res, weight)
        assert torch.equal(got_res, want_res) and torch.equal(got_x, want_x), f"call {call}, {rows}x{hidden}"
        numel = rows * hidden
        assert ranks.states[0].tolist() == [(2 * call + 1) % SLOTS, numel, 0]
        assert torch.equal(ranks.words(0) != SENTINEL, in_use(1, (2 * call) % SLOTS, numel)), f"call {call}"
        y = rand(333, dtype, seed=99)  # a plain call in between, on the same state
        assert torch.equal(ranks.call(0, y.clone(), torch.empty_like(y)), expected([y]))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world_size", [2, 4])
def test_fused_norm_each_rank_alone_with_its_peers_pushes_simulated(world_size):
    """As the plain kernel's test: each rank alone, its peers' words in place; it must leave the unfused
    pair's x and residual, and push its own x (not the normed one) into every peer's buffer."""
    rows, hidden, dtype = 3, 1000, torch.bfloat16
    numel = rows * hidden
    xs = [rand(numel, dtype, seed=7 * world_size + r, wide=True) for r in range(world_size)]
    residual, weight = _norm_inputs(rows, hidden, dtype, seed=world_size)
    want_x, want_res = _unfused(expected(xs).view(rows, hidden), residual, weight)
    for rank in range(world_size):
        ranks = NormRanks(world_size)
        slot = (rank + 2) % SLOTS
        ranks.states[rank].copy_(torch.tensor([slot, numel + 17, 0], dtype=torch.int32))
        own = ranks.words(rank)
        own[(slot + SLOTS - 1) % SLOTS, :, : numel + 17] = 0x1234
        for peer in range(world_size):
            if peer != rank:
                own[slot, peer, :numel] = pushed(xs[peer])
        x, res = xs[rank].clone().view(rows, hidden), residual.clone()
        ranks.call_norm(rank, x, res, weight)
        assert torch.equal(res, want_res) and torch.equal(x, want_x), f"rank {rank} of {world_size}"
        assert ranks.states[rank].tolist() == [(slot + 1) % SLOTS, numel, 0]
        assert torch.equal(own != SENTINEL, in_use(world_size, slot, numel)), f"rank {rank}: own buffer"
        for peer in range(world_size):
            assert torch.equal(ranks.words(peer)[slot, rank, :numel], pushed(xs[rank])), f"rank {rank} -> {peer}"


def test_fused_norm_refuses_what_it_cannot_take():
    from dist_llm.kernels.lamport_all_reduce import MAX_NORM_HIDDEN, rms_norm_fits

    x = torch.zeros(2, 64, dtype=torch.bfloat16, device=DEVICE)
    res, w = torch.zeros_like(x), torch.ones(64, dtype=torch.bfloat16, device=DEVICE)
    assert rms_norm_fits(x, res, w, SLOT_BYTES)
    assert not rms_norm_fits(x.float(), res.float(), w, SLOT_BYTES)  # fp32: no sentinel
    assert not rms_norm_fits(x, res.half(), w, SLOT_BYTES)
    assert not rms_norm_fits(x, res, w[:32], SLOT_BYTES)
    assert not rms_norm_fits(x.t(), res.t(), torch.ones(2, dtype=torch.bfloat16, device=DEVICE), SLOT_BYTES)
    wide = torch.zeros(1, MAX_NORM_HIDDEN + 8, dtype=torch.bfloat16, device=DEVICE)
    assert not rms_norm_fits(wide, wide, torch.ones(wide.shape[1], device=DEVICE), 1 << 20)
    assert not rms_norm_fits(x, res, w, 64)  # does not fit the segment
    with pytest.raises(AssertionError, match="see rms_norm_fits"):
        NormRanks(1).call_norm(0, x, res.half(), w)


@pytest.mark.gpu
@pytest.mark.timeout(180, method="thread")
@pytest.mark.parametrize("world_size", [2, 4])
def test_fused_norm_simulated_ranks_on_one_gpu_and_in_a_graph(world_size):
    """Concurrent simulated ranks, eagerly (interleaved with plain calls, one of them late) and replayed
    from a CUDA graph: every rank leaves the unfused pair's bits."""
    dtype, rows, hidden = torch.bfloat16, 5, 4096
    ranks = NormRanks(world_size)
    streams = [torch.cuda.Stream() for _ in range(world_size)]
    residual, weight = _norm_inputs(rows, hidden, dtype, seed=5)
    xs = [torch.zeros(rows, hidden, dtype=dtype, device=DEVICE) for _ in range(world_size)]
    ress = [residual.clone() for _ in range(world_size)]
    _load_alone(ranks, [rows * hidden], dtype,
                lambda rank, x: ranks.call_norm(rank, x.view(rows, hidden), residual.clone(), weight))  # fmt: skip
    _load_alone(ranks, [rows * hidden], dtype)

    def norm_call(rank, x, res):
        ranks.call_norm(rank, x, res, weight)

    def check(inputs, tag):
        want_x, want_res = _unfused(expected([x.view(-1) for x in inputs]).view(rows, hidden), residual, weight)
        for rank in range(world_size):
            assert torch.equal(ress[rank], want_res) and torch.equal(xs[rank], want_x), f"rank {rank}, {tag}"

    for it in range(3):
        inputs = [rand(rows * hidden, dtype, seed=10 * it + r, wide=it == 1).view(rows, hidden)
                  for r in range(world_size)]  # fmt: skip
        for rank in range(world_size):
            xs[rank].copy_(inputs[rank])
            ress[rank].copy_(residual)
        launch_on_streams(norm_call, xs, ress, streams, delay_rank=it % (world_size + 1))
        torch.cuda.synchronize()
        check(inputs, f"eager {it}")
        plain = [x.view(-1).clone() for x in inputs]
        launch_on_streams(ranks.call, plain, plain, streams)  # a plain call in between
        torch.cuda.synchronize()
        assert all(torch.equal(p, expected([x.view(-1) for x in inputs])) for p in plain)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        launch_on_streams(norm_call, xs, ress, streams)
    for it in range(4):  # one call per replay: the slot moves on each time
        inputs = [rand(rows * hidden, dtype, seed=100 + 10 * it + r).view(rows, hidden) for r in range(world_size)]
        for rank in range(world_size):
            xs[rank].copy_(inputs[rank])
            ress[rank].copy_(residual)
        graph.replay()
        torch.cuda.synchronize()
        check(inputs, f"replay {it}")


def test_one_shot_object_fuses_the_norm_with_lamport_unless_switched_off(monkeypatch):
    """The Lamport kernel and DIST_LLM_AR_NORM unset or 1: bit for bit the two launches; with =0, or the barrier
    kernel, or fp32, nothing is done."""
    from dist_llm.parallel.custom_all_reduce import NORM_ENV

    rows, hidden, dtype = 2, 96, torch.bfloat16
    residual, weight = _norm_inputs(rows, hidden, dtype, seed=11)
    x = rand(rows * hidden, dtype, seed=12).view(rows, hidden)
    want_x, want_res = _unfused(expected([x.view(-1)]).view(rows, hidden), residual, weight)
    for value in (None, "1"):  # on by default
        if value is None:
            monkeypatch.delenv(NORM_ENV, raising=False)
        else:
            monkeypatch.setenv(NORM_ENV, value)
        ar, _, _ = _one_rank_all_reduce()
        got_x, got_res = x.clone(), residual.clone()
        assert ar.add_rms_norm(got_x, got_res, weight, EPS)
        assert torch.equal(got_x, want_x) and torch.equal(got_res, want_res)
        assert ar.lamport_state.tolist() == [1, rows * hidden, 0]
        assert not ar.add_rms_norm(x.float(), residual.float(), weight, EPS)  # fp32: not the Lamport kernel's
    assert not _one_rank_all_reduce("barrier")[0].add_rms_norm(x.clone(), residual.clone(), weight, EPS)
    monkeypatch.setenv(NORM_ENV, "0")
    untouched = x.clone()
    assert not _one_rank_all_reduce()[0].add_rms_norm(untouched, residual.clone(), weight, EPS)
    assert torch.equal(untouched, x)
