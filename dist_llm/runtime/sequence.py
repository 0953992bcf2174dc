"""Requests as the coordinator sees them."""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field

from dist_llm.errors import DistLLMError


@dataclass
class SamplingParams:
    max_new_tokens: int = 16
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int | None = None  # None with temperature > 0: a random seed is drawn at admission
    # a stop token (here, EOS or end_id) finishes with "stop"; as in vLLM it stays in the output token ids
    # but its text is left out of the output text
    stop_token_ids: list[int] = field(default_factory=list)
    stop: list[str] = field(default_factory=list)  # stop strings; the match and what follows are cut from the text
    end_id: int | None = None  # overrides the engine's EOS ids; -1 disables EOS stopping
    # TensorRT-LLM's output layout: output ids padded with pad_id to max_new_tokens (None: no padding)
    pad_id: int | None = None
    ignore_eos: bool = False
    return_logprobs: bool = False
    return_first_logits: bool = False  # debugging: the logits that chose the first new token

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise DistLLMError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise DistLLMError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise DistLLMError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise DistLLMError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.pad_id is not None and self.pad_id < 0:
            raise DistLLMError(f"pad_id must be a token id >= 0, got {self.pad_id}")


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_ids = itertools.count()

# A token that a launched step will sample but whose id the host has not seen yet (overlap scheduling):
# it is always at the end of token_ids, and the next step reads it from the device.
PENDING = -1


class Sequence:
    def __init__(self, prompt_token_ids: list[int], params: SamplingParams, request_id: int | None = None):
        self.request_id = next(_ids) if request_id is None else request_id
        self.params = params
        self.prompt_len = len(prompt_token_ids)
        self.token_ids = list(prompt_token_ids)
        self.num_computed_tokens = 0
        self.block_table: list[int] = []
        self.num_cached_tokens = 0
        self.reported_cached_tokens = 0  # prompt tokens served from the prefix cache (first admission)
        self.status = Status.WAITING
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.stopped_on_token = False  # finished by a stop token (stop_token_ids, EOS, end_id)
        self.logprobs: list[float] = []
        self.first_logits = None
        self.num_preemptions = 0
        self.arrival_time = time.perf_counter()
        self.first_token_time: float | None = None
        self.token_times: list[float] = []
        self.seed = params.seed
        self.feed: tuple[int, int] | None = None  # (launch number, row) that samples the newest PENDING token
        self.num_pending = 0  # PENDING tokens at the end of token_ids

    def drop_pending(self) -> None:
        """Forget tokens still in flight (the request finished before they came back)."""
        if self.num_pending:
            del self.token_ids[-self.num_pending :]
        self.num_pending, self.feed = 0, None

    @property
    def output_token_ids(self) -> list[int]:
        """The generated tokens the host has seen (not those still in flight)."""
        return self.token_ids[self.prompt_len : len(self.token_ids) - self.num_pending]

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.prompt_len - self.num_pending

    @property
    def num_sampled(self) -> int:
        """Generated tokens, those still in flight included (what the scheduler plans with)."""
        return len(self.token_ids) - self.prompt_len

    @property
    def is_finished(self) -> bool:
        return self.status == Status.FINISHED

    def __len__(self) -> int:
        return len(self.token_ids)

    def __repr__(self) -> str:
        done = self.num_computed_tokens
        return f"Sequence(id={self.request_id}, len={len(self)}, computed={done}, {self.status.value})"
