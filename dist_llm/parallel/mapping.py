"""Where a rank sits in the tp × pp grid, and which layers and shards it owns.

Rank order is pp-major, tp-minor: rank = pp_rank * tp_size + tp_rank, so the ranks of one pipeline
stage are neighbours (on one node when tp_size <= GPUs per node).
"""

from __future__ import annotations

from dataclasses import dataclass

from dist_llm.errors import DistLLMError


def layer_range(num_layers: int, pp_size: int, pp_rank: int) -> tuple[int, int]:
    """Contiguous, balanced layer ranges; earlier stages take the remainder."""
    if pp_size > num_layers:
        raise DistLLMError(f"pp_size={pp_size} exceeds the model's {num_layers} layers; use --pp_size <= {num_layers}")
    base, extra = divmod(num_layers, pp_size)
    start = pp_rank * base + min(pp_rank, extra)
    return start, start + base + (1 if pp_rank < extra else 0)


@dataclass(frozen=True)
class Mapping:
    tp_size: int = 1
    pp_size: int = 1
    rank: int = 0

    def __post_init__(self):
        if not 0 <= self.rank < self.world_size:
            raise DistLLMError(f"rank {self.rank} is outside world size {self.world_size}")

    @property
    def world_size(self) -> int:
        return self.tp_size * self.pp_size

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp_size

    @property
    def pp_rank(self) -> int:
        return self.rank // self.tp_size

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    def stage_ranks(self, pp_rank: int) -> list[int]:
        return [pp_rank * self.tp_size + t for t in range(self.tp_size)]

    def peer_in_stage(self, pp_rank: int) -> int:
        """The rank with this rank's tp_rank in stage `pp_rank` (pipeline send/recv partner)."""
        return pp_rank * self.tp_size + self.tp_rank

    @property
    def sampler_rank(self) -> int:
        """The rank that reports sampled tokens to the coordinator: tp rank 0 of the last stage."""
        return (self.pp_size - 1) * self.tp_size

    def layer_range(self, num_layers: int) -> tuple[int, int]:
        return layer_range(num_layers, self.pp_size, self.pp_rank)
