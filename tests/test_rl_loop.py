"""The RL loop: config validation before any work, and short end-to-end runs on the tiny preset."""

from __future__ import annotations

import pytest

from tracerl.config import load_config
from tracerl.errors import ConfigError
from tracerl.models import load_model
from tracerl.rl import RLConfig, run_rl
from tracerl.rl.trainer import check_rl_config
from tracerl.train.metrics import read_metrics

TASK = ["task.source=gym", "task.name=basic_arithmetic", "task.size=64", "task.template=raw", "task.chat=false",
        'task.params={min_terms: 2, max_terms: 2, min_digits: 1, max_digits: 1, operators: ["+"], '
        "allow_parentheses: false, allow_negation: false}"]
SMALL = ["rollout.num_prompts=4", "rollout.group_size=4", "rollout.sampling.max_new_tokens=4",
         "rollout.sampling.temperature=1.0", "loop.micro_batch=8", "optim.lr=1e-3", "max_steps=2"]


@pytest.mark.parametrize("overrides,words", [
    (["policy.method=coupled", "value.enabled=true"], ["value.enabled", "coupled"]),
    (["rollout.sampling.full_cache=prefix"], ["full_cache", "full-attention"]),
    (["policy.method=grpo"], ["policy.method", "tracerl"]),
    (["policy.kl_reference=sft"], ["kl_reference"]),
    (["policy.accuracy_band=[0.9, 0.1]"], ["accuracy_band"]),
    (["rollout.group_size=1"], ["group_size"]),
])
def test_incompatible_options_fail_before_any_work(overrides, words):
    config = load_config(RLConfig, None, overrides)
    with pytest.raises(ConfigError) as e:
        check_rl_config(config, load_model("tiny-block"))
    for w in words:
        assert w in str(e.value)


@pytest.mark.slow
@pytest.mark.parametrize("method,value", [("tracerl", True), ("coupled", False), ("random_masking", False)])
def test_short_rl_run_writes_metrics_and_checkpoint(tmp_path, method, value):
    config = load_config(RLConfig, None, TASK + SMALL + [
        f"output_dir={tmp_path}", f"policy.method={method}", f"value.enabled={str(value).lower()}",
        "policy.filter_equal=false", "save_every=1"])
    summary = run_rl(config, progress=False)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("reward_mean", "policy_loss", "accuracy", "response_length", "nfe_per_token", "kl",
                "clip_fraction", "time_rollout", "time_reward", "time_policy"):
        assert key in rows[0], key
    assert ("value_loss" in rows[0]) == value and ("explained_variance" in rows[0]) == value
    assert rows[0]["clip_fraction"] == 0.0  # one update per step: the first micro-batch is on-policy
    assert summary["final_checkpoint"].endswith("step-00000002")
    assert load_model(summary["final_checkpoint"]).family == "block"
    if value:
        assert (tmp_path / "checkpoints" / "value-00000002" / "value_head.safetensors").is_file()


@pytest.mark.slow
def test_rl_resume_continues_where_it_stopped(tmp_path):
    straight = tmp_path / "straight"
    cut = tmp_path / "cut"
    base = TASK + SMALL + ["max_steps=3", "save_every=1", "value.enabled=true", "policy.filter_equal=false"]
    run_rl(load_config(RLConfig, None, base + [f"output_dir={straight}"]), progress=False)
    run_rl(load_config(RLConfig, None, base + [f"output_dir={cut}", "max_steps=2"]), progress=False)
    run_rl(load_config(RLConfig, None, base + [f"output_dir={cut}", "resume=true"]), progress=False)

    def stable(rows):
        return [{k: v for k, v in r.items() if not k.startswith("time_") and k not in ("seconds",)} for r in rows]

    assert stable(read_metrics(cut / "metrics.jsonl")) == stable(read_metrics(straight / "metrics.jsonl"))
    with pytest.raises(ConfigError, match="resume=true"):
        run_rl(load_config(RLConfig, None, base + [f"output_dir={cut}"]), progress=False)


def test_rl_cli_bad_key_names_it(tmp_path):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "tracerl.cli", "rl", "policy.epz=0.1"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2 and "policy.epz" in out.stderr and "eps" in out.stderr


@pytest.mark.slow
def test_bf16_autocast_first_update_is_on_policy_and_value_folders_are_pruned(tmp_path):
    # Old log-probs are computed under the same autocast as the policy pass: ratio exactly 1.
    config = load_config(RLConfig, None, TASK + SMALL + [
        f"output_dir={tmp_path}", "max_steps=3", "save_every=1", "loop.keep_last=1", "loop.micro_batch=16",
        "loop.mixed_precision=bf16", "value.enabled=true", "policy.filter_equal=false"])
    run_rl(config, progress=False)
    first = read_metrics(tmp_path / "metrics.jsonl")[0]
    assert first["ratio_mean"] == 1.0 and first["kl"] == 0.0
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step-00000003", "value-00000003"]
