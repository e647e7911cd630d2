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
1. The LAST ``\\boxed{...}`` / ``\\fbox{...}`` (rule ``"boxed"`` / ``"fbox"``), braces balanced
   (``\\{`` and ``\\}`` are literal braces and do not count), or ``\\boxed 5`` without braces
   (rule ``"boxed_bare"``: the next whitespace-free token, trailing ``.,;:`` removed).
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
- Predicted answers longer than ``MAX_ANSWER_CHARS`` are scored 0 without parsing.

Time limits
-----------
math-verify's own timeouts use ``signal.alarm``: whole seconds only (a float such as 0.5 makes
``parse`` silently return ``[]``: the ``TypeError`` from ``signal.alarm(0.5)`` is swallowed),
main thread only, and a signal cannot interrupt a long C call. So every comparison runs in a
persistent worker *process* (stdlib + math-verify only; it never imports torch or this package's
``__init__``); the caller waits at most ``timeout`` seconds for the verdict, then kills the
worker (SIGKILL) and scores 0 with a ``"timeout"`` detail. A fresh worker is started on the next
call (about 1 s; start-up time is not charged to any comparison). Inside the worker math-verify's
own timeouts (``max(1, int(timeout / 3))`` s per parse / verify) usually stop slow cases first,
so the worker survives; the worker also runs under an address-space limit
(``WORKER_MEMORY_LIMIT_MB``) so a huge power raises ``MemoryError`` (scored 0) instead of
exhausting the host. Extraction (``extract_answer``) runs in the caller and is linear-time.
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
# Extraction (runs in the caller; pure string code, linear time)
# =============================================================================================


def _balanced_group(text: str, open_pos: int) -> int | None:
    """Index of the ``}`` closing the ``{`` at ``open_pos``; escaped ``\\{ \\} \\\\`` are skipped."""
    depth = 0
    i, n = open_pos, len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


_BARE_TOKEN = re.compile(r"[^\s$]+")


def _last_box(text: str) -> tuple[str | None, str] | None:
    """The last non-empty box: (content, rule); (None, "unclosed_box"); or None if no box."""
    pos = len(text)
    n = len(text)
    while True:
        i_boxed = text.rfind("\\boxed", 0, pos)
        i_fbox = text.rfind("\\fbox", 0, pos)
        i = max(i_boxed, i_fbox)
        if i < 0:
            return None
        name = "boxed" if i == i_boxed else "fbox"
        j = i + 1 + len(name)
        pos = i  # the next iteration searches left of this command
        if j < n and text[j].isalpha():  # \boxedfoo, \fboxsep: another command
            continue
        while j < n and text[j].isspace():
            j += 1
        if j >= n:
            continue
        if text[j] == "{":
            end = _balanced_group(text, j)
            if end is None:
                return None, "unclosed_box"
            content = text[j + 1 : end].strip()
            if not content:
                continue
            return content, name
        m = _BARE_TOKEN.match(text, j)
        token = m.group(0).rstrip(".,;:") if m else ""
        if token:
            return token, "boxed_bare"


_ANCHORS = (
    ("gsm8k", re.compile(r"####[ \t]*([^\n]*)")),
    ("answer_is", re.compile(r"(?i)\banswer\s+is\b[ \t]*:?[ \t]*([^\n]*)")),
    ("answer_colon", re.compile(r"(?i)\banswer\b[ \t]*\**[ \t]*:[ \t]*([^\n]*)")),
)
_MATH_SEGMENT = re.compile(r"\$\$(.+?)\$\$|\$(.+?)\$|\\\((.+?)\\\)|\\\[(.+?)\\\]")
_SENTENCE_END = re.compile(r"\.(?=\s|$)")
_LAST_NUMBER = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+(?![\d])|\d+)(?:\.\d+)?(?:/\d+)?")


def _clean_inline(value: str) -> str:
    v = value.strip().strip("*").strip()
    m = _MATH_SEGMENT.search(v)
    if m:
        v = next(g for g in m.groups() if g is not None)
    else:
        m = _SENTENCE_END.search(v)
        if m:
            v = v[: m.start()]
    return v.strip().strip("*").rstrip(".,;:").strip()


def _anchored(text: str) -> tuple[str, str] | None:
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
    """Return ``(answer, rule)``; ``answer`` is None when nothing is found (rule says why)."""
    if fallback not in FALLBACKS:
        raise ValueError(f"fallback={fallback!r}: expected one of {', '.join(FALLBACKS)}")
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
    s = _strip_delimiters(s)
    s = _LEFT_RIGHT_DOT.sub("", s)
    s = _SIZE_CMDS.sub("", s)
    s = re.sub(r"\\[dt]frac(?![A-Za-z])", r"\\frac", s)
    s = re.sub(r"\\displaystyle(?![A-Za-z])|\\!", "", s)
    s = re.sub(r"\\(?:mathrm|text|textrm)\s*\{\s*([ie])\s*\}", r"\1", s)  # upright i, e
    return s.strip().rstrip(" .;").strip()


def _unwrap_whole(s: str) -> tuple[str, bool]:
    """Remove text wrappers spanning the whole answer: ``\\text{(A)}`` -> ``(A)``."""
    wrapped = False
    while True:
        m = _WHOLE_TEXT.match(s)
        if not m:
            return s, wrapped
        end = _balanced_group(s, m.end() - 1)
        if end != len(s) - 1:
            return s, wrapped
        s = s[m.end() : end].strip().rstrip(".").strip()
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
            gold, pred, percent, inner = inbox.recv()
        except (EOFError, OSError):
            return
        try:
            ok, detail = _compare(gold, pred, percent, inner)
        except MemoryError:
            ok, detail = False, "memory limit exceeded"
        except Exception as e:  # noqa: BLE001
            ok, detail = False, f"error {type(e).__name__}"
        outbox.send((ok, detail))


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

    def compare(self, gold: str, pred: str, percent: str, timeout: float) -> tuple[bool, str]:
        """(equal, detail). After a timeout or a crash the worker is killed and the pair is wrong."""
        inner = max(1, int(timeout / 3))  # math-verify's alarms take whole seconds
        try:
            self.outbox.send((gold, pred, percent, inner))
            if self.inbox.poll(timeout):
                ok, detail = self.inbox.recv()
                return bool(ok), detail
            reason = f"timeout: no verdict within {timeout:g} s (worker killed)"
        except (EOFError, OSError) as e:
            reason = f"worker died ({type(e).__name__}, exit code {self.proc.poll()})"
        self.kill()
        return False, reason

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

    ``timeout`` (seconds) bounds the equivalence check: the call returns within about that time
    (plus a one-off worker start-up) whatever the expressions are.
    """
    if percent not in PERCENT_POLICIES:
        raise ValueError(f"percent={percent!r}: expected one of {', '.join(PERCENT_POLICIES)}")
    if not (timeout and timeout > 0):
        raise ValueError(f"timeout={timeout!r}: expected a positive number of seconds")
    answer, rule = extract_answer(response, fallback=fallback)
    if answer is None:
        return MathResult(0.0, False, None, rule, "no answer extracted")
    gold_answer = _gold_answer(gold)
    if not gold_answer:
        return MathResult(0.0, False, answer, rule, "empty gold answer")
    if len(answer) > MAX_ANSWER_CHARS:
        return MathResult(0.0, False, answer, rule, f"answer longer than {MAX_ANSWER_CHARS} characters")
    worker = _acquire()
    try:
        ok, detail = worker.compare(gold_answer, answer, percent, float(timeout))
    finally:
        _release(worker)
    return MathResult(1.0 if ok else 0.0, ok, answer, rule, detail)


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
