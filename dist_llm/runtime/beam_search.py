"""Beam search, as transformers' `generate(num_beams=W)` runs it, driven over the executor's requests.

`BeamSearch` is the search itself for one prompt, step for step transformers' vectorised `_beam_search`
(5.x): each step takes the K = max(2, 1 + number of EOS ids) * W best continuations of all running beams by
accumulated log-probability (fp32), keeps the W best that hit no stop (EOS, or the last allowed token) running,
files the hits among the first W as finished hypotheses scored by sum / length ** length_penalty, and stops on
transformers' rules (`early_stopping` False, True or "never"; the same early-stop heuristic).

`run_beam_search` drives it as vLLM's `LLM.beam_search` does: each step of each beam is a request of its own to
the executor, a sequence resumed one token further (prompt + the beam's tokens) that asks for its K most likely
next tokens (`top_logprobs`). The prefix cache serves every full KV block the beam shares with its parent, so a
step computes the beam's last, partial block (at most `tokens_per_block` tokens) and nothing is copied or forked
in the block manager; the requests of all beams and prompts run batched beside whatever else the executor holds.
The price against an in-engine search is that partial block recomputed per beam per step, and no decode graphs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dist_llm.errors import DistLLMError
from dist_llm.runtime.sequence import MAX_TOP_LOGPROBS, SamplingParams, Sequence, Status

NEG = -1.0e9  # transformers' "impossible" score


@dataclass
class Hypothesis:
    tokens: list[int]  # generated tokens (a final EOS included)
    score: float  # sum of log-probabilities / len(tokens) ** length_penalty
    finished: bool  # ended by a stop (EOS or max_new_tokens), not a placeholder
    stopped: bool = False  # its last token is an EOS id (finish reason "stop", not "length")


class BeamSearch:
    """One prompt's search. `step` takes each running beam's K best next tokens and log-probabilities and
    returns whether the search goes on; `beams` are then the running beams' tokens, `best(n)` the result."""

    def __init__(self, num_beams: int, eos_ids: set[int], max_new_tokens: int, length_penalty: float = 1.0,
                 early_stopping: bool | str = False):  # fmt: skip
        self.width, self.eos = num_beams, set(eos_ids)
        self.k = candidates_per_step(num_beams, self.eos)
        self.max_new, self.length_penalty, self.early_stopping = max_new_tokens, length_penalty, early_stopping
        self.beams: list[list[int]] = [[]]  # one running beam at first: transformers' others start at -1e9
        self.scores = torch.zeros(1, dtype=torch.float32)
        self.finished = [Hypothesis([], NEG, False) for _ in range(num_beams)]
        self.finished_scores = torch.full((num_beams,), NEG, dtype=torch.float32)
        self.improvable = True  # transformers' is_early_stop_heuristic_unsatisfied
        self.generated = 0

    def step(self, logprobs: torch.Tensor, ids: torch.Tensor) -> bool:
        """`logprobs` fp32 and `ids` int64, [len(beams), >= k]: each running beam's most likely next tokens,
        most likely first. Returns False when the search is over."""
        w, k = self.width, self.k
        acc = (self.scores[:, None] + logprobs[:, :k].float()).flatten()
        top, where = torch.topk(acc, k)  # the k best of all beams' continuations
        parent = (where // k).tolist()
        token = ids[:, :k].flatten()[where].tolist()
        last = self.generated + 1 >= self.max_new
        hits = torch.tensor([last or t in self.eos for t in token])
        candidates = [self.beams[p] + [t] for p, t in zip(parent, token)]
        # running: the w best that hit nothing (hits sink to -1e9, and run on only if w are not left without them)
        running = top + hits.float() * NEG
        keep = torch.topk(running, w).indices.tolist()
        # finished: hits among the first w, scored by length; merged with those before, the w best stay
        first_w = torch.arange(k) < w
        done_now = hits & first_w
        scored = top / float(self.generated + 1) ** self.length_penalty
        if self.early_stopping is True and all(h.finished for h in self.finished):
            scored = scored + NEG
        if not self.improvable:
            scored = scored + NEG
        scored = scored + (~done_now).float() * NEG
        merged = torch.cat((self.finished_scores, scored))
        pool = self.finished + [Hypothesis(c, 0.0, bool(d), c[-1] in self.eos)
                                for c, d in zip(candidates, done_now.tolist())]
        best = torch.topk(merged, w).indices.tolist()
        self.finished = [Hypothesis(pool[i].tokens, float(merged[i]), pool[i].finished, pool[i].stopped)
                         for i in best]
        self.finished_scores = merged[best]
        self.beams, self.scores = [candidates[i] for i in keep], running[keep]
        self.generated += 1
        # transformers' early-stop heuristic: can the best running beam still beat the worst finished one?
        if self.early_stopping == "never" and self.length_penalty > 0:
            best_length = self.max_new
        else:
            best_length = self.generated
        best_possible = self.scores[0] / best_length**self.length_penalty  # (fp32, as transformers computes it)
        worst = torch.tensor([NEG] * w, dtype=torch.float32)
        worst[[h.finished for h in self.finished]] = self.finished_scores.min()
        self.improvable = self.improvable and bool((best_possible > worst).any())
        all_finished = all(h.finished for h in self.finished)
        return self.improvable and not (all_finished and self.early_stopping is True) and not bool(hits.all())

    def best(self, n: int) -> list[Hypothesis]:
        return self.finished[:n]


def candidates_per_step(num_beams: int, eos_ids: set[int]) -> int:
    """transformers' K: enough continuations that num_beams are left running after every EOS among them."""
    return max(2, 1 + len(eos_ids)) * num_beams


def check_beam_params(params: SamplingParams, eos_ids: set[int]) -> int:
    """K, the candidates a step needs per beam; a clear error where the search cannot take the settings."""
    k = candidates_per_step(params.num_beams, eos_ids)
    if k > MAX_TOP_LOGPROBS:
        raise DistLLMError(
            f"num_beams {params.num_beams} with {len(eos_ids)} EOS ids needs the {k} most likely tokens a step; "
            f"at most {MAX_TOP_LOGPROBS}: lower num_beams")
    return k


def run_beam_search(executor, prompts: list[list[int]], params: SamplingParams,
                    priorities: list[int] | None = None) -> list[list[Hypothesis] | str]:  # fmt: skip
    """Beam search for each prompt over `executor`; per prompt its `params.n` best hypotheses, or the error that
    refused it. Every step of every beam is one request (see the module docstring), with the prompt's priority;
    other requests already in the executor run on beside them."""
    priorities = priorities or [0] * len(prompts)
    eos = executor.stop_token_ids(params)  # EOS or end_id, and stop_token_ids (unless ignore_eos)
    k = check_beam_params(params, eos)
    searches: list[BeamSearch | str] = []
    for prompt in prompts:
        try:  # the longest step: the prompt with max_new_tokens - 1 tokens, asking for one more
            executor.check_admissible(Sequence(prompt, params))
            searches.append(BeamSearch(params.num_beams, eos, params.max_new_tokens, params.length_penalty,
                                       params.early_stopping))
        except DistLLMError as e:
            searches.append(str(e))
    live = [i for i, s in enumerate(searches) if isinstance(s, BeamSearch)]
    while live:
        steps = {}
        for i in live:
            search = searches[i]
            for b, beam in enumerate(search.beams):
                step = SamplingParams(max_new_tokens=len(beam) + 1, return_logprobs=True, top_logprobs=k,
                                      ignore_eos=True)
                seq = Sequence(prompts[i], step, priority=priorities[i])
                seq.token_ids += beam  # a sequence resumed at the beam's end (the prefix cache has its blocks)
                executor.enqueue(seq)
                steps[(i, b)] = seq
        while any(s.status is not Status.FINISHED for s in steps.values()):
            executor.step()
        still = []
        for i in live:
            search = searches[i]
            tops = [steps[(i, b)].top_logprobs[-1] for b in range(len(search.beams))]
            ids = torch.tensor([[t for t, _ in top] for top in tops], dtype=torch.int64)
            logprobs = torch.tensor([[lp for _, lp in top] for top in tops], dtype=torch.float32)
            if search.step(logprobs, ids):
                still.append(i)
        live = still
    return [s if isinstance(s, str) else s.best(params.n) for s in searches]
