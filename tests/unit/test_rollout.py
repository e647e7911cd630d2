"""The one rollout path: the seed rule (a sample does not depend on its batch), scores attached to
their own responses, the base-seed rule, and reward errors."""

from __future__ import annotations

import pytest

from tracerl.config import load_config
from tracerl.data.tasks import TaskConfig, load_problems
from tracerl.generation import SamplingConfig, derive_seed, generate
from tracerl.models import load_model
from tracerl.rl import RLConfig
from tracerl.rewards import Rewards
from tracerl.rollout import base_seed, prompts_for, rollout, safe_scores

TASK = TaskConfig(source="gym", name="basic_arithmetic", size=6, template="raw", chat=False,
                  params={"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1, "operators": ["+"],
                          "allow_parentheses": False, "allow_negation": False})


@pytest.fixture(scope="module")
def setup():
    model = load_model("tiny-block")
    problems = load_problems(TASK)
    return model, problems, prompts_for(model.tokenizer, problems, TASK)


def _key(result):
    return [(x.problem_index, x.sample, x.generation.response_ids, x.generation.step_map) for x in result.samples]


@pytest.mark.parametrize("strategy", ["static", "random"])
def test_a_sample_does_not_depend_on_the_batch_it_shared(setup, strategy):
    model, problems, prompts = setup
    sampling = SamplingConfig(max_new_tokens=8, temperature=1.0, strategy=strategy, stop_token_ids=())
    runs = [rollout(model, problems, prompts, sampling, seed_key=(3, 1), samples_per_problem=3, batch_size=b)
            for b in (1, 5, 64)]
    assert _key(runs[0]) == _key(runs[1]) == _key(runs[2])
    # Each sample is request (problem i, sample s) seeded with derive_seed(*key, i, s).
    x = runs[1].samples[7]
    [alone] = generate(model, [prompts[x.problem_index]], sampling, seeds=[derive_seed(3, 1, x.problem_index, x.sample)])
    assert (alone.response_ids, alone.step_map) == (x.generation.response_ids, x.generation.step_map)
    # Another key, another sample; the samples of one problem differ from each other.
    other = rollout(model, problems, prompts, sampling, seed_key=(3, 2), samples_per_problem=3, batch_size=64)
    assert _key(other) != _key(runs[0])
    assert len({tuple(x.generation.response_ids) for x in runs[0].samples[:3]}) > 1


def test_scores_follow_their_responses_and_texts_drop_special_tokens(setup):
    model, problems, prompts = setup
    result = rollout(model, problems, prompts, SamplingConfig(max_new_tokens=4), seed_key=(0,), batch_size=4)
    assert [x.problem.id for x in result.samples] == [p.id for p in problems]
    for x in result.samples:
        assert x.text == model.tokenizer.decode(x.generation.response_ids, skip_special_tokens=True)
        assert x.score == safe_scores(Rewards(), [x.problem], [x.text], [x.generation.response_ids], 1, True)[0][0]


def test_base_seed_zero_is_a_seed():
    assert base_seed(SamplingConfig(seed=0), 7) == 0
    assert base_seed(SamplingConfig(), 7) == 7


def test_a_reward_that_raises_scores_zero_and_names_the_sample():
    """One broken problem (its generator no longer exists) costs that sample its reward and is
    reported with its id and response; the rest are scored; fail_on_reward_error re-raises."""
    from tracerl.data.tasks import Problem
    from tracerl.errors import ConfigError

    rl_task = ["task.source=gym", "task.name=basic_arithmetic", "task.size=64", "task.template=raw",
               "task.chat=false", 'task.params={min_terms: 2, max_terms: 2, min_digits: 1, max_digits: 1, '
               'operators: ["+"], allow_parentheses: false, allow_negation: false}']
    good = load_problems(load_config(RLConfig, None, rl_task).task)[:2]
    broken = Problem(id="gone/0", question="Calculate 1 + 1.", kind="gym", answer="2",
                     meta={"gym": {"name": "no_such_task", "params": "{}", "seed": 0, "size": 1, "index": 0}})
    texts = [f" {good[0].answer}", " 2", " wrong"]
    scores, errors = safe_scores(Rewards(), [good[0], broken, good[1]], texts, [[], [], []], workers=1, fail=False)
    assert [s.correct for s in scores] == [True, False, False] and scores[1].reward == 0.0
    assert len(errors) == 1 and "gone/0" in errors[0] and "' 2'" in errors[0] and "no_such_task" in errors[0]
    with pytest.raises(ConfigError, match="no_such_task"):
        safe_scores(Rewards(), [good[0], broken], texts[:2], [[], []], workers=1, fail=True)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_engine_and_static_rollouts_give_the_same_samples(setup, temperature):
    model, problems, prompts = setup
    sampling = SamplingConfig(max_new_tokens=12, temperature=temperature, stop_token_ids=(5, 66))
    runs = {e: rollout(model, problems, prompts, sampling, seed_key=(4, 2), samples_per_problem=3, batch_size=4,
                       engine=e) for e in ("engine", "static")}
    assert _key(runs["engine"]) == _key(runs["static"])
    assert [x.score for x in runs["engine"].samples] == [x.score for x in runs["static"].samples]
    assert runs["engine"].stats.new_tokens == runs["static"].stats.new_tokens > 0
    assert 0 < runs["engine"].stats.forward_seconds <= runs["engine"].stats.seconds


def test_engine_rollout_sees_a_weight_update_without_reload():
    """The engine decodes the trainer's module itself: an in-place update shows in the next rollout."""
    import torch

    model = load_model("tiny-block")
    problems = load_problems(TASK)
    prompts = prompts_for(model.tokenizer, problems, TASK)
    sampling = SamplingConfig(max_new_tokens=8, stop_token_ids=())
    before = rollout(model, problems, prompts, sampling, seed_key=(0,), batch_size=4)
    with torch.no_grad():  # an optimizer step, as far as the weights know
        for p in model.backbone.parameters():
            if p.dim() == 2:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 0.2)
    after = rollout(model, problems, prompts, sampling, seed_key=(0,), batch_size=4)
    assert _key(after) != _key(before)
    fresh = generate(model, prompts, sampling)
    assert [x.generation.response_ids for x in after.samples] == [g.response_ids for g in fresh]


def test_engine_setting_is_checked():
    from tracerl.errors import ConfigError

    with pytest.raises(ConfigError, match=r"rollout\.engine: unknown 'vllm'; valid: engine, static"):
        load_config(RLConfig, None, ["rollout.engine=vllm"])


@pytest.mark.parametrize("engine", ["engine", "static"])
def test_progress_counts_every_sample_as_it_is_generated(setup, engine):
    model, problems, prompts = setup
    calls = []
    rollout(model, problems, prompts, SamplingConfig(max_new_tokens=8, stop_token_ids=(5, 66)), seed_key=(0,),
            samples_per_problem=2, batch_size=4, engine=engine, progress=calls.append)
    assert sum(calls) == 2 * len(problems) and len(calls) > 1  # advances during generation, not once
