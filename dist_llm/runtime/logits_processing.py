"""Per-request logits processing before sampling: logit_bias, min_tokens, bad words, and the repetition, presence
and frequency penalties, with vLLM's and transformers' meanings and order:

1. `logit_bias` adds to the logits of its token ids; below `min_tokens` output tokens, the request's stop tokens
   (EOS or end_id unless ignore_eos, and stop_token_ids) are set to -inf; so is the last token of each of
   `bad_words_ids` whose other tokens end the sequence so far (transformers' NoBadWordsLogitsProcessor, except
   that a bad word equal to an EOS id is kept: a request that bans EOS means it);
2. the repetition penalty divides the positive logits, and multiplies the others, of every token id that is in
   the prompt or the output so far (transformers' `RepetitionPenaltyLogitsProcessor`);
3. the frequency penalty subtracts penalty × count, the presence penalty subtracts penalty once, for each token
   id in the output so far (OpenAI's definition; the prompt does not count).

Temperature, top-k and top-p then apply to the result (`kernels/sampling.py`); log-probabilities returned with
`return_logprobs` come from the logits before any of this (vLLM's default, "raw" log-probabilities).

The host builds the inputs each step from the requests' tokens; the device turns them into [B, V] masks and
counts. With overlap scheduling, the newest token of a request may still be being sampled (PENDING on the host):
the device fills it from the previous step's sampled ids, as the forward does for its input ids. Rows that use
none of this keep their logits bit for bit (x / 1, x - 0 and x + 0 are exact), so a request's tokens do not depend
on what else is in the batch. The decode CUDA graphs capture their sampling, so a decode step that needs this
replays their "logits" variant, which stops at the LM head, and runs it after (runtime/cuda_graphs.py).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from dist_llm.runtime.plan import _from_arrays, _to_arrays
from dist_llm.runtime.sequence import PENDING, Sequence


@dataclass
class LogitsInputs:
    """What the last stage needs to process one step's logits (CPU tensors in the plan, then on the device).
    The penalised rows' tokens go as one flat list with a length per row, so the host's work each step is one
    concatenation of token lists and the device expands rows and positions itself."""

    penalties: torch.Tensor  # fp32 [B, 3]: repetition, presence, frequency per row (1, 0, 0: off)
    use_repetition: bool
    use_output_penalties: bool  # presence or frequency on some row
    seen_token_ids: torch.Tensor  # int64 [P]: each penalised row's prompt and output so far, row after row
    seen_lengths: torch.Tensor  # int64 [B]: how many of them are the row's (0: no penalties)
    seen_prompt_lens: torch.Tensor  # int64 [B]: how many of those are prompt tokens
    seen_feeds: torch.Tensor  # int64 [B]: the previous step's row that samples the row's PENDING last token, or -1
    bias_rows: torch.Tensor  # int64 [K]
    bias_token_ids: torch.Tensor  # int64 [K]
    bias_values: torch.Tensor  # fp32 [K]: logit_bias values, and -inf for min_tokens and bad words
    # a bad word whose next-to-last token is the row's PENDING one applies only if that token turns out to be it:
    # per entry, the previous step's row that samples it (-1: unconditional) and the token it must be
    bias_feeds: torch.Tensor  # int64 [K]
    bias_conditions: torch.Tensor  # int64 [K]
    bias_conditional: bool = False  # some entry has a feed (the host knows; the device need not check)

    def __reduce__(self):  # cheap pickling, as StepPlan's
        return _from_arrays, (LogitsInputs, _to_arrays(self))

    def to(self, device: torch.device) -> LogitsInputs:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for k, v in moved.items():
            if isinstance(v, torch.Tensor):
                moved[k] = v.to(device, non_blocking=True)
        return LogitsInputs(**moved)


def build_logits_inputs(seqs: list[Sequence], num_new_tokens: list[int], stop_ids,
                        samples: list[bool] | None = None) -> LogitsInputs | None:  # fmt: skip
    """The step's rows, as the coordinator plans them (before their num_computed_tokens moves on); a PENDING last
    token is sampled by the previous step, at the row `seq.feed` names. `stop_ids(params)`: the token ids that would
    stop it. A row's sample is used when its tokens reach the end of the sequence, or where `samples` says so (a
    speculative draft's row: the sequence so far ends at that draft). None when no such row needs any processing."""
    ends = [seq.num_computed_tokens + n for seq, n in zip(seqs, num_new_tokens)]
    if samples is None:
        samples = [end == len(seq) for seq, end in zip(seqs, ends)]
    if not any(used and _needs(seq, end) for seq, end, used in zip(seqs, ends, samples)):
        return None
    b = len(seqs)
    penalties = [[1.0, 0.0, 0.0] for _ in range(b)]
    lengths, prompt_lens, feeds = [0] * b, [0] * b, [-1] * b
    seen: list[int] = []
    b_rows, b_ids, b_vals, b_feeds, b_conds = [], [], [], [], []

    def bias(r: int, t: int, value: float, feed: int = -1, cond: int = 0) -> None:
        b_rows.append(r)
        b_ids.append(t)
        b_vals.append(value)
        b_feeds.append(feed)
        b_conds.append(cond)

    for r, (seq, end, used) in enumerate(zip(seqs, ends, samples)):
        if not used:  # a prompt chunk that does not reach the end: its sample is thrown away
            continue
        p = seq.params
        for t, value in p.logit_bias.items():
            bias(r, t, value)
        if end - seq.prompt_len < p.min_tokens:  # the token sampled now would be output number end - prompt_len
            for t in sorted(stop_ids(p)):
                bias(r, t, float("-inf"))
        for word in p.bad_words_ids:
            ban = _bad_word_ban(seq, end, word)
            if ban is not None:
                bias(r, ban[0], float("-inf"), *ban[1:])
        if p.uses_penalties:
            penalties[r] = [p.repetition_penalty, p.presence_penalty, p.frequency_penalty]
            seen += seq.token_ids[:end]
            lengths[r], prompt_lens[r] = end, min(seq.prompt_len, end)
            if seq.token_ids[end - 1] == PENDING:
                assert seq.feed is not None, "a PENDING token must be sampled by the step in flight"
                feeds[r] = seq.feed[1]
    pen = torch.tensor(penalties, dtype=torch.float32)
    return LogitsInputs(
        penalties=pen,
        use_repetition=bool((pen[:, 0] != 1).any()),
        use_output_penalties=bool((pen[:, 1:] != 0).any()),
        seen_token_ids=torch.tensor(seen, dtype=torch.int64),
        seen_lengths=torch.tensor(lengths, dtype=torch.int64),
        seen_prompt_lens=torch.tensor(prompt_lens, dtype=torch.int64),
        seen_feeds=torch.tensor(feeds, dtype=torch.int64),
        bias_rows=torch.tensor(b_rows, dtype=torch.int64),
        bias_token_ids=torch.tensor(b_ids, dtype=torch.int64),
        bias_values=torch.tensor(b_vals, dtype=torch.float32),
        bias_feeds=torch.tensor(b_feeds, dtype=torch.int64),
        bias_conditions=torch.tensor(b_conds, dtype=torch.int64),
        bias_conditional=any(f >= 0 for f in b_feeds),
    )


def _bad_word_ban(seq: Sequence, end: int, word: list[int]) -> tuple[int, int, int] | None:
    """(token to ban, feed row, required token) when the tokens before `word`'s last end the sequence's first
    `end` tokens (transformers' NoBadWordsLogitsProcessor: the prompt counts), else None. Feed row -1: the ban is
    unconditional; else the sequence's last token is PENDING, and the ban holds if the previous step's row
    `feed` samples the required token."""
    k = len(word) - 1
    if k == 0:
        return word[0], -1, 0
    if end < k:
        return None
    tail = seq.token_ids[end - k : end]
    if tail[-1] == PENDING:
        return (word[-1], seq.feed[1], word[k - 1]) if tail[:-1] == word[: k - 1] else None
    return (word[-1], -1, 0) if tail == word[:k] else None


def _needs(seq: Sequence, end: int) -> bool:
    p = seq.params
    return p.uses_penalties or bool(p.logit_bias) or end - seq.prompt_len < p.min_tokens or bool(p.bad_words_ids)


def apply_logits_processing(logits: torch.Tensor, li: LogitsInputs, sampled: torch.Tensor,
                            fill_pending) -> torch.Tensor:
    """fp32 [B, V] logits after bias, bans and penalties; `li` on the logits' device; `sampled` the previous
    step's sampled ids, which `fill_pending` (the ops' kernel) reads for PENDING tokens. A new tensor: the caller's
    logits stay as they were (log-probabilities are taken from them). Nothing here waits for the device."""
    x = logits.float().clone() if logits.dtype == torch.float32 else logits.float()
    if li.bias_rows.numel():
        values = li.bias_values
        if li.bias_conditional:  # bad words that wait on a PENDING token: applied if it is the one they follow
            held = sampled[li.bias_feeds.clamp(min=0)] == li.bias_conditions
            values = torch.where((li.bias_feeds < 0) | held, values, torch.zeros_like(values))
        x.index_put_((li.bias_rows, li.bias_token_ids), values, accumulate=True)
    if not (li.use_repetition or li.use_output_penalties):
        return x
    bsz, total = x.shape[0], li.seen_token_ids.numel()
    rows = torch.repeat_interleave(torch.arange(bsz, device=x.device), li.seen_lengths, output_size=total)
    starts = torch.cumsum(li.seen_lengths, 0) - li.seen_lengths
    pos = torch.arange(total, device=x.device) - starts[rows]  # each token's place in its row
    last = pos == li.seen_lengths[rows] - 1
    prev_index = torch.where(last, li.seen_feeds[rows], -1)
    tokens = fill_pending(li.seen_token_ids, prev_index, sampled)
    if li.use_repetition:
        seen = torch.zeros_like(x, dtype=torch.bool)
        seen[rows, tokens] = True
        pen = li.penalties[:, :1]
        x = torch.where(seen, torch.where(x > 0, x / pen, x * pen), x)
    if li.use_output_penalties:
        is_output = (pos >= li.seen_prompt_lens[rows]).to(x.dtype)
        counts = torch.zeros_like(x)
        counts.index_put_((rows, tokens), is_output, accumulate=True)
        x = x - li.penalties[:, 2:3] * counts - li.penalties[:, 1:2] * (counts > 0).to(x.dtype)
    return x
