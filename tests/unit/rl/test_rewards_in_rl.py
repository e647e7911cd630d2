"""Rewards inside RL: a user's reward file trains the policy through `tracerl rl`, a process reward
reaches the value model's GAE targets, truncated responses are scored wrong or masked by config."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from tests.support.tiny_models import picks_seven_or_eight
from tracerl.config import load_config
from tracerl.objectives import build_trace_rows, gae_targets
from tracerl.objectives.examples import Example
from tracerl.recipes.rl import run_rl
from tracerl.rl import RLConfig
from tracerl.train.metrics import read_metrics

FUNCTIONS = textwrap.dedent('''
    def sevens(problem, response, response_ids):
        return float(response.count("7"))

    def one_per_token(problem, response, response_ids):
        return [1.0] * len(response_ids)

    def length(problem, response, response_ids):
        return float(len(response_ids))

    def one(problem, response, response_ids):
        return 1.0
''')

SMALL = ["rollout.num_prompts=4", "rollout.group_size=4", "rollout.sampling.max_new_tokens=4",
         "rollout.sampling.temperature=1.0", "loop.micro_batch=8", "max_steps=1", "--no-progress"]


@pytest.fixture()
def reward_file(tmp_path):
    path = tmp_path / "outside" / "my_rewards.py"  # a file outside the project
    path.parent.mkdir()
    path.write_text(FUNCTIONS)
    return path


@pytest.mark.slow
def test_a_reward_file_outside_the_project_trains_through_tracerl_rl(tmp_path, reward_file):
    """The start answers "Pick i:" with 7 or 8 about equally; a reward that counts 7s moves it to 7."""
    start, task = picks_seven_or_eight(tmp_path)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "tracerl.cli", "rl", *task, f"model={start}", f"output_dir={out}",
           f"reward.functions=[{reward_file}:sevens]", "rollout.num_prompts=4", "rollout.group_size=8",
           "rollout.sampling.max_new_tokens=4", "rollout.sampling.temperature=1.0", "loop.micro_batch=16",
           "optim.lr=3e-3", "optim.warmup_steps=0", "max_steps=6", "--no-progress", "--json"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert all("reward/sevens" in r for r in rows)
    first, last = rows[0]["reward_mean"], sum(r["reward_mean"] for r in rows[-2:]) / 2
    assert first < 1.0 and last > first + 1.0, [r["reward_mean"] for r in rows]  # measured: 0.125 -> 3.4


def _rl(tmp_path, name, *overrides):
    out = tmp_path / name
    run_rl(load_config(RLConfig, None, [*SMALL[:-1], f"output_dir={out}", "optim.lr=1e-4", *overrides]),
           progress=False)
    return read_metrics(out / "metrics.jsonl")[0]


@pytest.mark.slow
def test_a_process_reward_reaches_the_value_models_returns(tmp_path, reward_file):
    """The same total reward per response, as a per-token list or as one number: as a list it is
    the value model's per-token reward (with gamma = 1 a token's return counts the tokens decoded at or
    after its step, so the mean return exceeds 1); as a number it is the outcome, whose group z-score is
    0 when every response has the same length (4 tokens, no stop)."""
    base = ["value.enabled=true", "policy.filter_equal=false"]
    process = _rl(tmp_path, "process", *base, f"reward.functions=[{reward_file}:one_per_token]")
    outcome = _rl(tmp_path, "outcome", *base, f"reward.functions=[{reward_file}:length]")
    assert process["reward_mean"] == outcome["reward_mean"] == 4.0
    assert outcome["return_mean"] == 0.0
    assert 1.0 < process["return_mean"] <= 4.0


def test_gae_targets_add_token_rewards_to_the_outcome():
    """Hand computation: one response of 3 tokens decoded in steps [1, 1, 2] (two steps), gamma = 1,
    lambda = 1, values 0: the outcome 2.0 sits on step 2's token, the process rewards on their tokens,
    averaged per step: r*_1 = (0.5 + 0.1) / 2 = 0.3, r*_2 = 2.0 + 1.0 = 3.0; token returns
    r_j + R*_{k+1}: [0.5 + 3, 0.1 + 3, 3.0]."""
    ex = Example(prompt_ids=[5, 6, 7, 8], response_ids=[1, 2, 3], step_map=[1, 1, 2])
    from tracerl.models import load_model

    rows = build_trace_rows(load_model("tiny-block").spec, [ex], block_size=4)
    values = torch.zeros(rows.num_targets)
    returns, adv = gae_targets(rows, values, [2.0], token_rewards=[[0.5, 0.1, 1.0]])
    by_index = dict(zip(rows.target_index.tolist(), returns.tolist()))
    assert by_index == pytest.approx({0: 3.5, 1: 3.1, 2: 3.0})
    assert torch.allclose(adv, returns)  # values 0: advantage = return
    plain, _ = gae_targets(rows, values, [2.0])
    assert dict(zip(rows.target_index.tolist(), plain.tolist())) == pytest.approx({0: 2.0, 1: 2.0, 2: 2.0})


@pytest.mark.slow
def test_truncated_responses_are_wrong_or_masked_by_config(tmp_path, reward_file):
    """A random model rarely stops within 4 tokens: nearly every response is truncated.  With a
    reward of 1 for everything, `wrong` gives the truncated ones truncated_reward instead, `mask`
    keeps their reward but leaves them out of the loss."""
    common = [f"reward.functions=[{reward_file}:one]", "policy.filter_equal=false"]
    keep = _rl(tmp_path, "keep", *common)
    wrong = _rl(tmp_path, "wrong", *common, "policy.truncated=wrong", "policy.truncated_reward=-1")
    masked = _rl(tmp_path, "mask", *common, "policy.truncated=mask")
    cut = keep["truncated_fraction"]
    assert cut > 0.5 and wrong["truncated_fraction"] == masked["truncated_fraction"] == cut
    assert keep["reward_mean"] == 1.0 and keep["kept_fraction"] == 1.0
    assert wrong["reward_mean"] == pytest.approx((1 - cut) * 1.0 + cut * -1.0)
    assert wrong["accuracy"] <= 1 - cut
    assert masked["reward_mean"] == 1.0 and masked["kept_fraction"] == pytest.approx(1 - cut)


def test_a_bad_truncated_option_and_a_bad_reward_fail_before_any_work(tmp_path, reward_file):
    from tracerl.errors import ConfigError
    from tracerl.recipes.rl import check_rl_config

    with pytest.raises(ConfigError, match="policy.truncated.*keep, wrong, mask"):
        load_config(RLConfig, None, ["policy.truncated=drop"])
    with pytest.raises(ConfigError, match=r"reward.functions\[0\].*no 'nope'"):
        check_rl_config(load_config(RLConfig, None, [f"reward.functions=[{reward_file}:nope]"]))
    cmd = [sys.executable, "-m", "tracerl.cli", "rl", f"output_dir={tmp_path / 'x'}",
           f"reward.functions=[{reward_file.parent / 'missing.py'}:f]", "--no-progress"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "missing.py" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "x").exists()  # nothing was started
