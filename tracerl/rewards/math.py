"""Math reward: extract the final answer from a response and check it against the gold answer.

Public API
----------
``extract_answer(text, *, fallback="last_number") -> (answer | None, rule)``
``score_math(response, gold, *, fallback="last_number", timeout=5.0, percent="strip") -> MathResult``
``score_math_many(pairs, *, workers=None, ...) -> list[MathResult]``
``close_workers()``  (optional; workers are also closed at interpreter exit)

Reward is 1.0 when the extracted answer is equivalent to the gold answer, else 0.0.

Extraction (``extract_answer``)
-------------------------------
Only the last ``MAX_RESPONSE_CHARS`` (32,768) characters of a response are examined. Final
answers come at the end, and 32K characters (roughly 8K tokens) comfortably hold a final answer
and the reasoning that leads to it; the cap bounds the work for runaway generations (a 1 MB
repetition). The price: a box or anchor that lies before that window is not seen (a box the
window cuts through is not a box). Extraction is linear in what it examines (no backtracking
regex; braces matched in one pass with an explicit stack, never recursion), so a full window
takes a few milliseconds.

1. The LAST ``\\boxed{...}`` / ``\\fbox{...}`` (rule ``"boxed"`` / ``"fbox"``), braces balanced
   (``\\{`` and ``\\}`` are literal braces and do not count), or ``\\boxed 5`` without braces
   (rule ``"boxed_bare"``: the next whitespace-free token, trailing ``.,;:`` removed).
   Brace pairs around the whole content are redundant and removed (``\\boxed{{{4}}}`` -> ``4``).
   Empty boxes (``\\boxed{}``, e.g. an echo of the prompt's instruction) are skipped.
   If the last box is never closed (a truncated response), there is NO answer and no fallback
   runs (rule ``"unclosed_box"``): a truncated answer must not earn reward through a fallback
   that reads digits out of the unfinished box.
2. Without a box, ``fallback`` decides (an explicit, configurable policy):
   - ``"none"``: no answer (rule ``"none"``) -- strict format, for RL that insists on boxes;
   - ``"anchored"``: the last anchored phrase: ``#### X`` (GSM8K, rule ``"gsm8k"``),
     ``... answer is X`` (rule ``"answer_is"``), ``Answer: X`` / ``**Final Answer:** X``
     (rule ``"answer_colon"``); X is the first ``$...$`` / ``\\(...\\)`` math segment of the
     rest of the line if there is one, else the rest of the line up to the end of the sentence;
   - ``"last_number"`` (default): the anchored phrases, then the last number in the text
     (integer, decimal, ``1,000``-style thousands, ``a/b``; rule ``"last_number"``).
   No answer at all gives reward 0 with ``extracted_answer=None``.
3. In ``score_math`` the extraction runs in the worker process (see Time limits). If it does not
   come back within the time limit the rule is ``"extraction_timeout"``; if the worker fails
   during it, ``"extraction_error"``. Both give reward 0 with ``extracted_answer=None``.

Gold answers are taken as datasets give them: the last box if the gold contains one, the text
after the last ``####`` (GSM8K) if it contains that, else the whole string.

Equivalence policy (applied identically to gold and prediction)
---------------------------------------------------------------
- Math is checked by math-verify (``parse`` + ``verify``; symbolic and numeric equality, sets,
  intervals, matrices, equations, ``x = 5`` vs ``5``). There is NO structure-blind string
  fallback: upstream deleted every comma before comparing strings, so ``(1,2)`` == ``12``
  (reference/upstream-rewards-eval.md §8.6). Here the only string comparison is token by token
  (``"(1,2)"`` -> ``( 1 , 2 )``), and only when math-verify cannot parse the gold at all.
- Structure: intervals keep their brackets (``[1,2)`` != ``[1,2]``); tuples are ordered
  (``(1,2)`` != ``(2,1)``); sets ``\\{...\\}`` and bare comma lists (``1, 2``, the MATH
  "enter all solutions" convention) are unordered. An explicit set ``\\{1,2\\}`` never equals a
  parenthesised or bracketed pair/interval ``(1,2)`` (math-verify alone says it does, see below).
- Thousands separators: an answer that is exactly one number grouped in threes (``1,000``,
  ``1{,}000``, ``1\\,000``, ``12 345``) is that number. ``12,5`` or ``1,2`` stay lists.
- Percent (``percent=`` option): ``"strip"`` (default) treats the percent sign as a unit and
  drops it on both sides: ``50\\%`` == ``50``, and ``50\\%`` != ``0.5``. ``"ratio"`` reads
  ``X\\%`` as ``X/100``: ``50\\%`` == ``0.5`` and ``50\\%`` != ``50``. (math-verify by itself
  accepts BOTH ``50\\%`` == ``50`` and ``50\\%`` == ``0.5`` while ``50`` != ``0.5``: not an
  equivalence relation, so we do not use its percent handling.)
- Degrees: ``^\\circ``, ``^{\\circ}``, ``°`` and ``\\degree`` are dropped on both sides and the
  numbers are compared as written: ``30^\\circ`` == ``30``, ``30^\\circ`` != ``\\frac{\\pi}{6}``
  (no conversion to radians).
- Units: a trailing ``\\text{...}`` / ``\\mbox{...}`` / ``\\textrm{...}`` unit (optionally
  ``^2``/``^3``) after a non-empty expression is dropped (``5\\text{ cm}^2`` == ``5``);
  ``\\mathrm{..}`` only when it holds two or more letters (``\\mathrm{i}`` is the imaginary unit).
  Plain trailing words are dropped only after a purely numeric expression (``5 cm``,
  ``12 apples``, ``x = 5 cm``), and only words of 3+ letters or known short units
  (``cm``, ``kg``, ``ft``...): ``5 m`` is NOT stripped (indistinguishable from the product
  ``5m``). math-verify's own unit stripping is switched off: it removes trailing single letters,
  so ``a + b + c`` became ``a + b +`` (unparseable) and ``x + d`` failed to parse.
  Currency signs (``\\$``) are dropped.
- Multiple choice: a gold that is a single capital letter ``A``-``J`` (``A``, ``(A)``,
  ``\\text{(A)}``) is compared as a choice letter with the letter leading the prediction
  (``(B)``, ``B``, ``b``, ``(B) 12``). A prediction giving the option's value instead of its
  letter is wrong (the options are not known here).
- Text answers: a gold made of words (``\\text{yes}``, ``Monday``, ``no solution``; words of
  3+ letters or a ``\\text{}`` wrapper; not function names such as ``sin``) is compared as
  lower-cased text. It does not go to math-verify, which reads ``Monday`` as the product of
  its letters and so accepts anagrams (``Dynamo``).
- Scientific notation ``1.5e3`` / ``1.5E3`` is read as ``1.5\\times 10^{3}``.
- Floats: math-verify compares floats after rounding to 6 decimal places (absolute), so it calls
  ``0.0000001`` equal to ``0.0000002`` or to ``0``. When both sides are plain numbers and one is
  a float, we additionally require a relative difference below 1.5e-6 (``1/3`` vs ``0.333333``
  still passes, ``1/3`` vs ``0.33333`` still fails).
- Equation chains: against a gold that is not itself an equation or inequality, an answer
  ``a = b = ...`` is checked as a whole: every side that is a plain value (no variables, e.g.
  ``3``, ``2 + 2``, ``\\sqrt{2}``) must equal every other, and then the last right-hand side is
  compared as usual. ``x = 4`` == ``4`` and ``2 + 2 = 4`` == ``4``, but ``3 = 4`` != ``4`` and
  ``x = 2 + 2 = 5`` != ``5`` (math-verify alone reads both by their last side: a hedge would
  pass). Sides that name something (``x``, ``AB``, ``f(2)``) are not checked. A gold equation
  (``y = 2x + 1``) is compared by math-verify as before.
- Redundant brace groups around a whole answer are dropped on both sides (``{{4}}`` == ``4``).
- Predicted answers longer than ``MAX_ANSWER_CHARS`` are scored 0 without parsing.

Time limits
-----------
math-verify's own timeouts use ``signal.alarm``: whole seconds only (a float such as 0.5 makes
``parse`` silently return ``[]``: the ``TypeError`` from ``signal.alarm(0.5)`` is swallowed),
main thread only, and a signal cannot interrupt a long C call. So ``score_math`` does all its
work (extraction, then comparison) in a persistent worker *process* (stdlib + math-verify only;
it never imports torch or this package's ``__init__``); the caller only cuts the response to its
examined tail and waits at most ``timeout`` seconds for extraction and verdict together, then
kills the worker (SIGKILL) and scores 0 with a ``"timeout"`` detail (rule
``"extraction_timeout"`` if the extraction itself had not come back). A fresh worker is started
on the next call (about 1 s; start-up time is not charged to any call). Inside the worker
math-verify's own timeouts (``max(1, int(timeout / 3))`` s per parse / verify) usually stop slow cases first,
so the worker survives; the worker also runs under an address-space limit
(``WORKER_MEMORY_LIMIT_MB``) so a huge power raises ``MemoryError`` (scored 0) instead of
exhausting the host. ``extract_answer`` called directly runs in the caller; it is linear-time
and bounded by ``MAX_RESPONSE_CHARS``.
``score_math`` is thread-safe (each concurrent call checks out its own worker; that is how
``score_math_many`` parallelises) and fork-safe (a forked child starts its own workers and never
talks to its parent's).
"""

from __future__ import annotations

import atexit
import os
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterable

__all__ = [
    "MathResult",
    "extract_answer",
    "score_math",
    "score_math_many",
    "close_workers",
    "FALLBACKS",
    "PERCENT_POLICIES",
]

FALLBACKS = ("none", "anchored", "last_number")
PERCENT_POLICIES = ("strip", "ratio")
DEFAULT_TIMEOUT = 5.0
MAX_RESPONSE_CHARS = 32_768  # only this many characters at the END of a response are examined
MAX_ANSWER_CHARS = 4096
WORKER_MEMORY_LIMIT_MB = 4096
WORKER_START_TIMEOUT = 120.0  # seconds allowed for a worker to import sympy + math-verify


@dataclass(frozen=True)
class MathResult:
    reward: float  # 1.0 if correct else 0.0
    correct: bool
    extracted_answer: str | None  # the answer string read from the response (None: no answer)
    rule: str  # which extraction rule fired (see module docstring)
    detail: str  # how the verdict was reached, for inspection


# =============================================================================================
# Extraction (pure string code, linear time; score_math runs it inside the worker process)
# =============================================================================================


def _window(text: str) -> str:
    """The part of a response that is examined: its last ``MAX_RESPONSE_CHARS`` characters."""
    return text[-MAX_RESPONSE_CHARS:] if len(text) > MAX_RESPONSE_CHARS else text


def _brace_pairs(text: str) -> dict[int, int]:
    """Position of each ``{`` -> position of its ``}``, in one forward pass with an explicit stack.

    ``\\{``, ``\\}`` and ``\\\\`` are escapes and never count. An unmatched ``{`` is absent from
    the result and an unmatched ``}`` is ignored. No recursion, so any depth is fine.
    """
    pairs: dict[int, int] = {}
    stack: list[int] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            stack.append(i)
        elif c == "}" and stack:
            pairs[stack.pop()] = i
        i += 1
    return pairs


def _strip_outer_braces(s: str) -> str:
    """``{{{4}}}`` -> ``4``: drop brace pairs that enclose the whole string (a LaTeX group there
    changes nothing, but a deep one makes the LaTeX parser recurse until it times out)."""
    s = s.strip()
    if not s.startswith("{"):
        return s
    pairs = _brace_pairs(s)
    lo, hi = 0, len(s) - 1  # s[lo : hi + 1] is what remains
    while lo < hi and s[lo] == "{" and pairs.get(lo) == hi:
        lo, hi = lo + 1, hi - 1
        while lo <= hi and s[lo].isspace():
            lo += 1
        while hi >= lo and s[hi].isspace():
            hi -= 1
    return s[lo : hi + 1]


_BOX_COMMAND = re.compile(r"\\(boxed|fbox)")
_SPACES = re.compile(r"\s*")
_BARE_TOKEN = re.compile(r"[^\s$]+")


def _last_box(text: str) -> tuple[str | None, str] | None:
    """The last non-empty box: (content, rule); (None, "unclosed_box"); or None if no box.

    Linear: the commands are found in one regex pass and the braces are matched in one pass;
    every skipped candidate (empty box, other command) costs only its own characters.
    """
    n = len(text)
    pairs: dict[int, int] | None = None
    for m in reversed(list(_BOX_COMMAND.finditer(text))):
        name, j = m.group(1), m.end()
        if j < n and text[j].isalpha():  # \boxedfoo, \fboxsep: another command
            continue
        j = _SPACES.match(text, j).end()
        if j >= n:
            continue
        if text[j] == "{":
            if pairs is None:
                pairs = _brace_pairs(text)
            end = pairs.get(j)
            if end is None:
                return None, "unclosed_box"
            content = _strip_outer_braces(text[j + 1 : end])
            if not content:
                continue
            return content, name
        t = _BARE_TOKEN.match(text, j)
        token = t.group(0).rstrip(".,;:") if t else ""
        if token:
            return token, "boxed_bare"
    return None


# Possessive quantifiers (*+, ++): a run of spaces after "answer" that is not followed by the
# expected ":" must fail at once instead of being re-split between the two space runs (O(n^2)).
_ANCHORS = (
    ("gsm8k", re.compile(r"####[ \t]*+([^\n]*)")),
    ("answer_is", re.compile(r"(?i)\banswer\s++is\b[ \t]*+:?[ \t]*+([^\n]*)")),
    ("answer_colon", re.compile(r"(?i)\banswer\b[ \t]*+\**+[ \t]*+:[ \t]*+([^\n]*)")),
)
_SEGMENT_OPENER = re.compile(r"\$|\\[(\[]")
_SEGMENT_CLOSER = {"\\(": "\\)", "\\[": "\\]"}
_SENTENCE_END = re.compile(r"\.(?=\s|$)")
_LAST_NUMBER = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+(?![\d])|\d+)(?:\.\d+)?(?:/\d+)?")


def _first_math_segment(line: str) -> str | None:
    """Content of the leftmost non-empty ``$$..$$``, ``$..$``, ``\\(..\\)`` or ``\\[..\\]`` in one
    line (``$$`` preferred over ``$`` at the same place; the closer is the nearest one), or None.

    A lazy regex (``\\\\\\((.+?)\\\\\\)`` and the like) gives the same result, but for every opener
    that never closes it scans to the end of the line: quadratic on ``\\(\\(\\(...``. Here an
    opener is rejected in O(1) by comparing its position with the LAST position of its closer,
    and only the winning opener is scanned for its nearest closer.
    """
    last = {c: line.rfind(c) for c in ("$$", "$", "\\)", "\\]")}
    for m in _SEGMENT_OPENER.finditer(line):
        i, opener = m.start(), m.group(0)
        if opener == "$":
            candidates = (("$$", "$$"), ("$", "$")) if line.startswith("$$", i) else (("$", "$"),)
        else:
            candidates = ((opener, _SEGMENT_CLOSER[opener]),)
        for op, closer in candidates:
            start = i + len(op)  # the content starts here and holds at least one character
            if last[closer] > start:
                return line[start : line.find(closer, start + 1)]
    return None


def _clean_inline(value: str) -> str:
    v = value.strip().strip("*").strip()
    segment = _first_math_segment(v)
    if segment is not None:
        v = segment
    else:
        m = _SENTENCE_END.search(v)
        if m:
            v = v[: m.start()]
    return v.strip().strip("*").rstrip(".,;:").strip()


def _anchored(text: str) -> tuple[str, str] | None:
    # Each pattern matches at most once per line (it takes the rest of the line), so all the
    # captured values together are at most three times the text.
    found = []
    for rule, pattern in _ANCHORS:
        for m in pattern.finditer(text):
            found.append((m.start(), rule, m.group(1)))
    for _, rule, value in sorted(found, key=lambda t: t[0], reverse=True):
        v = _clean_inline(value)
        if v:
            return v, rule
    return None


def extract_answer(text: str, *, fallback: str = "last_number") -> tuple[str | None, str]:
    """Return ``(answer, rule)``; ``answer`` is None when nothing is found (rule says why).

    Only the last ``MAX_RESPONSE_CHARS`` characters of ``text`` are examined; the time taken is
    linear in that (a few milliseconds at most), whatever the text contains.
    """
    if fallback not in FALLBACKS:
        raise ValueError(f"fallback={fallback!r}: expected one of {', '.join(FALLBACKS)}")
    text = _window(text)
    box = _last_box(text)
    if box is not None:
        return box
    if fallback == "none":
        return None, "none"
    hit = _anchored(text)
    if hit is not None:
        return hit
    if fallback == "last_number":
        last = None
        for last in _LAST_NUMBER.finditer(text):
            pass
        if last is not None:
            return last.group(0), "last_number"
    return None, "none"


def _gold_answer(gold: str) -> str:
    s = str(gold).strip()
    if "\\boxed" in s or "\\fbox" in s:
        box = _last_box(s)
        if box is not None and box[0]:
            return box[0]
    if "####" in s:
        return _clean_inline(s.rsplit("####", 1)[1].split("\n", 1)[0])
    return s


# =============================================================================================
# Normalisation and comparison (runs inside the worker process)
# =============================================================================================

_TEXT_CMD = r"\\(?:text|textbf|textit|textrm|textnormal|textsf|mathrm|mbox)"
_WHOLE_TEXT = re.compile(_TEXT_CMD + r"\s*\{")
_TEXT_GROUP = re.compile(_TEXT_CMD + r"\s*\{([^{}]*)\}")
_LEFT_RIGHT_DOT = re.compile(r"\\(?:left|right)\s*\.")
_SIZE_CMDS = re.compile(r"\\(?:left|right|bigl|bigr|Bigl|Bigr|biggl|biggr|Biggl|Biggr|big|Big|bigg|Bigg)(?![A-Za-z])\s*")
_DEGREES = re.compile(
    r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ(?![A-Za-z])|\^\s*\{\s*\\degree\s*\}|\\degree(?![A-Za-z])"
)
_CHOICE_GOLD = re.compile(r"\(?([A-J])\)?")
_CHOICE_PRED = re.compile(r"\(?([A-Ja-j])\)?(?=$|[\s.:)])")
_WORDS = re.compile(r"[A-Za-z]+(?:[\s\-']+[A-Za-z]+)*")
_MATH_WORDS = {
    "sin", "cos", "tan", "cot", "sec", "csc", "arcsin", "arccos", "arctan", "sinh", "cosh", "tanh",
    "log", "ln", "exp", "sqrt", "max", "min", "det", "gcd", "lcm", "mod", "pi", "inf", "infty",
    "infinity", "lim", "sup",
}
_SHORT_UNITS = {
    "cm", "mm", "km", "kg", "mg", "ml", "ft", "yd", "mi", "hr", "lb", "oz", "in", "mph", "kph",
    "sq", "dm", "nm", "gb", "mb", "kb", "kw", "hz",
}
_UNIT_TEXT = re.compile(
    r"(?:\\[,;:! ]|~|\s)*(\\(?:text|textrm|textnormal|textit|mbox|mathrm))\s*\{([^{}]*)\}"
    r"\s*(?:\^\s*\{?\s*[23]\s*\}?)?\s*$"
)
_UNIT_WORD = re.compile(r"[A-Za-z]+(?:[/\-][A-Za-z]+)*(?:\^\{?[23]\}?)?")
_THOUSANDS = re.compile(r"[-+]?\d{1,3}(?:(?:,|\{,\}|\\,|\\ |\s)\d{3})+(?:\.\d+)?")
_THOUSANDS_SEP = re.compile(r"\{,\}|\\,|\\ |,|\s")
_SCI = re.compile(r"([-+]?\d+(?:\.\d+)?)\s*[eE]\s*([-+]?\d+)")
_TOKENS = re.compile(r"\\[A-Za-z]+|[A-Za-z]+|\d+(?:\.\d+)?|\S")


def _strip_delimiters(s: str) -> str:
    changed = True
    while changed:
        changed = False
        s = s.strip()
        for o, c in (("$$", "$$"), ("\\[", "\\]"), ("\\(", "\\)"), ("$", "$")):
            if len(s) >= len(o) + len(c) and s.startswith(o) and s.endswith(c):
                s = s[len(o) : -len(c)]
                changed = True
                break
    return s


def _basic(s: str) -> str:
    s = (
        s.replace("\u2212", "-")
        .replace("\u00a0", " ")
        .replace("\u00d7", "\\times ")
        .replace("\u00b0", "^\\circ")
        .replace("\u03c0", "\\pi ")
    )
    s = _strip_outer_braces(_strip_delimiters(s))
    s = _LEFT_RIGHT_DOT.sub("", s)
    s = _SIZE_CMDS.sub("", s)
    s = re.sub(r"\\[dt]frac(?![A-Za-z])", r"\\frac", s)
    s = re.sub(r"\\displaystyle(?![A-Za-z])|\\!", "", s)
    s = re.sub(r"\\(?:mathrm|text|textrm)\s*\{\s*([ie])\s*\}", r"\1", s)  # upright i, e
    return s.strip().rstrip(" .;").strip()


def _unwrap_whole(s: str) -> tuple[str, bool]:
    """Remove text wrappers spanning the whole answer: ``\\text{(A)}`` -> ``(A)``.

    The wrappers are peeled by moving two bounds over one brace table, so a deeply nested
    ``\\text{\\text{...}}`` costs one pass rather than one pass per level.
    """
    wrapped = False
    pairs: dict[int, int] | None = None
    lo, hi = 0, len(s)  # s[lo:hi] is what remains
    while True:
        m = _WHOLE_TEXT.match(s, lo, hi)
        if not m:
            return s[lo:hi], wrapped
        if pairs is None:
            pairs = _brace_pairs(s)
        if pairs.get(m.end() - 1) != hi - 1:
            return s[lo:hi], wrapped
        lo, hi = m.end(), hi - 1
        # the same as .strip().rstrip(".").strip() on s[lo:hi]
        while lo < hi and s[lo].isspace():
            lo += 1
        while hi > lo and s[hi - 1].isspace():
            hi -= 1
        while hi > lo and s[hi - 1] == ".":
            hi -= 1
        while hi > lo and s[hi - 1].isspace():
            hi -= 1
        wrapped = True


def _text_form(s: str) -> str | None:
    for _ in range(3):
        s = _TEXT_GROUP.sub(r" \1 ", s)
    s = re.sub(r"\\[ ,;:]|~|\\quad|\\qquad", " ", s).strip().rstrip(".").strip()
    if _WORDS.fullmatch(s):
        return " ".join(s.lower().split())
    return None


def _is_text_gold(raw: str, unwrapped: str, wrapped: bool) -> bool:
    form = _text_form(unwrapped)
    if form is None:
        return False
    words = re.findall(r"[a-z]+", form)
    if any(w in _MATH_WORDS for w in words):
        return False
    return wrapped or "\\text" in raw or "\\mbox" in raw or len(words) > 1 or any(len(w) >= 3 for w in words)


def _numberish(s: str) -> bool:
    s = re.sub(r"^\s*[A-Za-z]\s*=", "", s)  # "x = 5 cm"
    bare = re.sub(r"\\[A-Za-z]+", "", s)
    return bool(re.search(r"\d", bare)) and not re.search(r"[A-Za-z]", bare)


def _strip_units(s: str) -> str:
    for _ in range(3):
        m = _UNIT_TEXT.search(s)
        if not m:
            break
        cmd, content = m.group(1), m.group(2).strip()
        rest = s[: m.start()].strip()
        if not rest or not re.fullmatch(r"[A-Za-z][A-Za-z .\-/']*", content):
            break
        if cmd == "\\mathrm" and len(re.sub(r"[^A-Za-z]", "", content)) < 2:
            break
        s = rest
    words: list[str] = []
    rest = s
    while True:
        parts = rest.rsplit(None, 1)
        if len(parts) < 2 or not _UNIT_WORD.fullmatch(parts[1]) or parts[0].endswith("\\"):
            break
        words.insert(0, parts[1])
        rest = parts[0]
    if words and _numberish(rest):
        first = re.match(r"[A-Za-z]+", words[0]).group(0).lower()
        if (len(first) >= 3 or first in _SHORT_UNITS) and first not in _MATH_WORDS:
            s = rest.strip()
    return s


def _math_norm(s: str, percent: str) -> str:
    s, _ = _unwrap_whole(_basic(s))
    s = _DEGREES.sub("", s)
    s = re.sub(r"\\text\s*\{\s*(?:\\%|%|percent)\s*\}", r"\\%", s)
    s = re.sub(r"\s*\bpercent\s*$", r"\\%", s)
    s = re.sub(r"(?<!\\)%", r"\\%", s)
    if "\\%" in s:
        s = s.replace("\\%", "" if percent == "strip" else "\\cdot\\frac{1}{100}")
    s = re.sub(r"\\\$|(?<!\\)\$", "", s)
    s = re.sub(r"\\text\s*\{\s*\}", "", s).strip()
    s = _strip_units(s)
    s = s.strip().rstrip(" .;").strip()
    if _THOUSANDS.fullmatch(s):
        s = _THOUSANDS_SEP.sub("", s)
    m = _SCI.fullmatch(s)
    if m:
        s = f"{m.group(1)}\\times 10^{{{m.group(2)}}}"
    return s


def _outer_kind(s: str) -> str | None:
    """"set" for ``\\{...\\}``, "group" for ``(...)``/``[...]`` with a top-level comma, else None."""
    s = s.strip()
    if s.startswith("\\{"):
        kind, i = "set", 2
    elif s[:1] in ("(", "["):
        kind, i = "group", 1
    else:
        return None
    depth, comma, n = 1, False, len(s)
    while i < n:
        if s.startswith("\\{", i) or s.startswith("\\}", i):
            depth += 1 if s[i + 1] == "{" else -1
            i += 2
        elif s[i] == "\\":
            i += 2
            continue
        else:
            c = s[i]
            if c in "([{":
                depth += 1
            elif c in ")]}":
                depth -= 1
            elif c == "," and depth == 1:
                comma = True
            i += 1
        if depth == 0:
            if i < n:
                return None  # the first group closes before the end: e.g. (1,2)\cup(3,4)
            return "set" if kind == "set" else ("group" if comma else None)
    return None


_PARSE_CACHE: dict[str, object] = {}


def _parse(s: str, inner_timeout: int):
    """Parse one normalised answer with math-verify; returns a sympy object or None."""
    if s in _PARSE_CACHE:
        return _PARSE_CACHE[s]
    from latex2sympy2_extended import NormalizationConfig
    from math_verify import LatexExtractionConfig, parse

    config = LatexExtractionConfig(
        try_extract_without_anchor=False,
        boxed_match_priority=0,
        # units=False: math-verify's unit list strips trailing single letters ("a + b + c").
        normalization_config=NormalizationConfig(
            basic_latex=True, units=False, malformed_operators=True, nits=True, boxed="all", equations=False
        ),
    )
    out = parse(
        "\\boxed{" + s + "}",
        extraction_config=[config],
        fallback_mode="no_fallback",
        parsing_timeout=inner_timeout,
        raise_on_error=True,
    )
    value = out[0] if out else None
    if len(_PARSE_CACHE) > 512:
        _PARSE_CACHE.clear()
    _PARSE_CACHE[s] = value
    return value


def _numbers_agree(g, p) -> bool:
    """Relative check for plain numbers when one is a float (math-verify rounds absolutely)."""
    from sympy import Float, Number

    if not (isinstance(g, Number) and isinstance(p, Number)):
        return True
    if not (isinstance(g, Float) or isinstance(p, Float)):
        return True
    try:
        a, b = float(g), float(p)
    except (OverflowError, TypeError, ValueError):
        return True
    return abs(a - b) <= 1.5e-6 * max(abs(a), abs(b))


def _is_relation(expr) -> bool:
    """An equation or inequality, or a chain of them (``Eq``, ``<``, ``And`` of those)."""
    from sympy import And
    from sympy.core.relational import Relational

    return isinstance(expr, Relational) or (
        isinstance(expr, And) and any(isinstance(a, Relational) for a in expr.args)
    )


def _chain_sides(expr) -> list | None:
    """The sides of ``a = b = c`` (parsed as ``Eq`` or an ``And`` of ``Eq``), else None."""
    from sympy import And, Eq

    if isinstance(expr, Eq):
        links = [expr]
    elif isinstance(expr, And) and expr.args and all(isinstance(a, Eq) for a in expr.args):
        links = list(expr.args)
    else:
        return None
    sides = []
    for link in links:
        sides += [link.lhs, link.rhs]
    return sides


def _is_value(expr) -> bool:
    """A plain value: no variables, no undefined functions (``3``, ``2 + 2``, ``\\sqrt{2}``; not
    ``x``, ``AB`` or ``f(2)``, which name something)."""
    from sympy.core.function import AppliedUndef

    try:
        return not expr.free_symbols and not expr.atoms(AppliedUndef)
    except Exception:  # noqa: BLE001 - something without sympy's API is not a plain value
        return False


def _false_link(pred, inner_timeout: int) -> str | None:
    """For an equation chain, a pair of its variable-free sides that differ (``3 = 4``), else None.

    math-verify reads an equation against a non-equation gold by its last right-hand side only,
    so ``3 = 4`` would count as ``4``: a hedge. Sides that name something (``x``, ``AB``,
    ``f(2)``) are labels and are not checked; every side that is a plain value must be equal.
    """
    from math_verify import verify

    sides = _chain_sides(pred)
    if sides is None:
        return None
    values = list(dict.fromkeys(s for s in sides if _is_value(s)))  # unique, in order
    for other in values[1:]:
        same = verify(values[0], other, timeout_seconds=inner_timeout, raise_on_error=True)
        if not (same and _numbers_agree(values[0], other)):
            return f"{values[0]} != {other}"
    return None


def _compare(gold: str, pred: str, percent: str, inner_timeout: int) -> tuple[bool, str]:
    """Verdict and detail for one (gold answer, predicted answer) pair of strings."""
    g_basic, p_basic = _basic(gold), _basic(pred)
    g_un, g_wrapped = _unwrap_whole(g_basic)
    p_un, _ = _unwrap_whole(p_basic)

    m = _CHOICE_GOLD.fullmatch(g_un)
    if m:
        letter = m.group(1)
        pm = _CHOICE_PRED.match(_TEXT_GROUP.sub(r"\1", p_un).strip())
        got = pm.group(1).upper() if pm else None
        return got == letter, f"choice: gold {letter}, answer {got}"

    if _is_text_gold(g_basic, g_un, g_wrapped):
        gt, pt = _text_form(g_un), _text_form(p_un)
        return gt == pt, f"text: gold {gt!r}, answer {pt!r}"

    g_norm, p_norm = _math_norm(gold, percent), _math_norm(pred, percent)
    shown = f"gold {g_norm!r}, answer {p_norm!r}"
    if not g_norm or not p_norm:
        return False, f"empty after normalisation: {shown}"
    kinds = {_outer_kind(g_norm), _outer_kind(p_norm)}
    if kinds == {"set", "group"}:
        return False, f"structure mismatch (set vs tuple/interval): {shown}"

    from math_verify import verify
    from math_verify.errors import TimeoutException

    try:
        g = _parse(g_norm, inner_timeout)
    except TimeoutException:
        return False, f"timeout parsing gold: {shown}"
    if g is None:
        same = _TOKENS.findall(g_norm) == _TOKENS.findall(p_norm)
        return same, f"gold not parseable by math-verify; token-identical={same}: {shown}"
    try:
        p = _parse(p_norm, inner_timeout)
    except TimeoutException:
        return False, f"timeout parsing answer: {shown}"
    if p is None:
        return False, f"answer not parseable: {shown}"
    if not _is_relation(g):  # a gold equation or inequality is left to math-verify as it is
        try:
            bad = _false_link(p, inner_timeout)
        except TimeoutException:
            return False, f"timeout checking equation chain: {shown}"
        except Exception as e:  # noqa: BLE001
            return False, f"equation chain check error {type(e).__name__}: {shown}"
        if bad is not None:
            return False, f"false equation chain ({bad}): {shown}"
    try:
        ok = verify(g, p, timeout_seconds=inner_timeout, raise_on_error=True)
    except TimeoutException:
        return False, f"timeout in verify: {shown}"
    except Exception as e:  # noqa: BLE001 - a comparison error is a wrong answer, not a crash
        return False, f"verify error {type(e).__name__}: {shown}"
    if ok and not _numbers_agree(g, p):
        return False, f"numbers differ beyond relative 1.5e-6: {shown}"
    return bool(ok), f"math-verify {'equal' if ok else 'not equal'}: {shown}"


# =============================================================================================
# Worker processes
# =============================================================================================

_BOOT = (
    "import importlib.util as u, sys\n"
    "s = u.spec_from_file_location('_tracerl_math_worker', sys.argv[1])\n"
    "m = u.module_from_spec(s); sys.modules['_tracerl_math_worker'] = m; s.loader.exec_module(m)\n"
    "m._worker_main(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))\n"
)


def _worker_main(read_fd: int, write_fd: int, memory_mb: int) -> None:
    import logging
    import signal
    import warnings
    from multiprocessing.connection import Connection

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's business

    if memory_mb > 0:
        try:
            import resource

            soft, hard = resource.getrlimit(resource.RLIMIT_AS)
            limit = memory_mb * 1024 * 1024
            if hard != resource.RLIM_INFINITY:
                limit = min(limit, hard)
            resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
        except (ImportError, ValueError, OSError):
            pass
    warnings.filterwarnings("ignore")
    for name in ("math_verify", "latex2sympy2_extended"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    sys.stdout = sys.stderr  # stray prints must never reach the parent's stdout
    inbox = Connection(read_fd, writable=False)
    outbox = Connection(write_fd, readable=False)
    import math_verify  # noqa: F401  (import cost paid before "ready")

    _compare("1", "1", "strip", 1)  # warm the parser (antlr) before the first real call
    outbox.send(("ready",))
    while True:
        try:
            response, gold, fallback, percent, inner = inbox.recv()
        except (EOFError, OSError):
            return
        # Two replies: the extraction first, so that the caller still knows the answer when the
        # comparison after it has to be killed; then the verdict.
        try:
            answer, rule = extract_answer(response, fallback=fallback)
            failed = None
        except MemoryError:
            answer, rule, failed = None, "extraction_error", "memory limit exceeded during extraction"
        except Exception as e:  # noqa: BLE001
            answer, rule, failed = None, "extraction_error", f"extraction error {type(e).__name__}"
        outbox.send((answer, rule))
        outbox.send((False, failed) if failed else _judge(answer, gold, percent, inner))


def _judge(answer: str | None, gold: str, percent: str, inner: int) -> tuple[bool, str]:
    """Verdict and detail for an extracted answer (runs in the worker)."""
    if answer is None:
        return False, "no answer extracted"
    try:
        gold_answer = _gold_answer(gold)
        if not gold_answer:
            return False, "empty gold answer"
        if len(answer) > MAX_ANSWER_CHARS:
            return False, f"answer longer than {MAX_ANSWER_CHARS} characters"
        return _compare(gold_answer, answer, percent, inner)
    except MemoryError:
        return False, "memory limit exceeded"
    except Exception as e:  # noqa: BLE001
        return False, f"error {type(e).__name__}"


class _Worker:
    def __init__(self) -> None:
        from multiprocessing.connection import Connection

        self.owner = os.getpid()
        p2c_r, p2c_w = os.pipe()
        c2p_r, c2p_w = os.pipe()
        # -P (3.11+): do not put the current directory first on sys.path (no shadowing of
        # stdlib / sympy by stray files where the trainer happens to run).
        flags = ["-P"] if sys.version_info >= (3, 11) else []
        try:
            self.proc = subprocess.Popen(
                [sys.executable, *flags, "-c", _BOOT, os.path.abspath(__file__), str(p2c_r), str(c2p_w),
                 str(WORKER_MEMORY_LIMIT_MB)],
                pass_fds=(p2c_r, c2p_w),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
            )
        finally:
            os.close(p2c_r)
            os.close(c2p_w)
        self.outbox = Connection(p2c_w, readable=False)
        self.inbox = Connection(c2p_r, writable=False)
        if not self.inbox.poll(WORKER_START_TIMEOUT):
            self.kill()
            raise RuntimeError(f"math reward worker did not start within {WORKER_START_TIMEOUT:.0f} s")
        try:
            self.inbox.recv()
        except EOFError as e:
            self.kill()
            raise RuntimeError("math reward worker exited during start-up (is math-verify installed?)") from e

    def score(self, response: str, gold: str, fallback: str, percent: str, timeout: float) -> MathResult:
        """Extraction and verdict within ``timeout`` s in all; past it the worker is killed and the
        response scores 0 (rule ``"extraction_timeout"`` if not even the extraction came back)."""
        inner = max(1, int(timeout / 3))  # math-verify's alarms take whole seconds
        deadline = time.monotonic() + timeout
        answer, rule = None, None  # rule stays None until the extraction has come back
        try:
            self.outbox.send((response, gold, fallback, percent, inner))
            if self.inbox.poll(timeout):
                answer, rule = self.inbox.recv()
                if self.inbox.poll(max(0.0, deadline - time.monotonic())):
                    ok, detail = self.inbox.recv()
                    return MathResult(1.0 if ok else 0.0, bool(ok), answer, rule, detail)
                reason = f"timeout: no verdict within {timeout:g} s (worker killed)"
            else:
                rule = "extraction_timeout"
                reason = f"timeout: no answer extracted within {timeout:g} s (worker killed)"
        except (EOFError, OSError) as e:
            rule = rule or "extraction_error"
            reason = f"worker died ({type(e).__name__}, exit code {self.proc.poll()})"
        self.kill()
        return MathResult(0.0, False, answer, rule, reason)

    @property
    def alive(self) -> bool:
        return not self.outbox.closed and self.proc.poll() is None

    def kill(self) -> None:
        for conn in (self.outbox, self.inbox):
            try:
                conn.close()
            except OSError:
                pass
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass

    def forget(self) -> None:
        """In a forked child: drop our copies of the pipes; the process belongs to the parent."""
        for conn in (self.outbox, self.inbox):
            try:
                conn.close()
            except OSError:
                pass

    def close(self) -> None:
        try:
            self.outbox.close()  # EOF: the worker leaves its loop
            self.proc.wait(timeout=2)
        except (OSError, subprocess.TimeoutExpired):
            pass
        self.kill()


_LOCK = threading.Lock()
_IDLE: list[_Worker] = []
_MAX_IDLE = max(4, os.cpu_count() or 4)


def _acquire() -> _Worker:
    with _LOCK:
        while _IDLE:
            w = _IDLE.pop()
            if w.owner == os.getpid() and w.alive:
                return w
            if w.owner == os.getpid():
                w.kill()
            else:
                w.forget()
    return _Worker()


def _release(w: _Worker) -> None:
    if not w.alive:
        return
    with _LOCK:
        if len(_IDLE) < _MAX_IDLE:
            _IDLE.append(w)
            return
    w.close()


def close_workers() -> None:
    """Stop the idle worker processes (they are also stopped at interpreter exit)."""
    with _LOCK:
        workers = list(_IDLE)
        _IDLE.clear()
    for w in workers:
        w.close()


def _after_fork_in_child() -> None:
    # A forked child (e.g. a data-loader worker) must not talk to its parent's workers.
    global _LOCK, _IDLE
    inherited, _IDLE, _LOCK = _IDLE, [], threading.Lock()
    for w in inherited:
        w.forget()


atexit.register(close_workers)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


# =============================================================================================
# Scoring
# =============================================================================================


def score_math(
    response: str,
    gold: str,
    *,
    fallback: str = "last_number",
    timeout: float = DEFAULT_TIMEOUT,
    percent: str = "strip",
) -> MathResult:
    """Score one response against one gold answer (reward 1.0 if equivalent, else 0.0).

    ``timeout`` (seconds) bounds the extraction and the equivalence check together: the call
    returns within about that time (plus a one-off worker start-up) whatever the response is.
    """
    if percent not in PERCENT_POLICIES:
        raise ValueError(f"percent={percent!r}: expected one of {', '.join(PERCENT_POLICIES)}")
    if fallback not in FALLBACKS:
        raise ValueError(f"fallback={fallback!r}: expected one of {', '.join(FALLBACKS)}")
    if not (timeout and timeout > 0):
        raise ValueError(f"timeout={timeout!r}: expected a positive number of seconds")
    # Extraction happens in the worker, under the same time limit as the comparison, so that no
    # response can hold the caller; only the examined tail of the response is sent there.
    worker = _acquire()
    try:
        return worker.score(_window(response), str(gold), fallback, percent, float(timeout))
    finally:
        _release(worker)


def score_math_many(
    pairs: Iterable[tuple[str, str]],
    *,
    workers: int | None = None,
    fallback: str = "last_number",
    timeout: float = DEFAULT_TIMEOUT,
    percent: str = "strip",
) -> list[MathResult]:
    """Score ``(response, gold)`` pairs in order, ``workers`` comparisons at a time."""
    pairs = list(pairs)
    if not pairs:
        return []
    n = workers if workers is not None else min(len(pairs), os.cpu_count() or 1)
    if n < 1:
        raise ValueError(f"workers={workers!r}: expected a positive integer")

    def one(pair: tuple[str, str]) -> MathResult:
        response, gold = pair
        return score_math(response, gold, fallback=fallback, timeout=timeout, percent=percent)

    if n == 1:
        return [one(p) for p in pairs]
    with ThreadPoolExecutor(max_workers=n) as pool:
        return list(pool.map(one, pairs))
