"""LoRA in RL (policy and value model) and the KL reference with its own update interval:
TrainingRun.sync_frozen mixes weights as TR-DPO says, a LoRA policy's reference is its base
weights (the adapter switched off), a LoRA run with a reward file outside the project moves its
reward, and LoRA runs and synced-reference runs resume exactly after kill -9."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tests.support.crash import kill_after_checkpoint
from tests.support.tiny_models import picks_seven_or_eight
from tracerl.config import load_config
from tracerl.errors import ConfigError
from tracerl.models import load_model
from tracerl.objectives import ValueModel
from tracerl.recipes.rl import check_rl_config, run_rl
from tracerl.rl import RLConfig
from tracerl.train import checkpoint as ckpt
from tracerl.train import lora
from tracerl.train.loop import LoopConfig, TrainingRun
from tracerl.train.metrics import read_metrics
from tracerl.train.optim import OptimConfig

SEVENS = "def sevens(problem, response, response_ids):\n    return float(response.count('7'))\n"
RUN = ["rollout.num_prompts=4", "rollout.group_size=8", "rollout.sampling.max_new_tokens=4",
       "rollout.sampling.temperature=1.0", "loop.micro_batch=16", "optim.warmup_steps=0", "eval.every=0",
       "loop.report_to=[none]"]
LORA = ["lora.enabled=true", "value.enabled=true", "value.lora.enabled=true", "value.lr=1e-3",
        "policy.kl_reference=initial", "policy.beta=0.01", "optim.lr=1e-2"]


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    root = tmp_path_factory.mktemp("start")
    checkpoint, task = picks_seven_or_eight(root)
    (root / "rewards.py").write_text(SEVENS)
    return [*task, f"model={checkpoint}", f"reward.functions=[{root / 'rewards.py'}:sevens]"]


def _run(model, tmp_path) -> TrainingRun:
    return TrainingRun(model, output_dir=tmp_path / "run", max_steps=4, save_every=1, seed=0, optim=OptimConfig(),
                       loop=LoopConfig(report_to=["none"]))


def _nudge(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.01)


def test_sync_frozen_mixes_the_policy_into_the_reference(tmp_path):
    """TR-DPO (arXiv 2404.09656), as TRL's ref_model_mixup_alpha: ref <- a*policy + (1-a)*ref."""
    model = load_model("tiny-block")
    run = _run(model, tmp_path)
    ref = run.add_frozen_copy("reference", tracks_policy=True)
    start = {k: v.clone() for k, v in ref.named_parameters()}
    _nudge(model, 0)
    run.sync_frozen("reference", 0.6)
    policy = dict(model.named_parameters())
    for k, w in ref.named_parameters():
        assert not w.requires_grad
        torch.testing.assert_close(w, 0.6 * policy[k] + 0.4 * start[k], rtol=0, atol=1e-6)
    assert all(not torch.equal(w, start[k]) for k, w in ref.named_parameters())  # every weight moved
    run.sync_frozen("reference", 1.0)
    assert all(torch.equal(w, policy[k]) for k, w in ref.named_parameters())  # alpha = 1 copies, exactly
    run.add_frozen_copy("fixed")
    with pytest.raises(ValueError, match="tracks_policy"):
        run.sync_frozen("fixed", 0.5)


def test_a_lora_policys_reference_is_its_base_and_syncs_its_merged_weights(tmp_path):
    base = load_model("tiny-block")
    model = load_model("tiny-block")
    lora.apply_lora(model, lora.LoraConfig(r=4, alpha=8), seed=0)
    run = _run(model, tmp_path)
    ref = run.add_frozen_copy("reference", tracks_policy=True)
    assert not lora.is_lora(ref) and not any("lora_" in k for k in ref.state_dict())
    _nudge(model, 1)  # the adapters (only they train) are non-zero now
    ids = torch.tensor([[5, 9, 17, 33, 2, 8, 11, 4]])
    with torch.no_grad():
        live = model.backbone(ids).logits
        with lora.adapter_disabled(model):
            off = model.backbone(ids).logits
        torch.testing.assert_close(off, base.backbone(ids).logits, rtol=0, atol=1e-6)
        assert not torch.allclose(live, off, atol=1e-4)
        run.sync_frozen("reference", 1.0)
        torch.testing.assert_close(ref.backbone(ids).logits, live, rtol=1e-5, atol=1e-5)


def test_a_lora_value_model_trains_adapters_and_its_head_on_the_base_weights(tmp_path, start):
    out = tmp_path / "run"
    run_rl(load_config(RLConfig, None, start + RUN + LORA + ["max_steps=2", f"output_dir={out}"]), progress=False)
    folder = ckpt.checkpoints_dir(out) / "value-00000002"
    adapter = load_file(folder / "adapter" / "adapter_model.safetensors")
    assert adapter and all("lora_A" in k or "lora_B" in k for k in adapter)
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in adapter.items())  # it trained
    loaded = ValueModel.from_pretrained(folder)  # the merged folder is an ordinary value model
    assert loaded.value_head.weight.abs().sum() > 0
    policy = ckpt.checkpoints_dir(out) / "step-00000002"
    assert (policy / "adapter" / "adapter_model.safetensors").is_file() and (policy / "model.safetensors").is_file()


@pytest.mark.slow
def test_lora_rl_moves_the_reward_of_a_file_outside_the_project(tmp_path, start):
    """The start answers "Pick i:" with 7 or 8; LoRA adapters (policy and value model, KL against
    the adapter-off base) learn to say 7 (measured: 0.12 -> 1.3 in 6 steps at lr 1e-2)."""
    out = tmp_path / "run"
    run_rl(load_config(RLConfig, None, start + RUN + LORA + ["max_steps=6", f"output_dir={out}", "loop.micro_batch=32"]),
           progress=False)
    rows = read_metrics(out / "metrics.jsonl")
    first, last = rows[0]["reward_mean"], sum(r["reward_mean"] for r in rows[-2:]) / 2
    assert first < 0.5 and last > first + 0.5, [r["reward_mean"] for r in rows]
    assert rows[0]["ref_kl"] == 0.0 < rows[-1]["ref_kl"]  # the adapter-off base is the start


def _stable(rows):
    return [{k: v for k, v in r.items() if not k.startswith("time_") and k != "seconds"} for r in rows]


@pytest.mark.slow
@pytest.mark.parametrize("name,extra", [
    ("lora", LORA),
    ("synced-reference", ["policy.kl_reference=initial", "policy.beta=0.05", "policy.ref_model_sync_steps=1",
                          "policy.ref_model_mixup_alpha=0.6", "optim.lr=3e-3", "value.enabled=true"]),
    # a LoRA policy mixed into a synced reference (merged weights), a plain value model on its base
    ("lora-synced-plain-value", ["lora.enabled=true", "value.enabled=true", "value.lr=1e-4", "policy.beta=0.05",
                                 "policy.kl_reference=initial", "policy.ref_model_sync_steps=1", "optim.lr=1e-2"]),
])
def test_exact_resume_after_kill_9(tmp_path, start, name, extra):
    base = start + RUN + extra + ["max_steps=3", "save_every=1", "loop.micro_batch=32"]  # one update per step
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run_rl(load_config(RLConfig, None, base + [f"output_dir={straight}"]), progress=False)
    kill_after_checkpoint(["rl", *base, f"output_dir={killed}"], killed, step=1)
    run_rl(load_config(RLConfig, None, base + [f"output_dir={killed}", "resume=true"]), progress=False)
    a, b = _stable(read_metrics(straight / "metrics.jsonl")), _stable(read_metrics(killed / "metrics.jsonl"))
    assert [r["step"] for r in a] == [1, 2, 3] and a == b
    assert a[0]["ref_kl"] == 0.0 < a[2]["ref_kl"]  # the reference is the start, then differs from the policy
    for folder in ("step-00000003", "value-00000003") + (("reference-00000003",) if name != "lora" else ()):
        files = ["model.safetensors"]
        if name.startswith("lora") and (folder.startswith("step") or name == "lora"):
            files.append("adapter/adapter_model.safetensors")
        for file in files:
            x, y = (load_file(ckpt.checkpoints_dir(out) / folder / file) for out in (straight, killed))
            assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), (folder, file)


def test_the_synced_reference_is_the_mix_of_the_policies_it_saw(tmp_path, start):
    """alpha = 1, every step: the reference saved with step N is the policy of step N."""
    out = tmp_path / "run"
    run_rl(load_config(RLConfig, None, start + RUN + [
        "max_steps=2", "save_every=1", "policy.kl_reference=initial", "policy.beta=0.05",
        "policy.ref_model_sync_steps=1", "policy.ref_model_mixup_alpha=1.0", "optim.lr=3e-3",
        f"output_dir={out}"]), progress=False)
    for step in (1, 2):
        ref = load_file(ckpt.checkpoints_dir(out) / f"reference-{step:08d}" / "model.safetensors")
        pol = load_file(ckpt.checkpoints_dir(out) / f"step-{step:08d}" / "model.safetensors")
        assert all(torch.equal(ref[k], pol[k]) for k in pol)
    start_weights = load_file(str(next(a for a in start if a.startswith("model=")).split("=", 1)[1] + "/model.safetensors"))
    assert not all(torch.equal(ref[k], start_weights[k]) for k in ref)  # it moved away from the start


@pytest.mark.parametrize("overrides,message", [
    (["policy.ref_model_sync_steps=4"], "policy.ref_model_sync_steps: syncs the frozen KL reference"),
    (["policy.ref_model_sync_steps=4", "policy.kl_reference=initial"], "policy.beta > 0"),
    (["policy.ref_model_sync_steps=-1"], "policy.ref_model_sync_steps: must be >= 0"),
    (["policy.ref_model_mixup_alpha=0"], r"policy.ref_model_mixup_alpha: must be in \(0, 1\]"),
    (["value.lora.enabled=true"], "value.lora.enabled: there is no value model"),
    (["value.lora.enabled=true", "value.enabled=true", "value.share_backbone=true"], "a backbone of its own"),
    (["lora.rank=4"], "lora.rank"),
    (["policy.ref_model_sync_steps=30", "policy.kl_reference=initial", "policy.beta=0.1", "max_steps=20"],
     "the first sync would come after the last step"),
])
def test_bad_reference_and_lora_options_fail_before_any_work(overrides, message):
    with pytest.raises(ConfigError, match=message):
        check_rl_config(load_config(RLConfig, None, overrides))

