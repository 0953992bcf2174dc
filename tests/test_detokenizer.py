"""Output text and its streamed pieces (runtime/detokenizer.py): the pieces add up to the final text for
byte-level and SentencePiece-style tokenizers, hold back half characters and possible stop strings, and a
stop string counts only where the token that completes it is at or past min_tokens."""

from __future__ import annotations

import random

import pytest
from conftest import PROMPTS
from test_features import in_process
from test_parallel_sampling import engine  # noqa: F401 (the module's engine fixture)

from dist_llm.runtime.detokenizer import REPLACEMENT, TextStream, decode, stop_string_at
from dist_llm.testing.tiny_model import CORPUS, train_tokenizer


@pytest.fixture(scope="module")
def byte_level(tmp_path_factory):
    return train_tokenizer(str(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def metaspace():
    """A SentencePiece-style BPE (Llama's: "▁" for spaces, stripped at the start of a decode), trained here."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(CORPUS.splitlines(), trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "</s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>")


def stream_all(tok, ids, stops=(), chunk=1):
    stream, pieces = TextStream(tok, list(stops)), []
    for i in range(0, len(ids), chunk):
        pieces.append(stream.push(ids[i : i + chunk]))
    return pieces, stream


@pytest.mark.parametrize("which", ["byte_level", "metaspace"])
@pytest.mark.parametrize("chunk", [1, 3])
def test_pieces_add_up_to_the_whole(which, chunk, request):
    """Random token ids (byte-level: lone bytes of multi-byte characters among them) and real text: every
    prefix of pieces is a prefix of the whole decode, no piece ends in half a character, and finish adds
    the rest."""
    tok = request.getfixturevalue(which)
    rng = random.Random(len(which) + chunk)
    texts = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    randoms = [[rng.randrange(len(tok)) for _ in range(rng.randrange(1, 60))] for _ in range(30)]
    if which == "byte_level":  # "é" is two bytes; its first byte alone decodes to U+FFFD
        randoms.append(tok("caf\u00e9 d\u00e9j\u00e0", add_special_tokens=False)["input_ids"])
    held_back = 0
    for ids in texts + randoms:
        whole = decode(tok, ids)
        pieces, stream = stream_all(tok, ids, chunk=chunk)
        sent = "".join(pieces)
        assert whole.startswith(sent), (ids, sent, whole)
        assert not any(p.endswith(REPLACEMENT) for p in pieces)
        held_back += len(whole) - len(sent)
        assert sent + stream.finish(whole) == whole
    if which == "byte_level":
        assert held_back > 0, "no random sequence ended in half a character: the hold-back went untested"


def test_possible_stop_strings_are_held_back(byte_level):
    text = "The quick brown fox jumps over the lazy dog."
    ids = byte_level(text, add_special_tokens=False)["input_ids"]
    stops = ["lazy cat", "fox!"]
    pieces, stream = stream_all(byte_level, ids, stops)
    sent = "".join(pieces)
    assert sent == text[: len(text) - 7]  # len("lazy cat") - 1 characters wait
    assert sent + stream.finish(text) == text


def test_stop_string_at(byte_level):
    ids = byte_level("one two three two", add_special_tokens=False)["input_ids"]
    assert stop_string_at(byte_level, ids, ["two"]) == ("two", len("one two three "))  # the last one only
    # a string completed earlier is not this token's
    k = next(k for k in range(1, len(ids)) if decode(byte_level, ids[:k]).endswith("three"))
    assert stop_string_at(byte_level, ids[: k + 1], ["two"]) is None
    assert stop_string_at(byte_level, ids[:k], ["three", "e"]) == ("three", len("one two "))  # the earliest start
    assert stop_string_at(byte_level, ids, []) is None and stop_string_at(byte_level, [], ["x"]) is None


def test_streamed_text_is_the_output_text(engine):  # noqa: F811
    """Through the engine: plain, a stop string, a stop token and n = 2, streamed against generate."""
    with in_process(engine) as runner:
        base = runner.generate(input_texts=[PROMPTS[0]], max_new_tokens=24, end_id=-1)[0]
        pieces = [runner.tokenizer.decode([t]) for t in base.output_token_ids]
        stop = next(p for p in pieces[3:] if len(p.strip()) >= 2 and base.output_text.index(p) > 0)
        cases = [dict(), dict(stop=[stop]), dict(stop_token_ids=[base.output_token_ids[5]]),
                 dict(n=2, temperature=1.0, seed=3, stop=["zz", stop])]
        for kw in cases:
            kw = {"max_new_tokens": 24, "end_id": -1, **kw}
            outs = runner.generate(input_texts=PROMPTS[:2], **kw)
            texts = {}
            for chunk in runner.generate_stream(input_texts=PROMPTS[:2], **kw):
                key = (chunk.index, chunk.sequence_index)
                texts[key] = texts.get(key, "") + chunk.text
            n = kw.get("n", 1)
            assert [texts[(i // n, i % n)] for i in range(len(outs))] == [o.output_text for o in outs], kw
        stopped = runner.generate(input_texts=[PROMPTS[0]], max_new_tokens=24, end_id=-1, stop=[stop])[0]
    assert stopped.finish_reason == "stop" and stopped.stop_string == stop
    assert stopped.output_text == base.output_text[: base.output_text.index(stop)]


def test_stop_string_before_min_tokens_stays_in_the_text(engine):  # noqa: F811
    """A stop string that appears once, early: below min_tokens it is no stop, and neither the later steps (whose
    decode window still holds it) nor the final text may act on it."""
    with in_process(engine) as runner:
        tok = runner.tokenizer
        base = runner.generate(input_texts=[PROMPTS[0]], max_new_tokens=24, end_id=-1)[0]
        ids, text = base.output_token_ids, base.output_text
        pieces = [tok.decode([t]) for t in ids]
        # a piece of the text that occurs once, completed by token k < 20
        k, stop = next((k, p) for k, p in enumerate(pieces[:20]) if len(p.strip()) >= 2 and text.count(p) == 1)
        early = runner.generate(input_texts=[PROMPTS[0]], max_new_tokens=24, end_id=-1, stop=[stop])[0]
        late = runner.generate(input_texts=[PROMPTS[0]], max_new_tokens=24, end_id=-1, stop=[stop], min_tokens=k + 3)[0]
    assert early.finish_reason == "stop" and len(early.output_token_ids) == k + 1
    assert late.finish_reason == "length" and late.output_token_ids == ids
    assert late.output_text == text and late.stop_string is None


def test_include_stop_str_and_special_tokens(engine):  # noqa: F811
    """vLLM's include_stop_str_in_output keeps the stop string, or the stop token's text, in the text; with
    skip_special_tokens off, special tokens' text is in it too. Streamed pieces add up to the same text."""
    with in_process(engine) as runner:
        tok = runner.tokenizer

        def both(**kw):
            kw = {"input_texts": [PROMPTS[0]], "max_new_tokens": 24, "end_id": -1, **kw}
            out = runner.generate(**kw)[0]
            assert "".join(c.text for c in runner.generate_stream(**kw)) == out.output_text, kw
            return out

        base = both()
        ids, text = base.output_token_ids, base.output_text
        pieces = [tok.decode([t]) for t in ids]
        stop = next(p for p in pieces[3:] if len(p.strip()) >= 2 and text.index(p) > 0)
        cut = both(stop=[stop], include_stop_str_in_output=True)
        assert cut.output_text == text[: text.index(stop) + len(stop)] and cut.finish_reason == "stop"
        k = next(i for i in range(3, 24) if ids[i] not in ids[:i] and len(pieces[i].strip()) >= 2)
        on_token = both(stop_token_ids=[ids[k]], include_stop_str_in_output=True)
        assert on_token.output_text == tok.decode(ids[: k + 1]) and on_token.output_token_ids == ids[: k + 1]
        eos = tok.eos_token_id  # forced by logit_bias: special, so skipped unless asked for
        kept = both(logit_bias={eos: 100.0}, ignore_eos=True, max_new_tokens=3, skip_special_tokens=False)
        assert kept.output_token_ids == [eos] * 3 and kept.output_text == tok.eos_token * 3
        assert both(logit_bias={eos: 100.0}, ignore_eos=True, max_new_tokens=3).output_text == ""
        ended = both(logit_bias={eos: 100.0}, end_id=eos, include_stop_str_in_output=True, skip_special_tokens=False)
        assert ended.output_token_ids == [eos] and ended.output_text == tok.eos_token
