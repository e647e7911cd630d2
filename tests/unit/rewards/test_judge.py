"""The LLM-judge reward against a real `tracerl serve` (uvicorn on 127.0.0.1): a judge that answers
with a score, one that answers garbage (reported, never a silent middle value), one that times out
(retried, then reported), the cache, and an RL run rewarded by the judge."""

from __future__ import annotations

import pytest
import torch

from tests.support.serving import ThreadServer
from tests.support.tiny_models import scrambled
from tracerl.config import load_config
from tracerl.data.tasks import Problem
from tracerl.errors import ConfigError
from tracerl.models import load_model
from tracerl.recipes.rl import run_rl
from tracerl.rewards import RewardConfig, Rewards
from tracerl.rewards.judge import Judge, JudgeConfig, JudgeError
from tracerl.rl import RLConfig
from tracerl.serve.config import ServeConfig
from tracerl.train.metrics import read_metrics

TASK = ["task.source=gym", "task.name=basic_arithmetic", "task.size=64", "task.template=raw", "task.chat=false",
        'task.params={min_terms: 2, max_terms: 2, min_digits: 1, max_digits: 1, operators: ["+"], '
        "allow_parentheses: false, allow_negation: false}"]


def digit_model():
    """tiny-block whose LM head scores only "3" (v . h) and "4" (-v . h): one of the two always
    wins, so its greedy answer to anything is a string of 3s and 4s, a score a judge can parse."""
    model = load_model("tiny-block")
    head = model.backbone.get_output_embeddings()
    three, four = (model.tokenizer.encode(d, add_special_tokens=False)[0] for d in "34")
    v = torch.randn(head.weight.shape[1], generator=torch.Generator().manual_seed(0))
    weight = torch.zeros_like(head.weight)
    weight[three], weight[four] = v, -v
    head.weight = torch.nn.Parameter(weight)  # untied from the input embeddings
    return model


@pytest.fixture(scope="module")
def digit_judge():
    with ThreadServer(ServeConfig(served_model_name="digits"), digit_model()) as server:
        yield server


def pick(i: int) -> Problem:
    return Problem(id=f"pick-{i}", question=f"Pick {i}:", kind="math", answer=str(7 + i % 2))


def digit_config(server, **kw) -> JudgeConfig:
    return JudgeConfig(**{"base_url": server.url + "/v1", "model": "digits", "template": "Grade: {question} {response}",
                          "score_pattern": r"(\d)", "max_tokens": 4, "concurrency": 4, **kw})


@pytest.mark.parametrize("chat", [True, False])
def test_the_judge_scores_through_the_endpoint_and_caches(digit_judge, chat):
    """Its score is the last digit of what the endpoint answers for the filled-in rubric."""
    import httpx

    judge = Judge(digit_config(digit_judge, chat=chat))
    problems = [pick(i) for i in range(6)]
    scores = judge.score_many(problems, ["a"] * 6, [[1]] * 6)
    assert judge.requests == 6
    route, body = (("/v1/chat/completions", {"messages": [{"role": "user", "content": "Grade: Pick 0: a"}]}) if chat
                   else ("/v1/completions", {"prompt": "Grade: Pick 0: a"}))
    reply = httpx.post(digit_judge.url + route, json={"model": "digits", "max_tokens": 4, "temperature": 0, **body})
    choice = reply.json()["choices"][0]
    text = choice["message"]["content"] if chat else choice["text"]
    assert set(text) <= set("34") and scores[0] == pytest.approx(int(text[-1]) / 10)
    assert all(s in (0.3, 0.4) for s in scores), scores
    again = judge.score_many(problems, ["a"] * 6, [[1]] * 6)
    assert again == scores and judge.requests == 6  # every (prompt, response) was cached
    judge.score_many(problems[:2], ["b", "c"], [[1], [1]])
    assert judge.requests == 8  # another response is another question


@pytest.mark.slow
def test_an_rl_run_rewarded_by_the_judge(digit_judge, tmp_path):
    config = load_config(RLConfig, None, [
        *TASK, f"output_dir={tmp_path / 'rl'}", "reward.functions=[task, judge]", "reward.weights=[1.0, 0.5]",
        f"reward.judge.base_url={digit_judge.url}/v1", "reward.judge.model=digits",
        r"reward.judge.score_pattern=(\d)", "reward.judge.max_tokens=4", "rollout.num_prompts=4",
        "rollout.group_size=4", "rollout.sampling.max_new_tokens=4", "rollout.sampling.temperature=1.0",
        "loop.micro_batch=16", "max_steps=2", "policy.filter_equal=false", "fail_on_reward_error=true"])
    run_rl(config, progress=False)
    rows = read_metrics(tmp_path / "rl" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2] and all(r["reward_errors"] == 0 for r in rows)
    for r in rows:
        assert 0.3 <= r["reward/judge"] <= 0.4
        assert r["reward_mean"] == pytest.approx(r["reward/task"] + 0.5 * r["reward/judge"])


def test_a_judge_that_answers_garbage_is_reported_per_sample():
    model = scrambled("tiny-block", dtype=torch.float64)  # random weights: its answers hold no score
    with ThreadServer(ServeConfig(served_model_name="garbage"), model) as server:
        config = RewardConfig(functions=["judge"], judge=JudgeConfig(base_url=server.url + "/v1", model="garbage",
                                                                      max_tokens=8))
        rewards = Rewards(config)
        errors: list[str] = []
        scores = rewards.score([pick(1), pick(2)], ["x", "y"], [[1], [2]], errors=errors)
        assert [s.reward for s in scores] == [0.0, 0.0] and len(errors) == 2
        assert errors[0].startswith("problem pick-1: judge: JudgeError: judge garbage: no score in its answer")
        assert "score_pattern" in errors[0] and "pick-2" in errors[1]
        with pytest.raises(JudgeError, match="no score"):
            rewards.score([pick(1)], ["x"], [[1]])


def test_a_judge_that_times_out_is_retried_then_reported(digit_judge):
    judge = Judge(digit_config(digit_judge, timeout_s=0.001, retries=2, backoff_s=0.01))
    [result] = judge.score_many([pick(0)], ["z"], [[1]])
    assert isinstance(result, JudgeError) and "failed after 3 tries" in str(result)
    assert "no answer within 0.001 s" in str(result) and judge.requests == 3
    assert judge.cache == {}  # a failure is not cached: the next step asks again


def test_unreachable_judge_and_parse_rules():
    judge = Judge(JudgeConfig(base_url="http://127.0.0.1:9/v1", model="m", retries=1, backoff_s=0.0, timeout_s=2))
    with pytest.raises(JudgeError, match="failed after 2 tries: Connect"):
        judge.judge(pick(0), "x")
    assert judge.parse("reasoning... Score: 3\nwait, Score: 9") == pytest.approx(0.9)  # the last match
    with pytest.raises(JudgeError, match="outside"):
        judge.parse("Score: 11")
    with pytest.raises(JudgeError, match="no score"):
        judge.parse("I think it is good.")


@pytest.mark.parametrize("overrides,words", [
    (["reward.functions=[judge]"], ["reward.judge", "base_url"]),
    (["reward.judge.score_pattern=Score \\d+"], ["score_pattern", "group"]),
    (["reward.judge.score_pattern=(["], ["score_pattern", "regular expression"]),
    (["reward.judge.score_max=0"], ["score_max"]),
    (["reward.judge.concurrency=0"], ["concurrency"]),
])
def test_bad_judge_settings_fail_before_any_work(overrides, words):
    from tracerl.recipes.rl import check_rl_config

    with pytest.raises(ConfigError) as e:
        check_rl_config(load_config(RLConfig, None, overrides))
    for w in words:
        assert w in str(e.value)


def test_a_template_with_unknown_fields_is_refused():
    with pytest.raises(ConfigError, match="reward.judge.template"):
        Judge(JudgeConfig(base_url="http://127.0.0.1:9/v1", model="m", template="{question} {rubric}"))
