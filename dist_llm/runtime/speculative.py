"""Speculative decoding by n-gram lookup (vLLM's "ngram" method, TensorRT-LLM's prompt-lookup decoding), and how
a step checks drafts, whatever proposes them (a draft model: runtime/draft_model.py).

A request that is decoding proposes up to `num_speculative_tokens` draft tokens: the tokens that followed the most
recent earlier occurrence of its last n tokens (prompt and output), for n from `prompt_lookup_max` down to
`prompt_lookup_min`. One step then computes its newest token and the drafts together, as a short prefill chunk,
and samples at each of those positions: the token after the newest one, after draft 1, and so on. The drafts are
kept while each equals the token sampled before it; the first sampled token that differs (or the one after the
last draft) is a token of its own. So a step yields 1 to 1 + k tokens, and they are exactly the tokens that
decoding one at a time gives:
* greedy: the argmax at each position;
* sampling: the sampler draws its noise from (seed, output position), so each row samples what decoding would have
  sampled at that position, and a draft is kept when it is that token. A draft d is then kept with probability
  p(d), the acceptance of rejection sampling against a one-token proposal, and the output is the seeded output of
  plain sampling, token for token.
(Exactly so in exact arithmetic, which the CPU tests check. In bf16 on a GPU the verification chunk's kernels round
otherwise than a one-row decode step's, as another batch shape's do, so where two tokens nearly tie either may come.)
Text that repeats its context (code edits, summaries, extraction, quoting) takes several tokens a step; text that
does not costs a chunk of 1 + k tokens a step instead of one.

What the rest of the runtime does with it:
* the scheduler appends the drafts to the request's tokens when it plans its step (`Scheduler(propose=...)`),
  fewer when the token budget or the KV pool is short, none when the request has a token still in flight;
* the plan samples the request's last 1 + k token rows (`StepPlan.sample_index`), through the eager forward or
  the piecewise graphs (the decode graphs sample one row a sequence);
* on completion the rejected drafts are cut from the tokens, the request's computed length moves back to what was
  accepted (the KV written for rejected drafts is overwritten later; no block holding it was hashed) and blocks
  beyond the tokens go back to the pool (`BlockManager.trim`).
A request that drafts waits for its step to come back before its next one is planned (its next input depends on
what was accepted): it does not take part in overlap scheduling. So that text which does not repeat costs little,
a lookup that finds nothing, or a step that keeps no draft, is a miss: the request then decodes 1, 2, 4, then up to
8 steps (doubling while the misses go on) the plain way, overlapped, before it looks again; a kept draft resets it.
(A draft model's request backs off only when the draft's pool cannot take it: runtime/draft_model.py.)
Logits processing applies to each sampled row as to a sequence that ends at that row's draft (penalties count the
drafts before it, min_tokens and bad words look at them), and log-probabilities come from each kept token's own
row, so those requests draft too; only requests that ask for prompt log-probabilities or first-step logits do not.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass

from dist_llm.errors import DistLLMError

METHODS = ("ngram", "draft_model")  # draft_model: runtime/draft_model.py
MAX_SPEC_SKIP = 8  # the longest run of plain decode steps between two lookups, after misses in a row


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str = "ngram"
    num_speculative_tokens: int = 4  # the most draft tokens a step
    prompt_lookup_min: int = 1  # the shortest suffix matched
    prompt_lookup_max: int = 4  # the longest suffix matched (tried first)
    draft_engine_dir: str | None = None  # "draft_model": the draft's engine, built with tp = pp = 1
    # no drafting while more than this many requests run (vLLM's speculative_disable_by_batch_size): a full batch
    # is bound by compute, where checking drafts costs more than it gives; None: always draft
    disable_by_batch_size: int | None = None

    def __post_init__(self):
        if self.method not in METHODS:
            raise DistLLMError(f"unknown speculative decoding method {self.method!r}; choose one of "
                               f"{', '.join(METHODS)}")
        if not isinstance(self.num_speculative_tokens, int) or not 1 <= self.num_speculative_tokens <= 16:
            raise DistLLMError(f"--num_speculative_tokens must be in 1..16, got {self.num_speculative_tokens!r}")
        if (self.method == "draft_model") != (self.draft_engine_dir is not None):
            raise DistLLMError("--draft_engine_dir goes with --speculative_method draft_model, and that method needs "
                               "it: the directory of a draft engine built with --tp_size 1 --pp_size 1")
        if self.disable_by_batch_size is not None and (not isinstance(self.disable_by_batch_size, int)
                                                       or self.disable_by_batch_size < 1):
            raise DistLLMError(f"--speculative_disable_by_batch_size must be an integer >= 1, got "
                               f"{self.disable_by_batch_size!r}")
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            raise DistLLMError(f"need 1 <= --prompt_lookup_min ({self.prompt_lookup_min}) <= --prompt_lookup_max "
                               f"({self.prompt_lookup_max})")


def ngram_draft(tokens: list[int], k: int, min_n: int, max_n: int) -> list[int]:
    """Up to `k` tokens that followed the most recent earlier occurrence of the last n of `tokens`, for the
    largest n in [min_n, max_n] that occurs; [] when none does. (A byte search: C speed, any vocabulary.)"""
    if k < 1 or len(tokens) < min_n + 1:
        return []
    data = array("i", tokens).tobytes()
    size = 4
    for n in range(min(max_n, len(tokens) - 1), min_n - 1, -1):
        pattern = data[-n * size :]
        end = len(data) - size  # an occurrence must end before the last token (it is not the suffix itself)
        while True:
            at = data.rfind(pattern, 0, end)
            if at < 0:
                break
            if at % size == 0:  # aligned to a token, not the middle of one
                start = at // size + n
                return tokens[start : start + k]
            end = at + len(pattern) - 1
    return []


def accept(drafts: list[int], sampled: list[int]) -> list[int]:
    """The tokens a step gives: the drafts that each equal the argmax before them, then the first argmax that
    differs (or the one after the last draft). `sampled` has len(drafts) + 1 entries."""
    j = 0
    while j < len(drafts) and sampled[j] == drafts[j]:
        j += 1
    return drafts[:j] + [sampled[j]]


def can_draft(seq) -> bool:
    """Whether a request may draft: any but those that ask for prompt log-probabilities or first-step logits."""
    p = seq.params
    return not p.prompt_logprobs and not p.return_first_logits
