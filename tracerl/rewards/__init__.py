"""Rewards: one entry point per problem kind, and a batch scorer used by eval, score and RL.

  math  final answer extracted from the response, checked against the gold answer by
        math-verify under a time limit (rewards/math.py)
  code  program extracted from the response, run against the tests in a sandboxed process;
        reward = fraction of tests passed (rewards/code.py, tracerl/sandbox/)
  gym   the reasoning-gym generator's own verifier on the extracted answer

User reward functions (plug-ins) and their weighted combination with these: rewards/functions.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from tracerl.data.tasks import Problem, gym_score


@dataclass
class Score:
    reward: float
    correct: bool
    extracted_answer: str | None = None
    details: dict | None = None
    token_rewards: list[float] | None = None  # a process reward: one per response token (rewards/functions.py)


def _score_math(problem: Problem, response: str) -> Score:
    from tracerl.rewards.math import score_math

    r = score_math(response, problem.answer)
    return Score(r.reward, r.correct, r.extracted_answer, {"rule": r.rule} if r.rule else None)


def _score_gym(problem: Problem, response: str) -> Score:
    from tracerl.rewards.math import extract_answer

    answer, rule = extract_answer(response)
    if answer is None and response.strip():
        answer, rule = response.strip(), "whole_response"  # short-answer tasks: the reply is the answer
    reward = gym_score(problem, answer)
    return Score(reward, reward >= 1.0, answer, {"rule": rule})


def score_problem(problem: Problem, response: str) -> Score:
    if problem.kind == "math":
        return _score_math(problem, response)
    if problem.kind == "gym":
        return _score_gym(problem, response)
    if problem.kind == "code":
        return score_batch([problem], [response])[0]
    raise ValueError(f"unknown problem kind {problem.kind!r}")


def score_batch(problems: list[Problem], responses: list[str], *, workers: int = 2) -> list[Score]:
    """Score responses in order; code problems run through one bounded sandbox pool."""
    if len(problems) != len(responses):
        raise ValueError(f"{len(problems)} problems but {len(responses)} responses")
    out: list[Score | None] = [None] * len(problems)
    code_items = []
    for i, (p, r) in enumerate(zip(problems, responses)):
        if p.kind == "code":
            code_items.append(i)
        else:
            out[i] = score_problem(p, r)
    if code_items:
        from tracerl.rewards.code import score_code_problems

        results = score_code_problems([problems[i] for i in code_items], [responses[i] for i in code_items],
                                      workers=workers)
        for i, res in zip(code_items, results):
            out[i] = Score(res.reward, res.all_passed, None,
                           {"verdicts": [v.status for v in res.verdicts], "all_passed": res.all_passed})
    return out


from tracerl.rewards.functions import RewardConfig, Rewards  # noqa: E402  (needs Score, score_batch)
