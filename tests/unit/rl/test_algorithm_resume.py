"""Exact resume after kill -9 for the algorithms with their own rows and losses (d1, wd1, SPG):
a `tracerl rl` process killed after its step-1 checkpoint resumes to exactly the metrics and
weights of an uninterrupted run (their masks come from the step's generator, d1's per inner
update; nothing of theirs lives outside the checkpoint)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tests.support.crash import kill_after_checkpoint
from tests.support.tiny_models import picks_seven_or_eight
from tracerl.config import load_config
from tracerl.recipes.rl import run_rl
from tracerl.rl import RLConfig
from tracerl.train import checkpoint as ckpt
from tracerl.train.metrics import read_metrics

COMMON = ["rollout.num_prompts=4", "rollout.group_size=8", "rollout.sampling.max_new_tokens=4",
          "rollout.sampling.temperature=1.0", "loop.micro_batch=16", "optim.lr=1e-3", "max_steps=3",
          "save_every=1", "policy.filter_equal=false", "eval.every=0"]


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    """A start that is right some of the time, so every method has a non-zero loss to train on."""
    return picks_seven_or_eight(tmp_path_factory.mktemp("start"), steps=30)


@pytest.mark.slow
@pytest.mark.parametrize("method,extra", [
    ("d1", ["policy.ppo_epochs=2", "policy.kl_reference=initial", "policy.beta=0.04"]),
    ("wd1", ["policy.ppo_epochs=2"]),
    ("spg", ["policy.ppo_epochs=2"]),
])
def test_exact_resume_after_kill_9(tmp_path, start, method, extra):
    checkpoint, task = start
    base = task + COMMON + [f"model={checkpoint}", f"policy.method={method}", *extra]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run_rl(load_config(RLConfig, None, base + [f"output_dir={straight}"]), progress=False)
    kill_after_checkpoint(["rl", *base, f"output_dir={killed}"], killed, step=1)
    run_rl(load_config(RLConfig, None, base + [f"output_dir={killed}", "resume=true"]), progress=False)

    def stable(rows):
        return [{k: v for k, v in r.items() if not k.startswith("time_") and k != "seconds"} for r in rows]

    a, b = stable(read_metrics(straight / "metrics.jsonl")), stable(read_metrics(killed / "metrics.jsonl"))
    assert [r["step"] for r in a] == [1, 2, 3] and a == b
    assert any(r["policy_loss"] != 0.0 for r in a)  # it trained
    name = "step-00000003"
    x = load_file(ckpt.checkpoints_dir(straight) / name / "model.safetensors")
    y = load_file(ckpt.checkpoints_dir(killed) / name / "model.safetensors")
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
