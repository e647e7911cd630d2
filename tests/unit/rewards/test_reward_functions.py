"""Reward functions as plug-ins (rewards/functions.py): loading and signature checks before any
work, weighted combination with the task's verifier, process rewards, and every wrong return named."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from tracerl.config import load_config
from tracerl.data.tasks import Problem
from tracerl.errors import ConfigError
from tracerl.rewards import RewardConfig, Rewards
from tracerl.rewards.functions import RewardValueError
from tracerl.rollout import safe_scores

REWARDS = textwrap.dedent('''
    def sevens(problem, response, response_ids):
        return float(response.count("7"))

    def per_token(problem, response, response_ids):
        return [0.5] * len(response_ids)

    def row_field(problem, response, response_ids):
        return float(problem.meta["row"]["bonus"])

    def with_kwargs(**kwargs):
        return len(kwargs["response_ids"])

    def two_args(problem, response):
        return 1.0

    def returns(problem, response, response_ids):
        return RESULT

    def raises(problem, response, response_ids):
        if "boom" in response:
            raise RuntimeError("kaboom")
        return 1.0

    RESULT = 0.0
    NOT_CALLABLE = 3
''')


@pytest.fixture()
def plugin(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(REWARDS)
    return path


def math_problem(pid="p1", answer="12", **row):
    return Problem(id=pid, question="Calculate 3 + 4 + 5.", kind="math", answer=answer, meta={"row": row})


def test_the_default_is_the_task_verifier_unchanged():
    scores = Rewards().score([math_problem()], ["The answer is 12."], [[1, 2, 3]])
    assert scores[0].reward == 1.0 and scores[0].correct and scores[0].token_rewards is None
    assert "rewards" not in (scores[0].details or {})


def test_weighted_combination_with_the_task_verifier(plugin):
    rewards = Rewards(RewardConfig(functions=["task", f"{plugin}:sevens"], weights=[2.0, 0.25]))
    right, wrong = rewards.score([math_problem(), math_problem()], ["77 so 12", "7 then 13"], [[1], [2]])
    assert right.reward == pytest.approx(2.0 * 1.0 + 0.25 * 2) and right.correct
    assert wrong.reward == pytest.approx(0.25 * 1) and not wrong.correct  # the verifier decides correctness
    assert right.details["rewards"] == {"task": 1.0, "sevens": 2.0}  # unweighted, by short name
    assert right.extracted_answer == "12"


def test_a_module_function_and_kwargs_and_row_fields(plugin, monkeypatch):
    monkeypatch.syspath_prepend(str(plugin.parent))
    rewards = Rewards(RewardConfig(functions=["my_rewards:row_field", f"{plugin}:with_kwargs"], correct_at=5.0))
    (score,) = rewards.score([math_problem(bonus=3)], ["x"], [[4, 5, 6]])
    assert score.reward == 3.0 + 3.0 and score.correct  # 6 >= correct_at without the task verifier


def test_a_process_reward_gives_token_rewards_and_its_sum(plugin):
    rewards = Rewards(RewardConfig(functions=["task", f"{plugin}:per_token"], weights=[1.0, 2.0]))
    (score,) = rewards.score([math_problem()], ["12"], [[9, 9, 9, 9]])
    assert score.token_rewards == [1.0, 1.0, 1.0, 1.0]  # weight 2 x 0.5 per token
    assert score.reward == pytest.approx(1.0 + 4.0) and score.details["rewards"]["per_token"] == 2.0


@pytest.mark.parametrize("spec,words", [
    ("missing.py:f", ["reward.functions[0]", "no such file", "missing.py"]),
    ("{plugin}:nope", ["reward.functions[0]", "no 'nope'", "sevens"]),
    ("{plugin}:two_args", ["reward.functions[0]", "response_ids"]),
    ("{plugin}:NOT_CALLABLE", ["reward.functions[0]", "not callable"]),
    ("no_such_module_xyz:f", ["reward.functions[0]", "cannot import", "no_such_module_xyz"]),
    ("justaname", ["reward.functions[0]", "file.py:name"]),
])
def test_bad_functions_fail_when_the_config_is_built(plugin, spec, words):
    with pytest.raises(ConfigError) as e:
        Rewards(RewardConfig(functions=[spec.format(plugin=plugin)]))
    for w in words:
        assert w in str(e.value)


@pytest.mark.parametrize("overrides,words", [
    (["reward.functions=[]"], ["reward.functions", "at least one"]),
    (["reward.functions=[task, task]"], ["reward.functions", "twice"]),
    (["reward.weights=[1, 2]"], ["reward.weights", "2 weights for 1 functions"]),
    (["reward.weights=[.nan]"], ["reward.weights[0]", "finite"]),
])
def test_bad_reward_config_names_the_key(overrides, words):
    from tracerl.rl import RLConfig

    with pytest.raises(ConfigError) as e:
        load_config(RLConfig, None, overrides)
    for w in words:
        assert w in str(e.value)


@pytest.mark.parametrize("result,words", [
    ("float('nan')", ["returned nan", "finite"]),
    ("float('inf')", ["returned inf"]),
    ("'1.0'", ["returned str", "'1.0'"]),
    ("True", ["returned bool"]),
    ("None", ["returned NoneType"]),
    ("[1.0, 2.0]", ["2 values for a response of 3 tokens"]),
    ("[1.0, float('nan'), 0.0]", ["per-token reward [1]", "nan"]),
    ("[1.0, 'x', 0.0]", ["per-token reward [1]", "'x'"]),
])
def test_a_wrong_return_names_the_function_and_the_problem(plugin, result, words):
    rewards = Rewards(RewardConfig(functions=[f"{plugin}:returns"]))
    module = sys.modules[next(n for n, m in sys.modules.items()
                              if getattr(m, "__file__", None) == str(plugin.resolve()))]
    module.RESULT = eval(result)
    with pytest.raises(RewardValueError) as e:
        rewards.score([math_problem(pid="q-42")], ["x"], [[1, 2, 3]])
    assert "returns" in str(e.value) and "q-42" in str(e.value)
    for w in words:
        assert w in str(e.value)
    # in a rollout, the sample scores 0 and is reported; the others keep their scores
    scores, errors = safe_scores(rewards, [math_problem(pid="q-42"), math_problem(pid="q-43")], ["x", "y"],
                                 [[1, 2, 3], [1, 2, 3]], workers=1, fail=False)
    assert [s.reward for s in scores] == [0.0, 0.0] and len(errors) == 2 and "q-42" in errors[0]


def test_a_raising_function_zeroes_only_its_sample(plugin):
    rewards = Rewards(RewardConfig(functions=[f"{plugin}:raises"]))
    scores, errors = safe_scores(rewards, [math_problem(pid="a"), math_problem(pid="b")], ["fine", "boom"],
                                 [[1], [2]], workers=1, fail=False)
    assert [s.reward for s in scores] == [1.0, 0.0]
    assert len(errors) == 1 and errors[0].startswith("problem b: raises: RuntimeError: kaboom")
    with pytest.raises(RuntimeError, match="kaboom"):
        safe_scores(rewards, [math_problem(pid="b")], ["boom"], [[2]], workers=1, fail=True)


def test_tracerl_score_takes_reward_functions(plugin, tmp_path):
    gens = tmp_path / "gens.jsonl"
    gens.write_text(json.dumps({"response": "777 so 12", "answer": "12", "token_ids": [1, 2]}) + "\n"
                    + json.dumps({"response": "13", "answer": "12"}) + "\n")
    out = tmp_path / "scored.jsonl"
    cmd = [sys.executable, "-m", "tracerl.cli", "score", "--task", "math", "--input", str(gens), "--output", str(out),
           "--reward", "task", f"{plugin}:sevens", "--reward-weights", "1", "0.5", "--json", "--no-progress"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["reward"] for r in rows] == [1.0 + 1.5, 0.0] and [r["correct"] for r in rows] == [True, False]
    assert rows[0]["rewards"] == {"task": 1.0, "sevens": 3.0}
    assert summary["mean_reward"] == pytest.approx(1.25) and summary["accuracy"] == 0.5
    bad = subprocess.run(cmd[:-6] + ["--reward", f"{plugin}:two_args", "--json"], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode != 0 and "--reward[0]" in bad.stderr and "Traceback" not in bad.stderr


def test_tracerl_eval_takes_reward_functions(plugin, tmp_path):
    from tracerl.eval import EvalConfig
    from tracerl.recipes.eval import run_eval

    config = load_config(EvalConfig, None, [
        "task.source=gym", "task.name=basic_arithmetic", "task.size=3", "task.template=raw", "task.chat=false",
        "sampling.max_new_tokens=4", f"output_dir={tmp_path / 'eval'}", f"reward.functions=[{plugin}:per_token]",
        "reward.correct_at=100"])
    summary = run_eval(config, progress=False)
    samples = [json.loads(line) for line in (tmp_path / "eval" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 3 and summary["accuracy"] == 0.0  # no sample reaches correct_at
    for s in samples:
        assert s["token_rewards"] == [0.5] * len(s["token_ids"]) and s["reward"] == 0.5 * len(s["token_ids"])
        assert s["details"]["rewards"] == {"per_token": s["reward"]}
    assert summary["mean_reward"] == sum(s["reward"] for s in samples) / 3
    with pytest.raises(ConfigError, match=r"reward.functions\[0\]"):
        run_eval(load_config(EvalConfig, None, [f"reward.functions=[{plugin}:two_args]",
                                                f"output_dir={tmp_path / 'bad'}"]), progress=False)
    assert not (tmp_path / "bad").exists()  # refused before any work
