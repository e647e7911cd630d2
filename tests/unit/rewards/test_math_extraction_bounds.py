"""Bounds on math answer extraction (tracerl/rewards/math.py).

Responses produced during RL can be huge and degenerate: a 1 MB run of ``\\boxed{}``, an anchor
followed by tens of thousands of ``\\(``. Extraction must examine a bounded window, be linear in
it, and run inside the time-limited worker when scoring. Each test checks WHAT is extracted or
scored; the time bounds are deliberately loose (seconds, for work that takes milliseconds) and
only catch the quadratic behaviour that made these inputs take tens or hundreds of seconds.

The equation-chain and nested-brace tests go through the real worker and math-verify.
"""

from __future__ import annotations

import multiprocessing
import random
import re
import time

import pytest

from tracerl.rewards import math as math_reward
from tracerl.rewards.math import MAX_RESPONSE_CHARS, close_workers, extract_answer, score_math

BOUND_S = 5.0  # generous: these inputs take milliseconds now


def _child(conn, text, fallback):
    conn.send(extract_answer(text, fallback=fallback))
    conn.close()


def extract_within(text: str, *, fallback: str = "last_number", bound: float = BOUND_S):
    """``extract_answer(text)`` run in a forked child; the test fails if it needs over ``bound`` s.

    A child, so that a slow extraction is stopped at the bound instead of holding the test run.
    """
    ctx = multiprocessing.get_context("fork")
    here, there = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(there, text, fallback))
    proc.start()
    there.close()
    try:
        if not here.poll(bound):
            pytest.fail(f"extraction of a {len(text)}-character response took over {bound} s")
        return here.recv()
    finally:
        proc.kill()
        proc.join(10)
        here.close()


def parens_after_anchor(size: int) -> str:
    prefix = "The answer is "
    return prefix + "\\(" * ((size - len(prefix)) // 2)


EMPTY_BOXES_1MB = "\\boxed{}" * (1 << 17)  # 8 characters each: 1 MiB


# --- the examined window ---------------------------------------------------------------------


def test_window_is_a_generous_documented_constant():
    assert MAX_RESPONSE_CHARS >= 32_000
    assert "MAX_RESPONSE_CHARS" in math_reward.__doc__


def test_only_the_tail_of_a_long_response_is_examined():
    filler = "Let me check that once more. " * 4000  # about 116K characters
    # the early box lies before the window; the final anchored answer is inside it
    assert extract_within("\\boxed{1} " + filler + "So the answer is 7.") == ("7", "answer_is")
    # a final box at the end of a megabyte is found
    assert extract_within("x " * 500_000 + "\\boxed{42}") == ("42", "boxed")


def test_window_boundary():
    head = "#### 9"
    just_inside = head + " " * (MAX_RESPONSE_CHARS - len(head))
    assert extract_answer(just_inside, fallback="anchored") == ("9", "gsm8k")
    # one more character at the end pushes the first "#" out: no anchor any more
    assert extract_answer(just_inside + " ", fallback="anchored") == (None, "none")


# --- the measured pathological inputs --------------------------------------------------------


@pytest.mark.parametrize("size", [64_000, 250_000])
def test_anchor_then_many_open_parens(size):
    # The anchor is far before the end; the window holds only "\(" and no number.
    assert extract_within(parens_after_anchor(size)) == (None, "none")


def test_anchor_then_open_parens_inside_the_window():
    # every "\(" opens a segment that never closes; the real segment comes last
    text = "The answer is " + "\\(" * 15_000 + " $7$"
    assert len(text) < MAX_RESPONSE_CHARS
    assert extract_within(text) == ("7", "answer_is")


def test_megabyte_of_empty_boxes():
    assert extract_within(EMPTY_BOXES_1MB) == (None, "none")
    assert extract_within(EMPTY_BOXES_1MB + "\\boxed{3}") == ("3", "boxed")
    assert extract_within("\\boxed{3}" + EMPTY_BOXES_1MB) == (None, "none")  # before the window


def test_long_space_run_after_answer_word():
    # "answer" + spaces not followed by ":" used to be re-split between two space runs: O(n^2)
    spaces = " " * 30_000
    assert extract_within("Answer" + spaces + "x") == (None, "none")
    assert extract_within("Answer" + spaces + ": 5") == ("5", "answer_colon")


def test_math_segment_scan_agrees_with_the_lazy_regex():
    # The lazy regex this scanner replaces is the specification of which segment is taken.
    lazy = re.compile(r"\$\$(.+?)\$\$|\$(.+?)\$|\\\((.+?)\\\)|\\\[(.+?)\\\]")
    pieces = ["$", "$$", "\\", "\\(", "\\)", "\\[", "\\]", "(", ")", "x", " "]
    rng = random.Random(20261202)
    for _ in range(20_000):
        line = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 10)))
        m = lazy.search(line)
        expected = next(g for g in m.groups() if g is not None) if m else None
        assert math_reward._first_math_segment(line) == expected, line


# --- extraction happens in the time-limited worker ---------------------------------------------


def test_score_math_does_not_extract_in_the_caller(monkeypatch):
    def not_here(*args, **kwargs):
        raise AssertionError("extraction ran in the calling process")

    monkeypatch.setattr(math_reward, "extract_answer", not_here)
    monkeypatch.setattr(math_reward, "_last_box", not_here)
    r = score_math("so \\boxed{12}", "12")
    assert (r.correct, r.extracted_answer, r.rule) == (True, "12", "boxed")


def test_pathological_responses_do_not_hold_score_math():
    score_math("\\boxed{1}", "1")  # warm worker: start-up is not what is bounded here
    for response in (parens_after_anchor(64_000), EMPTY_BOXES_1MB):
        t0 = time.monotonic()
        r = score_math(response, "4")
        assert time.monotonic() - t0 < BOUND_S
        assert (r.reward, r.extracted_answer, r.rule) == (0.0, None, "none")


def test_extraction_timeout_scores_zero_with_its_own_rule(monkeypatch, tmp_path):
    # A copy of the module whose extraction never finishes, loaded by fresh workers.
    source = open(math_reward.__file__, encoding="utf-8").read()
    slow = tmp_path / "slow_math.py"
    slow.write_text(
        source + "\n\ndef extract_answer(text, *, fallback='last_number'):\n"
        "    import time\n    time.sleep(60)\n",
        encoding="utf-8",
    )
    close_workers()
    monkeypatch.setattr(math_reward, "__file__", str(slow))
    try:
        t0 = time.monotonic()
        r = score_math("\\boxed{4}", "4", timeout=1.0)
        assert time.monotonic() - t0 < 30  # worker start-up + 1 s, not the 60 s sleep
        assert (r.reward, r.correct, r.extracted_answer, r.rule) == (0.0, False, None, "extraction_timeout")
        assert "timeout" in r.detail
    finally:
        close_workers()
    monkeypatch.undo()
    assert score_math("\\boxed{4}", "4").correct  # normal workers again


# --- equation chains ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "response,gold,expected",
    [
        ("\\boxed{3 = 4}", "4", False),  # a false equation is not its right-hand side
        ("\\boxed{4 = 3}", "3", False),
        ("\\boxed{x = 3 = 4}", "4", False),
        ("\\boxed{x = 2 + 2 = 5}", "5", False),
        ("The answer is $3 = 4$.", "4", False),
        ("\\boxed{x = 4}", "4", True),
        ("\\boxed{2 + 2 = 4}", "4", True),
        ("\\boxed{4 = 2 + 2}", "4", True),
        ("\\boxed{a = b = 4}", "4", True),
        ("\\boxed{\\frac{1}{2} = 0.5}", "0.5", True),
        ("\\boxed{AB = 5}", "5", True),  # a named quantity, not a value: not checked
        # a gold equation keeps math-verify's own handling of equations
        ("\\boxed{y = 1 + 2x}", "y = 2x + 1", True),
        ("\\boxed{2x + 1}", "y = 2x + 1", True),
        ("\\boxed{y = 2x + 2}", "y = 2x + 1", False),
    ],
)
def test_equation_chain_is_checked_as_a_whole(response, gold, expected):
    r = score_math(response, gold)
    assert r.correct is expected, r
    if not expected and "3 = 4" in response:
        assert "false equation chain" in r.detail


# --- deep brace nesting ----------------------------------------------------------------------


def test_redundant_outer_braces_are_removed():
    nested = "\\boxed{" + "{" * 1000 + "4" + "}" * 1000 + "}"
    assert extract_answer(nested) == ("4", "boxed")
    r = score_math(nested, "4")
    assert (r.reward, r.extracted_answer, r.rule) == (1.0, "4", "boxed")


def test_nesting_as_deep_as_the_window_allows():
    depth = (MAX_RESPONSE_CHARS - 10) // 2
    deep = "\\boxed{" + "{" * depth + "7" + "}" * depth + "}"
    assert len(deep) <= MAX_RESPONSE_CHARS
    assert extract_within(deep) == ("7", "boxed")


def test_braces_that_are_not_redundant_stay():
    assert extract_answer("\\boxed{{1}+{2}}") == ("{1}+{2}", "boxed")
    assert extract_answer("\\boxed{{a}^{2}}") == ("{a}^{2}", "boxed")
    assert score_math("\\boxed{{1}+{2}}", "3").correct
    # a box holding only braces is empty, like \boxed{}
    assert extract_answer("\\boxed{7} then \\boxed{{ }}") == ("7", "boxed")


def test_redundant_braces_in_gold_and_deep_text_wrappers():
    assert score_math("\\boxed{4}", "{{{4}}}").correct
    wrapped = "\\boxed{" + "\\text{" * 500 + "yes" + "}" * 500 + "}"  # under MAX_ANSWER_CHARS
    assert score_math(wrapped, "\\text{yes}").correct
