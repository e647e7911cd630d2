"""Streamed text (tracerl/serve/streaming.py) with the real byte-level tokenizer of the tiny
presets: a character split across blocks and a stop string begun in one block and completed in
the next are held back, so the chunks always concatenate to the final text."""

from __future__ import annotations

import pytest

from tracerl.models import load_model
from tracerl.serve.streaming import TextStream, pending_tail


@pytest.fixture(scope="module")
def tok():
    return load_model("tiny-block").tokenizer


def blocks(tok, text: str, size: int) -> list[list[int]]:
    ids = tok.encode(text, add_special_tokens=False)
    return [ids[i:i + size] for i in range(0, len(ids), size)]


def test_pending_tail():
    assert pending_tail("abc&", ("&f",)) == 1
    assert pending_tail("abc", ("&f",)) == 0
    assert pending_tail("ab\ufffd\ufffd", ()) == 2
    assert pending_tail("xEN", ("END", "N!")) == 2  # the longest prefix of any stop string


@pytest.mark.parametrize("size", [1, 2, 3, 4])
def test_a_split_character_waits_for_its_last_byte(tok, size):
    text = "naïve café 日本"
    stream = TextStream(tok, skip_special_tokens=True, stops=())
    deltas = [stream.add(b) for b in blocks(tok, text, size)]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) + stream.finish(text) == text
    assert "".join(deltas) == text  # nothing was pending at the end


def test_a_stop_string_across_blocks_is_never_sent(tok):
    # "ab&" | "f..." : the response is cut before "&f", so the "&" must not be sent early.
    stream = TextStream(tok, skip_special_tokens=True, stops=("&f",))
    first = stream.add(tok.encode("ab&", add_special_tokens=False))
    assert first == "ab"
    stream.add(tok.encode("f", add_special_tokens=False))
    assert first + stream.finish("ab") == "ab"
    # Without the completing block, the held "&" comes with the final text.
    other = TextStream(tok, skip_special_tokens=True, stops=("&f",))
    sent = other.add(tok.encode("ab&", add_special_tokens=False)) + other.add(tok.encode("x", add_special_tokens=False))
    assert sent == "ab&x" and other.finish("ab&x") == ""
