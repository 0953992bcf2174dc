"""Output text: a request's final text, and the same text in pieces while it streams.

vLLM's rules: special tokens are skipped (unless `skip_special_tokens` is off); a stop token (EOS, end_id,
stop_token_ids) stays in the output ids but its text is left out; a stop string ends the text where it begins,
and only an occurrence completed at or after `min_tokens` counts (one before that stays in the text). With
`include_stop_str_in_output`, the stop token's text or the stop string stays in.

Streaming decodes a window of a few tokens per new token (the prefix/read offsets of vLLM's and TGI's
incremental detokenizers), not the whole output, so its cost does not grow with the output. A piece is held back
while it ends in an incomplete character (U+FFFD: a byte-level token that is half of a UTF-8 sequence) and, with
stop strings, while it is within len(longest stop string) - 1 characters of the end, since it may be the start of
one. The last piece is the rest of `output_text`, so the pieces always add up to the final text.
"""

from __future__ import annotations

import logging

log = logging.getLogger("dist_llm")

REPLACEMENT = "\ufffd"


def decode(tokenizer, ids: list[int], skip_special_tokens: bool = True) -> str:
    return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


def stop_string_at(tokenizer, ids: list[int], stops: list[str], skip_special_tokens: bool = True
                   ) -> tuple[str, int] | None:  # fmt: skip
    """(stop string, where it starts in decode(ids)) for the first of `stops` that the last of `ids` completes,
    or None. An occurrence that ends before the last token's text is not this token's: it was there already."""
    if not stops or not ids:
        return None
    text = decode(tokenizer, ids, skip_special_tokens)
    before = len(decode(tokenizer, ids[:-1], skip_special_tokens))
    found = [(at, s) for s in stops if (at := text.find(s, max(0, before - len(s) + 1))) >= 0]
    if not found:
        return None
    at, s = min(found)
    return s, at


def output_text(tokenizer, seq) -> str:
    """The text of a finished (or running) sequence by the rules above; with the request's
    `include_stop_str_in_output`, the stop token's text or the stop string stays in (vLLM's option)."""
    ids, p = seq.output_token_ids, seq.params
    if seq.stopped_on_token and not p.include_stop_str_in_output:
        ids = ids[:-1]
    text = decode(tokenizer, ids, p.skip_special_tokens)
    if seq.stop_string is None:
        return text
    hit = stop_string_at(tokenizer, ids, [seq.stop_string], p.skip_special_tokens)
    if hit is None:
        return text
    return text[: hit[1] + (len(hit[0]) if p.include_stop_str_in_output else 0)]


class TextStream:
    """One sequence's text as its tokens arrive: `push` gives the text that is safe to show now, `finish` the rest."""

    def __init__(self, tokenizer, stops: list[str] | tuple[str, ...] = (), skip_special_tokens: bool = True):
        self.tokenizer, self.skip = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = self.read_offset = 0  # ids[prefix:read] decoded already; ids[read:] not yet
        self.prefix_text = ""
        self.text = ""  # decoded so far (complete characters only)
        self.sent = 0  # characters of `text` given out
        self.hold = max((len(s) for s in stops), default=1) - 1

    def push(self, token_ids: list[int]) -> str:
        for token in token_ids:
            self.ids.append(token)
            full = decode(self.tokenizer, self.ids[self.prefix_offset :], self.skip)
            if len(full) > len(self.prefix_text) and not full.endswith(REPLACEMENT):
                self.text += full[len(self.prefix_text) :]
                self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
                self.prefix_text = decode(self.tokenizer, self.ids[self.prefix_offset : self.read_offset], self.skip)
        end = max(self.sent, len(self.text) - self.hold)
        piece, self.sent = self.text[self.sent : end], end
        return piece

    def finish(self, final: str) -> str:
        """The rest of `final` (the sequence's `output_text`) after what `push` gave out."""
        sent = self.text[: self.sent]
        if not final.startswith(sent):  # a tokenizer whose window decode differs from the whole (never seen)
            log.warning("streamed text %r is not a prefix of the final text %r", sent, final)
        piece, self.sent = final[len(sent) :], len(final)
        return piece
