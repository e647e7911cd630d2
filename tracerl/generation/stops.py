"""Stop strings: where a response that contains one ends.

Shared by ``generate`` and the engine so both cut at the same token.  The text checked is the
tokenizer's decode of the generated tokens with ``skip_special_tokens=False`` (special tokens
appear as their names); only generated text counts, never the prompt.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


def first_stop(text: str, stops: Sequence[str]) -> str | None:
    """The stop string of ``stops`` whose first occurrence in ``text`` ends earliest (ties: the
    one listed first), or None."""
    best, best_end = None, None
    for s in stops:
        i = text.find(s)
        if i >= 0 and (best_end is None or i + len(s) < best_end):
            best, best_end = s, i + len(s)
    return best


def stop_string_end(
    ids: Sequence[int], decode: Callable[[list[int]], str], stops: Sequence[str], start: int = 0,
) -> tuple[int, str] | None:
    """``(k, stop)`` if ``decode(ids)`` contains a stop string: ``k`` is the smallest count
    ``k > start`` of leading tokens whose decode ``decode(ids[:k])`` contains one (the response
    keeps tokens ``ids[:k]``, so it ends with the token that completes the stop string), and
    ``stop`` the one found there.  None if ``decode(ids)`` contains none.

    ``start``: tokens already checked (no stop string was found in them before), so only
    prefixes ending after them are scanned.  Decoding a prefix need not give a prefix of the
    full text (a multi-byte character split across tokens), so if no prefix past ``start``
    contains the stop string the whole ``ids`` is kept."""
    ids = list(ids)
    if not stops or len(ids) <= start:
        return None
    text = decode(ids)
    found = first_stop(text, stops)
    if found is None:
        return None
    # Scanned only once per response (when it stops), so a linear scan is cheap enough.
    for k in range(start + 1, len(ids)):
        hit = first_stop(decode(ids[:k]), stops)
        if hit is not None:
            return k, hit
    return len(ids), found
