"""The RL loop: config validation before any work, and short end-to-end runs on the tiny preset."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from tests.support.crash import kill_after_checkpoint
from tests.support.tiny_models import picks_seven_or_eight
from safetensors.torch import load_file

from tracerl.config import load_config
from tracerl.errors import ConfigError
from tracerl.models import load_model
from tracerl.recipes.rl import run_rl
from tracerl.rl import RLConfig
from tracerl.recipes.rl import check_rl_config
from tracerl.train import checkpoint as ckpt
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
    (["eval.stop_at=0.5"], ["eval.stop_at", "SFT"]),
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


def test_rows_per_forward_cap_changes_only_how_rows_are_batched(tmp_path):
    """A full-attention trace has one training row per decoding step; capping rows per forward
    (for memory) must leave losses, value model and weights as they are without the cap."""
    start, task = picks_seven_or_eight(tmp_path)
    runs = {}
    for cap in (0, 3):
        out = tmp_path / f"cap{cap}"
        run_rl(load_config(RLConfig, None, task + SMALL + [
            f"output_dir={out}", f"model={start}", "max_steps=1", "value.enabled=true",
            "policy.filter_equal=false", f"policy.rows_per_forward={cap}"]), progress=False)
        runs[cap] = (read_metrics(out / "metrics.jsonl")[0],
                     load_file(ckpt.checkpoints_dir(out) / "step-00000001" / "model.safetensors"))
    (row0, w0), (row3, w3) = runs[0], runs[3]
    assert 0 < row0["accuracy"] < 1 and row3["reward_mean"] == row0["reward_mean"]
    for key in ("policy_loss", "value_loss", "explained_variance"):
        assert row3[key] == pytest.approx(row0[key], rel=1e-5, abs=1e-7), key
    # Adam's first update moves each weight by about +-lr (1e-3) whatever the gradient's size, so
    # summation-order noise in near-zero gradients shows at ~1e-5; the update itself is ~1e-3.
    assert all(torch.allclose(w3[k], w0[k], atol=5e-5) for k in w0)
    initial = load_file(Path(start) / "model.safetensors")
    assert max(float((w0[k] - initial[k]).abs().max()) for k in w0) > 5e-4  # it trained


@pytest.mark.slow
def test_rl_exact_resume_after_kill_9(tmp_path):
    """A `tracerl rl` process killed with SIGKILL after its step-2 checkpoint (and after logging
    step 3) resumes to exactly the metrics and weights of an uninterrupted run: rollouts, masks,
    value model and both optimizers continue where the checkpoint left them."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    base = TASK + SMALL + ["max_steps=5", "save_every=2", "value.enabled=true", "policy.filter_equal=false",
                           "rollout.num_prompts=8", "eval.every=0"]
    run_rl(load_config(RLConfig, None, base + [f"output_dir={straight}"]), progress=False)

    kill_after_checkpoint(["rl", *base, f"output_dir={killed}"], killed, step=2)
    assert max(r["step"] for r in read_metrics(killed / "metrics.jsonl")) >= 3  # rows the resume drops
    run_rl(load_config(RLConfig, None, base + [f"output_dir={killed}", "resume=true"]), progress=False)

    def stable(rows):
        return [{k: v for k, v in r.items() if not k.startswith("time_") and k not in ("seconds",)} for r in rows]

    assert stable(read_metrics(killed / "metrics.jsonl")) == stable(read_metrics(straight / "metrics.jsonl"))
    for name in ("step-00000004", "value-00000004"):
        for f in (ckpt.checkpoints_dir(straight) / name).glob("*.safetensors"):
            a, b = load_file(f), load_file(ckpt.checkpoints_dir(killed) / name / f.name)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"{name}/{f.name}"
    with pytest.raises(ConfigError, match="resume=true"):
        run_rl(load_config(RLConfig, None, base + [f"output_dir={killed}"]), progress=False)
    # Resuming with another objective is refused; running on for longer is not.
    with pytest.raises(ConfigError, match=r"policy\.eps: 0\.2 -> 0\.3"):
        run_rl(load_config(RLConfig, None, base + [f"output_dir={killed}", "resume=true", "policy.eps=0.3"]),
               progress=False)
    longer = run_rl(load_config(RLConfig, None, base + [f"output_dir={killed}", "resume=true", "max_steps=6"]),
                    progress=False)
    assert longer["steps"] == 6 and [r["step"] for r in read_metrics(killed / "metrics.jsonl")] == list(range(1, 7))


def test_rl_cli_bad_key_names_it(tmp_path):
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


@pytest.mark.slow
def test_the_frozen_reference_is_the_starting_model_after_resume(tmp_path):
    """kl_reference=initial: the run owns a frozen copy of the starting weights; a resumed run
    rebuilds it from the start, not from the checkpoint, so 2 + 1 steps equal 3 straight."""
    base = TASK + SMALL + ["policy.kl_reference=initial", "policy.beta=0.5", "policy.filter_equal=false",
                           "save_every=1", "policy.ppo_epochs=2", "eval.every=0"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_rl(load_config(RLConfig, None, base + [f"output_dir={straight}", "max_steps=3"]), progress=False)
    run_rl(load_config(RLConfig, None, base + [f"output_dir={resumed}", "max_steps=2"]), progress=False)
    run_rl(load_config(RLConfig, None, base + [f"output_dir={resumed}", "max_steps=3", "resume=true"]),
           progress=False)

    def stable(rows):
        return [{k: v for k, v in r.items() if not k.startswith("time_") and k != "seconds"} for r in rows]

    a, b = stable(read_metrics(straight / "metrics.jsonl")), stable(read_metrics(resumed / "metrics.jsonl"))
    assert a == b and a[-1]["optimizer_updates"] >= 2
    wa = load_file(ckpt.checkpoints_dir(straight) / "step-00000003" / "model.safetensors")
    wb = load_file(ckpt.checkpoints_dir(resumed) / "step-00000003" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
