"""Requests as the coordinator sees them."""

from __future__ import annotations

import enum
import itertools
import math
import time
from dataclasses import dataclass, field, replace

from dist_llm.errors import DistLLMError

MAX_TOP_LOGPROBS = 20  # OpenAI's limit


@dataclass
class SamplingParams:
    max_new_tokens: int = 16
    # sequences sampled for the prompt: OpenAI's and vLLM's n, TensorRT-LLM's num_return_sequences (see `fan_out`)
    n: int = 1
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off: keep tokens at least min_p times as likely as the likeliest (vLLM's, before top-k/p)
    seed: int | None = None  # None with temperature > 0: a random seed is drawn at admission
    # a stop token (here, EOS or end_id) finishes with "stop"; as in vLLM it stays in the output token ids
    # but its text is left out of the output text
    stop_token_ids: list[int] = field(default_factory=list)
    stop: list[str] = field(default_factory=list)  # stop strings; the match and what follows are cut from the text
    end_id: int | None = None  # overrides the engine's EOS ids; -1 disables EOS stopping
    # TensorRT-LLM's output layout: output ids padded with pad_id to max_new_tokens (None: no padding)
    pad_id: int | None = None
    ignore_eos: bool = False
    # text (runtime/detokenizer.py), as vLLM: keep the stop token's text or the stop string in the output text;
    # leave special tokens' text out of it
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    # vLLM's and TensorRT-LLM's logits processing (runtime/logits_processing.py): the repetition penalty (1 = off)
    # scales the logits of every token already in the prompt or the output, as transformers does; the presence
    # and frequency penalties (0 = off, OpenAI's -2..2) subtract from the logits of tokens already in the output
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_tokens: int = 0  # no stop token (EOS, end_id, stop_token_ids) and no stop string before this many tokens
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit (OpenAI's)
    # token sequences never to generate (transformers' bad_words_ids, TensorRT-LLM's bad_words_list): the last token
    # of each is banned wherever the tokens before it (prompt included) end the sequence so far
    bad_words_ids: list[list[int]] = field(default_factory=list)
    return_logprobs: bool = False  # of each returned token, from the model's logits before any processing
    top_logprobs: int = 0  # with return_logprobs: also the k most likely ids of each step and theirs (OpenAI's, <= 20)
    # the log-probability of each prompt token after the first, given the ones before (vLLM's prompt_logprobs=0,
    # TensorRT-LLM's context logits reduced): its prompt is computed in full, not taken from the prefix cache
    prompt_logprobs: bool = False
    return_first_logits: bool = False  # debugging: the logits that chose the first new token
    # beam search (runtime/beam_search.py), transformers' num_beams, length_penalty and early_stopping (False, True
    # or "never"); n <= num_beams hypotheses come back, best first. Greedy only: no sampling, penalties or stop strings
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False

    def __post_init__(self):
        if not isinstance(self.n, int) or self.n < 1:
            raise DistLLMError(f"n (sequences per prompt) must be an integer >= 1, got {self.n!r}")
        if self.max_new_tokens < 1:
            raise DistLLMError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise DistLLMError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise DistLLMError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise DistLLMError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise DistLLMError(f"min_p must be in [0, 1] (0 = off), got {self.min_p}")
        if self.pad_id is not None and self.pad_id < 0:
            raise DistLLMError(f"pad_id must be a token id >= 0, got {self.pad_id}")
        if not (self.repetition_penalty > 0 and math.isfinite(self.repetition_penalty)):
            raise DistLLMError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise DistLLMError(f"{name} must be in [-2, 2] (0 = off), got {getattr(self, name)}")
        if not 0 <= self.min_tokens <= self.max_new_tokens:
            raise DistLLMError(
                f"min_tokens must be in [0, max_new_tokens = {self.max_new_tokens}], got {self.min_tokens}"
            )
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise DistLLMError(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs}")
        if self.top_logprobs and not self.return_logprobs:
            raise DistLLMError("top_logprobs needs return_logprobs=True (--return_logprobs)")
        self._check_beams()
        try:  # JSON (the OpenAI API) gives the token ids as strings
            self.logit_bias = {int(t): float(b) for t, b in self.logit_bias.items()}
        except (AttributeError, TypeError, ValueError):
            raise DistLLMError(f"logit_bias must map token ids to numbers, got {self.logit_bias!r}") from None
        if not (isinstance(self.bad_words_ids, list | tuple) and all(
                isinstance(w, list | tuple) and w and all(isinstance(t, int) and t >= 0 for t in w)
                for w in self.bad_words_ids)):
            raise DistLLMError(f"bad_words_ids must be a list of non-empty lists of token ids >= 0, "
                               f"got {self.bad_words_ids!r}")
        self.bad_words_ids = [list(w) for w in self.bad_words_ids]
        bad = next(((t, b) for t, b in self.logit_bias.items() if t < 0 or not math.isfinite(b)), None)
        if bad:
            raise DistLLMError(f"logit_bias {{{bad[0]}: {bad[1]}}}: token ids must be >= 0 and biases finite")

    def _check_beams(self) -> None:
        if not isinstance(self.num_beams, int) or self.num_beams < 1:
            raise DistLLMError(f"num_beams must be an integer >= 1, got {self.num_beams!r}")
        if self.early_stopping not in (False, True, "never"):
            raise DistLLMError(f"early_stopping must be false, true or 'never', got {self.early_stopping!r}")
        if not math.isfinite(self.length_penalty):
            raise DistLLMError(f"length_penalty must be a finite number, got {self.length_penalty}")
        if self.num_beams == 1:
            return
        if self.n > self.num_beams:
            raise DistLLMError(f"n ({self.n}) must be <= num_beams ({self.num_beams}): a beam search returns its "
                               "best num_beams hypotheses at most")
        unsupported = [name for name, on in (
            ("temperature > 0", self.temperature > 0), ("repetition_penalty", self.repetition_penalty != 1),
            ("presence_penalty", self.presence_penalty != 0), ("frequency_penalty", self.frequency_penalty != 0),
            ("logit_bias", bool(self.logit_bias)), ("min_tokens", self.min_tokens > 0), ("stop", bool(self.stop)),
            ("bad_words_ids", bool(self.bad_words_ids)),
            ("return_logprobs", self.return_logprobs), ("return_first_logits", self.return_first_logits),
            ("prompt_logprobs", self.prompt_logprobs)) if on]
        if unsupported:
            raise DistLLMError(f"beam search (num_beams {self.num_beams}) is greedy and takes none of: "
                               f"{', '.join(unsupported)}; drop them or use num_beams 1")

    @property
    def uses_penalties(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0

    @property
    def processes_logits(self) -> bool:
        """Whether any logits processing (runtime/logits_processing.py) may apply to this request."""
        return self.uses_penalties or bool(self.logit_bias) or self.min_tokens > 0 or bool(self.bad_words_ids)


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_ids = itertools.count()

# A token that a launched step will sample but whose id the host has not seen yet (overlap scheduling):
# it is always at the end of token_ids, and the next step reads it from the device.
PENDING = -1


class Sequence:
    def __init__(self, prompt_token_ids: list[int], params: SamplingParams, request_id: int | None = None,
                 priority: int = 0):  # fmt: skip
        self.request_id = next(_ids) if request_id is None else request_id
        self.priority = priority  # with the "priority" scheduling policy: lower runs first (vLLM's meaning)
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
        self.stop_string: str | None = None  # the stop string that finished it (vLLM's stop_reason)
        self.logprobs: list[float] = []
        self.top_logprobs: list[list[tuple[int, float]]] = []  # per output token: (id, log-prob), most likely first
        self.prompt_logprobs: list[float] = []  # with params.prompt_logprobs: of prompt tokens 1, 2, ... so far
        self.first_logits = None
        self.num_preemptions = 0
        self.arrival_time = time.perf_counter()
        self.first_scheduled_time: float | None = None  # first admission (perf_counter, like the other times)
        self.first_token_time: float | None = None
        self.finished_time: float | None = None
        self.token_times: list[float] = []
        self.seed = params.seed
        self.feed: tuple[int, int] | None = None  # (launch number, row) that samples the newest PENDING token
        self.num_pending = 0  # PENDING tokens at the end of token_ids
        self.num_drafts = 0  # speculative draft tokens at the end of token_ids, in a step in flight (speculative.py)
        self.spec_skip = 0  # decode steps to run (overlapped) before drafting again, after lookups that found nothing
        self.spec_misses = 0  # such lookups in a row
        self.sequence_index = 0  # which of its prompt's params.n sequences this is
        # sequence 0 of the prompt, for the others (fan_out): they are admitted once it has computed the prompt
        self.prefix_source: Sequence | None = None

    def drop_pending(self) -> None:
        """Forget tokens still in flight (the request finished before they came back), speculative drafts too."""
        if self.num_pending or self.num_drafts:
            del self.token_ids[-(self.num_pending + self.num_drafts) :]
        self.num_pending, self.feed, self.num_drafts = 0, None, 0

    @property
    def output_token_ids(self) -> list[int]:
        """The generated tokens the host has seen (not those still in flight, nor drafts being checked)."""
        return self.token_ids[self.prompt_len : len(self.token_ids) - self.num_pending - self.num_drafts]

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.prompt_len - self.num_pending - self.num_drafts

    @property
    def num_sampled(self) -> int:
        """Generated tokens, those still in flight included (what the scheduler plans with)."""
        return len(self.token_ids) - self.prompt_len

    @property
    def reuses_prefix(self) -> bool:
        """Whether the prefix cache may serve its prompt (not when the prompt's log-probabilities are asked for)."""
        return not self.params.prompt_logprobs

    @property
    def is_finished(self) -> bool:
        return self.status == Status.FINISHED

    def __len__(self) -> int:
        return len(self.token_ids)

    def __repr__(self) -> str:
        done = self.num_computed_tokens
        return f"Sequence(id={self.request_id}, len={len(self)}, computed={done}, {self.status.value})"


def fan_out(prompt_token_ids: list[int], params: SamplingParams, priority: int = 0) -> list[Sequence]:
    """The `params.n` sequences of one prompt, each a request of its own to the executor (as vLLM runs n).

    Sequence j samples with seed + j when a seed is given (vLLM's rule), so each is reproducible on its own
    and they differ from each other; without a seed each draws its own at admission. Sequences 1..n-1 name
    sequence 0 as their `prefix_source`: the scheduler admits them once it has computed the prompt, and the
    prefix cache then serves them every full block of it (only the last, partial block is computed again).
    """
    first = Sequence(prompt_token_ids, params, priority=priority)
    seqs = [first]
    for j in range(1, params.n):
        seq = Sequence(prompt_token_ids, params if params.seed is None else replace(params, seed=params.seed + j),
                       priority=priority)
        seq.sequence_index, seq.prefix_source = j, first
        seqs.append(seq)
    return seqs
