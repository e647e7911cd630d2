"""tracerl.rewards.math: answer extraction, equivalence through math-verify, and time limits.

Every expected verdict in TABLE is written from the mathematics (and, for units, percent,
degrees and choice letters, from the policy documented in tracerl/rewards/math.py), not from
running the code. No mocks: each row goes through the real worker process and math-verify.
"""

from __future__ import annotations

import time

import pytest

from tracerl.rewards.math import MathResult, extract_answer, score_math, score_math_many

# (response, gold, expected correct)
TABLE = [
    # --- fractions vs decimals, \frac vs / , \dfrac -------------------------------------------
    (r"so \boxed{\frac{1}{2}}", "0.5", True),
    (r"\boxed{0.5}", r"\frac{1}{2}", True),
    (r"\boxed{0.75}", r"\frac34", True),
    (r"\boxed{\frac{2}{3}}", "0.6", False),
    (r"\boxed{1/2}", r"\frac{1}{2}", True),
    (r"\boxed{3/4}", r"\dfrac{3}{4}", True),
    (r"\boxed{\dfrac{5}{2}}", "2.5", True),
    (r"\boxed{\tfrac{1}{3}}", r"\frac{1}{3}", True),
    (r"\boxed{\frac{1}{3}}", r"\frac{1}{2}", False),
    (r"\boxed{\frac{4}{6}}", r"\frac{2}{3}", True),
    (r"\boxed{-\dfrac{7}{2}}", "-3.5", True),
    # --- intervals -------------------------------------------------------------------------
    (r"\boxed{[1,2)}", "[1,2]", False),
    (r"\boxed{[1,2]}", "[1,2]", True),
    (r"\boxed{(0,1]}", "(0,1)", False),
    (r"\boxed{(-\infty, 3)}", r"(-\infty,3)", True),
    (r"\boxed{(-\infty,3]}", r"(-\infty, 3)", False),
    (r"\boxed{(1,2)\cup(3,4)}", r"(3,4)\cup(1,2)", True),
    # --- tuples vs concatenated digits; order matters for tuples -----------------------------
    (r"\boxed{12}", "(1,2)", False),
    (r"\boxed{(1,2)}", "12", False),
    (r"\boxed{1,2}", "12", False),
    (r"\boxed{(2,1)}", "(1,2)", False),
    (r"\boxed{(1,2,3)}", "(1,2,3)", True),
    (r"\boxed{(3,2,1)}", "(1,2,3)", False),
    (r"\boxed{\left( 3, -1 \right)}", "(3,-1)", True),
    # --- sets: order does not matter; a set is not a pair / interval -------------------------
    (r"\boxed{\{3,1,2\}}", r"\{1,2,3\}", True),
    (r"\boxed{2, 1}", "1,2", True),
    (r"\boxed{\{1,2\}}", "(1,2)", False),
    (r"\boxed{\{1,2\}}", r"\{1,2,3\}", False),
    # --- units -----------------------------------------------------------------------------
    (r"\boxed{5\text{ cm}}", "5", True),
    (r"\boxed{5 \text{ cm}^2}", "5", True),
    (r"\boxed{12 apples}", "12", True),
    (r"\boxed{6\text{ cm}}", "5", False),
    (r"\boxed{5 \text{ meters}}", r"5\text{ m}", True),
    (r"\boxed{\$12.50}", "12.5", True),
    # --- percent (default policy "strip": the sign is a unit) -------------------------------
    (r"\boxed{50\%}", "50", True),
    (r"\boxed{50}", r"50\%", True),
    (r"\boxed{0.5}", r"50\%", False),
    (r"\boxed{40\%}", r"50\%", False),
    # --- degrees (marks dropped, no conversion to radians) -----------------------------------
    (r"\boxed{30^\circ}", "30", True),
    (r"\boxed{30}", r"30^{\circ}", True),
    (r"\boxed{45^\circ}", r"30^\circ", False),
    (r"\boxed{\frac{\pi}{6}}", r"30^\circ", False),
    # --- matrices --------------------------------------------------------------------------
    (r"\boxed{\begin{pmatrix} 1 & 2 \\ 3 & 4 \end{pmatrix}}", r"\begin{pmatrix}1&2\\3&4\end{pmatrix}", True),
    (r"\boxed{\begin{pmatrix} 1 & 3 \\ 2 & 4 \end{pmatrix}}", r"\begin{pmatrix}1&2\\3&4\end{pmatrix}", False),
    (r"\boxed{\begin{bmatrix} 1 \\ -2 \end{bmatrix}}", r"\begin{pmatrix}1\\-2\end{pmatrix}", True),
    (r"\boxed{\begin{pmatrix} \frac{1}{2} \\ 0 \end{pmatrix}}", r"\begin{pmatrix}0.5\\0\end{pmatrix}", True),
    # --- nested braces ---------------------------------------------------------------------
    (r"\boxed{\frac{\sqrt{3}}{2}}", r"\frac{\sqrt3}{2}", True),
    (r"\boxed{2^{\frac{1}{2}}}", r"\sqrt{2}", True),
    (r"\boxed{\frac{1}{\frac{1}{2}+\frac{1}{3}}}", r"\frac{6}{5}", True),
    # --- no boxed answer (default fallback "last_number", after anchored phrases) ------------
    ("First 3, then 7, so we get 10.", "10", True),
    ("I think it's 12 or maybe 13", "12", False),
    (r"The answer is $\frac{1}{4}$.", "0.25", True),
    ("Adding them up.\n#### 72", "72", True),
    ("no numbers at all", "5", False),
    # --- several boxed answers: the last one counts -----------------------------------------
    (r"First \boxed{3}, no wait: \boxed{4}", "4", True),
    (r"\boxed{4} ... actually \boxed{3}", "4", False),
    # --- square roots ----------------------------------------------------------------------
    (r"\boxed{\sqrt{8}}", r"2\sqrt{2}", True),
    (r"\boxed{2\sqrt{3}}", r"\sqrt{8}", False),
    (r"\boxed{\frac{\sqrt{2}}{2}}", r"\frac{1}{\sqrt{2}}", True),
    # --- negative numbers ------------------------------------------------------------------
    (r"\boxed{-3}", "3", False),
    (r"\boxed{-3}", "-3", True),
    ("\\boxed{\u22123}", "-3", True),  # Unicode minus sign
    # --- scientific notation ---------------------------------------------------------------
    (r"\boxed{1.5 \times 10^{3}}", "1500", True),
    (r"\boxed{1.5e3}", "1500", True),
    (r"\boxed{6.02 \times 10^{23}}", r"6.02\times10^{22}", False),
    (r"\boxed{2.5 \times 10^{-3}}", "0.0025", True),
    # --- equations -------------------------------------------------------------------------
    (r"\boxed{x=5}", "5", True),
    (r"\boxed{5}", "x=5", True),
    (r"\boxed{x = 6}", "5", False),
    (r"\boxed{y = 2x + 3}", "y=3+2x", True),
    # --- equation chains are checked as a whole (a false chain is not its last side) -------
    (r"\boxed{3 = 4}", "4", False),
    (r"\boxed{2 + 2 = 4}", "4", True),
    (r"\boxed{x = 2 + 2 = 5}", "5", False),
    (r"\boxed{x = 2 + 2 = 4}", "4", True),
    # --- thousands separators --------------------------------------------------------------
    (r"\boxed{1,000}", "1000", True),
    (r"\boxed{1000}", "1{,}000", True),
    (r"\boxed{1,000,000}", "10^6", True),
    ("She earns 1,234 dollars.\n#### 1,234", "1234", True),
    (r"\boxed{12,5}", "12.5", False),
    # --- text answers ----------------------------------------------------------------------
    (r"\boxed{\text{yes}}", "yes", True),
    (r"\boxed{\text{No}}", r"\text{no}", True),
    (r"\boxed{\text{yes}}", r"\text{no}", False),
    (r"\boxed{\text{Dynamo}}", r"\text{Monday}", False),  # same letters, different word
    # --- multiple-choice letters -----------------------------------------------------------
    (r"\boxed{(A)}", "A", True),
    (r"\boxed{A}", "(A)", True),
    (r"\boxed{\text{(C)}}", "C", True),
    (r"\boxed{B}", "(D)", False),
    # --- traps for naive string comparison -------------------------------------------------
    (r"\boxed{0.50}", "0.5", True),
    (r"\boxed{.5}", r"\frac12", True),
    (r"\boxed{1.0}", "1", True),
    (r"\boxed{10}", "1.0", False),
    (r"\boxed{x^2+2x+1}", "(x+1)^2", True),
    (r"\boxed{a+b}", "a+b+c", False),
    (r"\boxed{c + b + a}", "a+b+c", True),
    (r"\boxed{\pi}", "3.14", False),
    (r"\boxed{0.0000002}", "0.0000001", False),
    (r"\boxed{\infty}", r"\infty", True),
    # --- gold answers as datasets give them ------------------------------------------------
    (r"\boxed{7}", r"\boxed{7}", True),
    (r"\boxed{18}", "Janet sells 16 - 3 - 4 = 9 eggs and earns 9 * 2 = 18.\n#### 18", True),
    (r"\boxed{19}", "Janet sells 16 - 3 - 4 = 9 eggs and earns 9 * 2 = 18.\n#### 18", False),
]


def test_table_is_large_and_balanced():
    assert len(TABLE) >= 60
    verdicts = [expected for _, _, expected in TABLE]
    assert verdicts.count(True) >= 20 and verdicts.count(False) >= 20


@pytest.mark.parametrize("response,gold,expected", TABLE, ids=[f"{i:02d}" for i in range(len(TABLE))])
def test_table(response, gold, expected):
    r = score_math(response, gold)
    assert isinstance(r, MathResult)
    assert r.correct is expected, (response, gold, r)
    assert r.reward == (1.0 if expected else 0.0)


# --- policies that are options --------------------------------------------------------------


def test_percent_ratio_policy():
    assert score_math(r"\boxed{0.5}", r"50\%", percent="ratio").correct
    assert score_math(r"\boxed{50\%}", "0.5", percent="ratio").correct
    assert not score_math(r"\boxed{50}", r"50\%", percent="ratio").correct
    with pytest.raises(ValueError, match="strip"):
        score_math(r"\boxed{1}", "1", percent="fraction")


def test_single_letter_units_are_not_stripped():
    # "5 m" cannot be told apart from the product 5m, so it is not 5.
    assert not score_math(r"\boxed{5 m}", "5").correct
    assert score_math(r"\boxed{5\text{ m}}", "5").correct


# --- extraction -----------------------------------------------------------------------------


def test_balanced_nested_braces():
    assert extract_answer(r"thus \boxed{\frac{a^{2}}{b_{1}}} done") == (r"\frac{a^{2}}{b_{1}}", "boxed")
    assert extract_answer(r"\boxed{\{1, 2\}}.") == (r"\{1, 2\}", "boxed")  # \{ \} are literal braces
    matrix = r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}"
    assert extract_answer(r"$\boxed{" + matrix + "}$") == (matrix, "boxed")


def test_last_box_wins_and_fbox():
    assert extract_answer(r"\boxed{1} then \boxed{2} and finally \boxed{3}") == ("3", "boxed")
    assert extract_answer(r"\boxed{1} and \fbox{9}") == ("9", "fbox")
    assert extract_answer(r"\boxed{\boxed{5}}") == ("5", "boxed")


def test_boxed_without_braces():
    assert extract_answer(r"The result is $\boxed 5$.") == ("5", "boxed_bare")
    assert extract_answer(r"so \boxed 42.") == ("42", "boxed_bare")
    assert score_math(r"so \boxed 42.", "42").correct


def test_empty_box_is_skipped():
    # e.g. the response repeats the prompt's "put your final answer within \boxed{}"
    assert extract_answer(r"\boxed{7} as asked within \boxed{}") == ("7", "boxed")
    assert extract_answer(r"within \boxed{} I say 3", fallback="last_number") == ("3", "last_number")


def test_unclosed_box_gives_no_answer_and_no_fallback():
    text = r"The answer is 12, so \boxed{\frac{1}{2"
    assert extract_answer(text) == (None, "unclosed_box")
    r = score_math(text, r"\frac12")
    assert (r.reward, r.correct, r.extracted_answer, r.rule) == (0.0, False, None, "unclosed_box")


def test_fallback_rules_are_reported():
    assert extract_answer("Thus, the answer is $x = 5$ since ...") == ("x = 5", "answer_is")
    assert extract_answer("The final answer is 3.5. Done.") == ("3.5", "answer_is")
    assert extract_answer("Work...\nAnswer: 42\nCheck: 7 ok") == ("42", "answer_colon")
    assert extract_answer("**Final Answer:** 12") == ("12", "answer_colon")
    assert extract_answer("16 - 3 - 4 = 9\n#### 18") == ("18", "gsm8k")
    assert extract_answer("I got 3, then -4.5 in the end") == ("-4.5", "last_number")
    assert extract_answer("total: 1,000,000 people") == ("1,000,000", "last_number")
    # the latest anchor wins over earlier ones
    assert extract_answer("The answer is 2.\nOn reflection:\n#### 5") == ("5", "gsm8k")


def test_fallback_policy_is_configurable():
    text = "I got 3, then 4"
    assert extract_answer(text, fallback="last_number") == ("4", "last_number")
    assert extract_answer(text, fallback="anchored") == (None, "none")
    assert extract_answer("Answer: 4", fallback="anchored") == ("4", "answer_colon")
    assert extract_answer("Answer: 4", fallback="none") == (None, "none")
    assert extract_answer(r"\boxed{4}", fallback="none") == ("4", "boxed")
    r = score_math("The answer is 4", "4", fallback="none")
    assert (r.correct, r.extracted_answer, r.rule) == (False, None, "none")
    assert score_math("The answer is 4", "4", fallback="anchored").rule == "answer_is"
    with pytest.raises(ValueError, match="last_number"):
        extract_answer("4", fallback="first_number")


def test_no_answer_scores_zero():
    r = score_math("I do not know.", "5")
    assert r == MathResult(0.0, False, None, "none", r.detail)
    r = score_math("", "5")
    assert (r.reward, r.extracted_answer) == (0.0, None)


def test_result_exposes_parsed_answer_and_detail():
    r = score_math(r"We get $\boxed{\dfrac{1}{2}}$.", "0.5")
    assert r.correct and r.reward == 1.0
    assert r.extracted_answer == r"\dfrac{1}{2}" and r.rule == "boxed"
    assert "equal" in r.detail
    wrong = score_math(r"\boxed{(1,2)}", "12")
    assert not wrong.correct and wrong.extracted_answer == "(1,2)" and wrong.detail


def test_unparseable_gold_needs_identical_tokens():
    # a gold math-verify cannot parse is only matched token for token (no comma deletion)
    assert not score_math(r"\boxed{1 2}", r"\unknowncmd{12}").correct
    assert score_math(r"\boxed{\unknowncmd{12}}", r"\unknowncmd{12}").correct


# --- batch ----------------------------------------------------------------------------------


def test_score_many_keeps_order_and_agrees_with_single_calls():
    rows = TABLE[:24]
    many = score_math_many([(r, g) for r, g, _ in rows], workers=2)
    assert [m.correct for m in many] == [expected for _, _, expected in rows]
    assert score_math_many([]) == []


# --- time limit -----------------------------------------------------------------------------

TOWER = r"\boxed{9^{9^{9^{9}}}}"


def test_pathological_input_returns_within_the_limit():
    score_math(r"\boxed{1}", "1")  # warm worker: start-up is not charged to the timeout
    for limit in (2.0, 0.5):  # 2.0: math-verify's own 1 s alarm; 0.5: the worker is killed
        t0 = time.monotonic()
        r = score_math(TOWER, "1", timeout=limit)
        elapsed = time.monotonic() - t0
        assert elapsed < limit + 1.0, elapsed
        assert (r.reward, r.correct, r.extracted_answer) == (0.0, False, "9^{9^{9^{9}}}")
        assert "timeout" in r.detail
    # the next call gets a fresh worker and works
    assert score_math(r"\boxed{\frac{1}{2}}", "0.5").correct


def test_batch_with_pathological_rows_stays_bounded():
    pairs = [(TOWER, "1"), (r"\boxed{2}", "2"), (TOWER, "3"), (r"\boxed{4}", "5")]
    t0 = time.monotonic()
    out = score_math_many(pairs, workers=2, timeout=0.5)
    assert time.monotonic() - t0 < 10
    assert [o.correct for o in out] == [False, True, False, False]


def test_bad_timeout_is_rejected():
    with pytest.raises(ValueError, match="timeout"):
        score_math(r"\boxed{1}", "1", timeout=0)


def test_forked_child_uses_its_own_worker():
    import os

    assert score_math(r"\boxed{1}", "1").correct  # the parent now holds an idle worker
    pid = os.fork()
    if pid == 0:  # child: must not talk to the parent's worker
        code = 3
        try:
            code = 0 if score_math(r"\boxed{2}", "2").correct else 1
        finally:
            os._exit(code)
    deadline = time.monotonic() + 60
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail("forked child did not finish")
        time.sleep(0.05)
    assert os.waitstatus_to_exitcode(status) == 0
    assert score_math(r"\boxed{3}", "3").correct  # and the parent's worker still works
