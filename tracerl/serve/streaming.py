"""Text of a streamed response, block by block, that concatenates to the non-streamed text.

A block's tokens are final when it is committed, but its text is not always final yet: a stop
string may begin at the end of this block and be completed by the next (the response is then
cut before it), and a multi-byte character may be split across blocks (the decoder shows it as
U+FFFD until its last byte arrives).  So each chunk carries the text decoded so far minus what
it already sent and minus such a pending tail, which the next chunk or the final one sends (the
rule vLLM applies to stop strings).  The final chunk sends the rest of ``LLM.completion_text``,
the exact non-streamed text.
"""

from __future__ import annotations


def pending_tail(text: str, stops: tuple[str, ...]) -> int:
    """Characters at the end of ``text`` that may still change: the longest suffix that begins a
    stop string, or an undecoded (U+FFFD) tail."""
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    tail = len(text) - len(text.rstrip("\ufffd"))
    return max(hold, tail)


class TextStream:
    """The text deltas of one sample: ``add(token_ids)`` per committed block, ``finish(text)``."""

    def __init__(self, tokenizer, *, skip_special_tokens: bool, stops: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stops = stops
        self.ids: list[int] = []
        self.sent = ""

    def add(self, token_ids: list[int]) -> str:
        self.ids.extend(token_ids)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=self.skip_special_tokens)
        safe = text[:len(text) - pending_tail(text, self.stops)]
        if len(safe) <= len(self.sent) or not safe.startswith(self.sent):
            return ""
        delta, self.sent = safe[len(self.sent):], safe
        return delta

    def finish(self, final_text: str) -> str:
        """The rest of the final text (everything sent so far is a prefix of it, since only final
        text is sent)."""
        delta = final_text[len(self.sent):] if final_text.startswith(self.sent) else ""
        self.sent = final_text
        return delta
