"""Curricula (rl/curriculum.py): stages by step over task difficulty and the response cap, checked
before any work, applied at their step, and resumed exactly."""

from __future__ import annotations

import pytest

from tracerl.config import load_config
from tracerl.errors import ConfigError
from tracerl.recipes.rl import check_rl_config, run_rl
from tracerl.rl import RLConfig
from tracerl.rl.curriculum import config_at, stage_at
from tracerl.train.metrics import read_metrics

TASK = ["task.source=gym", "task.name=basic_arithmetic", "task.size=64", "task.template=raw", "task.chat=false",
        'task.params={min_terms: 2, max_terms: 2, min_digits: 1, max_digits: 1, operators: ["+"], '
        "allow_parentheses: false, allow_negation: false}"]
SMALL = ["rollout.num_prompts=4", "rollout.group_size=2", "rollout.sampling.max_new_tokens=4",
         "rollout.sampling.temperature=1.0", "loop.micro_batch=8", "optim.lr=1e-3", "policy.filter_equal=false",
         "eval.every=0"]
STAGES = ["curriculum=[{start: 3, max_new_tokens: 2}, {start: 4, task_params: {min_terms: 3, max_terms: 3}}]"]


def test_the_stage_of_a_step_and_its_config():
    config = load_config(RLConfig, None, TASK + SMALL + STAGES)
    assert [stage_at(config.curriculum, s) for s in (1, 2, 3, 4, 9)] == [-1, -1, 0, 1, 1]
    assert config_at(config, 2) is config
    third, fourth = config_at(config, 3), config_at(config, 4)
    assert third.rollout.sampling.max_new_tokens == 2 and third.task.params["max_terms"] == 2
    assert fourth.rollout.sampling.max_new_tokens == 2  # kept from the stage before
    assert fourth.task.params["max_terms"] == 3 and fourth.task.params["max_digits"] == 1  # merged
    assert config.task.params["max_terms"] == 2  # the run's own config is untouched


@pytest.mark.parametrize("stages,words", [
    ("[{start: 0}]", ["curriculum[0].start", "from 1"]),
    ("[{start: 5}, {start: 5}]", ["curriculum[1].start", "increasing"]),
    ("[{start: 2, max_new_tokens: 0}]", ["curriculum[0].max_new_tokens"]),
    ("[{start: 2, max_tokens: 8}]", ["curriculum[0].max_tokens", "max_new_tokens"]),
])
def test_bad_stages_fail_before_any_work(stages, words):
    with pytest.raises(ConfigError) as e:
        check_rl_config(load_config(RLConfig, None, TASK + [f"curriculum={stages}"]))
    for w in words:
        assert w in str(e.value)


def test_task_params_need_a_generated_task(tmp_path):
    data = tmp_path / "t.jsonl"
    data.write_text('{"question": "q", "ground_truth_answer": "1"}\n')
    with pytest.raises(ConfigError, match=r"curriculum\[0\].task_params.*jsonl"):
        check_rl_config(load_config(RLConfig, None, ["task.source=jsonl", f"task.name={data}",
                                                     "curriculum=[{start: 2, task_params: {max_terms: 3}}]"]))


@pytest.mark.slow
def test_stages_apply_at_their_step_and_resume_exactly(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    base = TASK + SMALL + STAGES + ["save_every=1"]
    run_rl(load_config(RLConfig, None, base + [f"output_dir={straight}", "max_steps=4"]), progress=False)
    rows = read_metrics(straight / "metrics.jsonl")
    assert [r.get("curriculum_stage") for r in rows] == [-1, -1, 0, 1]
    assert [r["max_new_tokens"] for r in rows] == [4, 4, 2, 2]
    assert all(r["response_length"] <= 2 for r in rows[2:]) and rows[0]["response_length"] > 2
    run_rl(load_config(RLConfig, None, base + [f"output_dir={resumed}", "max_steps=3"]), progress=False)
    run_rl(load_config(RLConfig, None, base + [f"output_dir={resumed}", "max_steps=4", "resume=true"]),
           progress=False)

    def stable(rows):
        return [{k: v for k, v in r.items() if not k.startswith("time_") and k != "seconds"} for r in rows]

    assert stable(read_metrics(resumed / "metrics.jsonl")) == stable(rows)
