"""What the coordinator can say about itself: iteration stats, per-request metrics and a periodic log line.

* `Executor.stats()` returns an `IterationStats`: TensorRT-LLM's `getLatestIterationStats` (the last step's
  context and generation requests and tokens, its latency; the KV pool's blocks in use, free and reusable, with
  the prefix cache's hit rate) and vLLM's scheduler stats (running, waiting, preemptions, token totals). A server's
  metrics endpoint reads it.
* `RequestMetrics` is vLLM's `RequestOutput.metrics`: when a request arrived, was first scheduled, got its first
  token and finished, as wall-clock times, with the durations users compare (time in queue, TTFT, TPOT, latency).
* `StatsLogger` writes vLLM's periodic line (prompt and generation throughput over the interval, running and
  waiting requests, KV cache usage, prefix cache hit rate) every `interval` seconds while there is work.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field

log = logging.getLogger("dist_llm")


@dataclass
class KvCacheStats:
    """The KV pool now (TensorRT-LLM's KvCacheStats names), and the prefix cache's record since start-up."""

    max_num_blocks: int
    free_num_blocks: int  # free or holding evictable cached KV: what can be handed out now
    used_num_blocks: int  # referenced by a request
    tokens_per_block: int
    cached_num_blocks: int  # holding reusable KV (in use or evictable)
    reused_blocks: int  # blocks served from the prefix cache at admission, in total
    missed_blocks: int  # full prompt blocks looked up and not found, in total
    prefix_queried_tokens: int  # prompt tokens looked up in the prefix cache, in total
    prefix_hit_tokens: int  # of them, served from it

    @property
    def usage(self) -> float:
        """Fraction of the pool referenced by requests (vLLM's "KV cache usage")."""
        return self.used_num_blocks / self.max_num_blocks

    @property
    def cache_hit_rate(self) -> float:
        """Prompt tokens served from the prefix cache / prompt tokens looked up (0 before any lookup)."""
        return self.prefix_hit_tokens / self.prefix_queried_tokens if self.prefix_queried_tokens else 0.0


@dataclass
class IterationStats:
    iteration: int  # steps completed
    timestamp: float  # time.time() when taken
    num_running: int  # admitted, holding KV blocks
    num_waiting: int  # queued (new or preempted)
    num_in_flight_steps: int
    # the last completed step (TensorRT-LLM's inflight-batching stats)
    num_scheduled_requests: int
    num_context_requests: int  # rows computing prompt tokens (a prefill chunk, or a recomputation)
    num_context_tokens: int
    num_generation_requests: int  # rows decoding one token
    iter_latency_ms: float  # from the step's launch to its tokens on the host
    # totals since start-up
    prompt_tokens: int  # prompt tokens computed (recomputed ones after a preemption included)
    generation_tokens: int  # tokens sampled and returned
    num_finished: int
    num_preemptions: int
    kv: KvCacheStats
    # speculative decoding (runtime/speculative.py), in total: draft tokens proposed and accepted, the steps of a
    # request that checked drafts, and of those how many kept a draft at position 1, 2, ... (vLLM's spec decoding
    # metrics)
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_drafting_steps: int = 0
    accepted_per_position: list[int] = field(default_factory=list)

    @property
    def draft_acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens a drafting step gives: 1 + the drafts it keeps, on average (0 before any)."""
        return 1 + self.num_accepted_tokens / self.num_drafting_steps if self.num_drafting_steps else 0.0

    @property
    def acceptance_per_position(self) -> list[float]:
        """Of the drafting steps, the fraction that kept draft 1, draft 2, ..."""
        n = self.num_drafting_steps
        return [a / n for a in self.accepted_per_position] if n else []

    def to_json(self) -> dict:
        out = asdict(self)
        out["kv"].update(usage=self.kv.usage, cache_hit_rate=self.kv.cache_hit_rate)
        out.update(draft_acceptance_rate=self.draft_acceptance_rate, mean_acceptance_length=self.mean_acceptance_length,
                   acceptance_per_position=self.acceptance_per_position)
        return out


@dataclass
class RequestMetrics:
    """One request's timeline (vLLM's RequestMetrics): wall-clock times from time.time(), durations in seconds."""

    arrival_time: float
    first_scheduled_time: float | None  # admitted for the first time (None: never, e.g. rejected)
    first_token_time: float | None
    finished_time: float | None
    num_preemptions: int
    num_generated_tokens: int

    @property
    def time_in_queue(self) -> float | None:
        return None if self.first_scheduled_time is None else self.first_scheduled_time - self.arrival_time

    @property
    def ttft(self) -> float | None:
        """Time to first token, from arrival."""
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def e2e_latency(self) -> float | None:
        return None if self.finished_time is None else self.finished_time - self.arrival_time

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first (vLLM's TPOT); None with fewer than two tokens."""
        if self.finished_time is None or self.first_token_time is None or self.num_generated_tokens < 2:
            return None
        return (self.finished_time - self.first_token_time) / (self.num_generated_tokens - 1)

    def to_json(self) -> dict:
        return {**asdict(self), "time_in_queue": self.time_in_queue, "ttft": self.ttft,
                "e2e_latency": self.e2e_latency, "tpot": self.tpot}


class WallClock:
    """perf_counter instants (what the runtime records: monotonic) as time.time() values."""

    def __init__(self):
        self.offset = time.time() - time.perf_counter()

    def __call__(self, perf: float | None) -> float | None:
        return None if perf is None else perf + self.offset


class StatsLogger:
    """Logs a line every `interval` seconds from the stats the executor keeps (vLLM's LoggingStatLogger)."""

    def __init__(self, interval: float):
        self.interval = interval
        self.last_time = time.perf_counter()
        self.last_prompt = self.last_generation = 0

    def maybe_log(self, stats_fn, force: bool = False) -> str | None:
        """Log (and return) the line when `interval` seconds have passed since the last one, or when forced."""
        now = time.perf_counter()
        elapsed = now - self.last_time
        if not force and elapsed < self.interval:
            return None
        s: IterationStats = stats_fn()
        prompt = (s.prompt_tokens - self.last_prompt) / max(elapsed, 1e-9)
        generation = (s.generation_tokens - self.last_generation) / max(elapsed, 1e-9)
        self.last_time, self.last_prompt, self.last_generation = now, s.prompt_tokens, s.generation_tokens
        line = (f"Avg prompt throughput: {prompt:.1f} tokens/s, Avg generation throughput: {generation:.1f} tokens/s, "
                f"Running: {s.num_running} reqs, Waiting: {s.num_waiting} reqs, Preempted: {s.num_preemptions} "
                f"in all, KV cache usage: {100 * s.kv.usage:.1f}%, Prefix cache hit rate: "
                f"{100 * s.kv.cache_hit_rate:.1f}%")
        if s.num_draft_tokens:
            line += (f", Draft acceptance rate: {100 * s.draft_acceptance_rate:.1f}%, Mean acceptance length: "
                     f"{s.mean_acceptance_length:.2f}, Per-position acceptance rate: "
                     f"{', '.join(f'{r:.2f}' for r in s.acceptance_per_position)}")
        log.info(line)
        return line
