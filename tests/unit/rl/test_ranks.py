"""RL on several ranks with real torchrun processes on gloo: TraceRL with the value model and a
KL reference synced toward the policy every 2 steps, 2 ranks x accumulation 1 against 1 rank x
accumulation 2 on the same prompt groups, and exact resume at 2 ranks (the reference's shards are
in the checkpoint: resuming after step 2 needs the synced one)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.support import torchrun
from tests.unit.rl.test_loop import TASK
from tracerl.config import load_config
from tracerl.errors import ConfigError
from tracerl.recipes.rl import check_rl_world, run_rl
from tracerl.rl import RLConfig
from tracerl.train import checkpoint as ckpt
from tracerl.train.distributed import World
from tracerl.train.metrics import read_metrics

RUN = TASK + ["rollout.num_prompts=4", "rollout.group_size=4", "rollout.sampling.max_new_tokens=8",
              "rollout.sampling.temperature=1.0", "loop.micro_batch=4", "optim.lr=1e-3", "max_steps=3",
              "save_every=1", "value.enabled=true", "policy.filter_equal=false", "policy.beta=0.01",
              "policy.kl_reference=initial", "policy.ref_model_sync_steps=2", "policy.ref_model_mixup_alpha=0.5",
              "loop.report_to=[none]"]
COMPARED = ("reward_mean", "accuracy", "response_length", "kept_fraction", "policy_loss", "value_loss",
            "grad_norm", "explained_variance", "ref_kl")


def comparable(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("time_") and k != "seconds"} for r in rows]


def two_ranks(out: Path, *extra: str) -> None:
    done = torchrun.run(["rl", *RUN, f"output_dir={out}", "loop.accumulation=1", *extra])
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("rl-ranks")
    two_ranks(root / "two")
    run_rl(load_config(RLConfig, None, RUN + [f"output_dir={root / 'one'}", "loop.accumulation=2"]), progress=False)
    return root


def test_two_ranks_equal_one_rank_with_doubled_accumulation(runs):
    two, one = read_metrics(runs / "two" / "metrics.jsonl"), read_metrics(runs / "one" / "metrics.jsonl")
    assert [r["step"] for r in two] == [1, 2, 3]
    for a, b in zip(two, one):
        assert a["optimizer_updates"] == b["optimizer_updates"] == 2
        for key in COMPARED:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-9), (a["step"], key)
    assert any(r["policy_loss"] != 0 for r in two)  # it trained
    final = "step-00000003/model.safetensors"
    wa, wb = load_file(str(runs / "two" / "checkpoints" / final)), load_file(str(runs / "one" / "checkpoints" / final))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-5, msg=k)


def test_two_ranks_resume_exactly(runs):
    out = runs / "resumed"
    shutil.copytree(runs / "two", out)
    shutil.rmtree(out / "checkpoints" / "step-00000003")  # as if killed after step 2's checkpoint
    two_ranks(out, "resume=true")
    assert comparable(read_metrics(out / "metrics.jsonl")) == comparable(read_metrics(runs / "two" / "metrics.jsonl"))
    wa = load_file(str(ckpt.list_checkpoints(out)[-1] / "model.safetensors"))
    wb = load_file(str(ckpt.list_checkpoints(runs / "two")[-1] / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_what_several_ranks_cannot_split_is_refused_before_any_work():
    two = World(rank=0, size=2)
    check_rl_world(load_config(RLConfig, None, RUN), two)
    with pytest.raises(ConfigError, match="rollout.num_prompts: 3 prompt groups do not split over 2 ranks"):
        check_rl_world(load_config(RLConfig, None, RUN + ["rollout.num_prompts=3"]), two)
    check_rl_world(load_config(RLConfig, None, RUN + ["rollout.num_prompts=3"]), World())


@pytest.mark.parametrize("reference", [
    ["policy.ref_model_sync_steps=0"],  # the policy with its adapter off
    ["policy.ref_model_sync_steps=2"],  # a frozen copy, mixed with the merged policy after step 2
])
def test_lora_policy_and_value_model_on_two_ranks_equal_one_rank(tmp_path, reference):
    lora = ["lora.enabled=true", "lora.r=4", "value.lora.enabled=true", "value.lora.r=4", "value.lr=1e-3", *reference]
    two_ranks(tmp_path / "two", *lora)
    run_rl(load_config(RLConfig, None, RUN + lora + [f"output_dir={tmp_path / 'one'}", "loop.accumulation=2"]),
           progress=False)
    two, one = read_metrics(tmp_path / "two" / "metrics.jsonl"), read_metrics(tmp_path / "one" / "metrics.jsonl")
    assert [r["step"] for r in two] == [1, 2, 3]
    for a, b in zip(two, one):
        for key in COMPARED:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-9), (a["step"], key)
    assert two[2]["ref_kl"] > 0
    adapter = "step-00000003/adapter/adapter_model.safetensors"
    wa, wb = (load_file(str(run / "checkpoints" / adapter)) for run in (tmp_path / "two", tmp_path / "one"))
    assert wa.keys() == wb.keys() and any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in wa.items())
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-5, msg=k)


def test_a_value_head_on_the_shared_backbone_trains_on_two_ranks_as_on_one(tmp_path):
    """value.share_backbone: the head is whole on every rank on top of the sharded policy, its
    gradients summed over the ranks; it is saved in the shards and resumed from them."""
    shared = ["value.share_backbone=true", "value.lr=1e-2"]
    two_ranks(tmp_path / "two", *shared)
    run_rl(load_config(RLConfig, None, RUN + shared + [f"output_dir={tmp_path / 'one'}", "loop.accumulation=2"]),
           progress=False)
    two, one = read_metrics(tmp_path / "two" / "metrics.jsonl"), read_metrics(tmp_path / "one" / "metrics.jsonl")
    for a, b in zip(two, one):
        for key in COMPARED:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-9), (a["step"], key)
    assert len({r["value_loss"] for r in two}) == 3  # the head moves
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "two", resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-00000003")
    two_ranks(resumed, *shared, "resume=true")
    assert comparable(read_metrics(resumed / "metrics.jsonl")) == comparable(two)
