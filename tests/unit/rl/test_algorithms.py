"""The RL algorithm interface: a fourth algorithm defined in this file (not in the library) is
loaded as a plugin and trains through `tracerl rl`; the registry's errors; the loop is generic."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tracerl.config import load_config
from tracerl.errors import ConfigError
from tracerl.objectives import build_trace_rows
from tracerl.rl import RLConfig, algorithm_names, make_algorithm, register_algorithm
from tracerl.rl.algorithms import Algorithm



@dataclass
class ConstantOptions:
    scale: float = 1.0  # every response's advantage
    log_file: str = ""  # where rows() notes how many responses it got (what the test checks)


@register_algorithm
class ConstantAdvantage(Algorithm):
    """Trace rows, the same advantage for every response (reinforce whatever was sampled: the
    untrained start scores 0 everywhere, so a reward-based advantage would be 0 and train nothing)."""

    name = "test_constant"
    Options = ConstantOptions

    def rows(self, model, examples, generator, *, block_size, pad_id):
        if self.options.log_file:
            with open(self.options.log_file, "a") as f:
                f.write(f"{len(examples)}\n")
        return build_trace_rows(model.spec, examples, block_size=block_size, pad_id=pad_id)

    def advantages(self, rewards, group_ids, correct):
        _, keep = super().advantages(rewards, group_ids, correct)
        return torch.full(keep.shape, self.options.scale), keep


TASK = ["task.source=gym", "task.name=basic_arithmetic", "task.size=64", "task.template=raw", "task.chat=false",
        'task.params={min_terms: 2, max_terms: 2, min_digits: 1, max_digits: 1, operators: ["+"], '
        "allow_parentheses: false, allow_negation: false}"]


def test_a_plugin_algorithm_trains_through_tracerl_rl(tmp_path):
    out, log = tmp_path / "run", tmp_path / "rows.log"
    cmd = [sys.executable, "-m", "tracerl.cli", "rl", *TASK, f"output_dir={out}", f"plugins=[{__file__}]",
           "policy.method=test_constant", f"policy.options.test_constant.log_file={log}", "policy.options.test_constant.scale=0.5",
           "policy.filter_equal=false", "rollout.num_prompts=4", "rollout.group_size=4",
           "rollout.sampling.max_new_tokens=4", "rollout.sampling.temperature=1.0", "loop.micro_batch=8",
           "optim.lr=1e-3", "max_steps=2", "--no-progress", "--json"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["method"] == "test_constant" and summary["steps"] == 2
    assert log.read_text().split() == ["16", "16"]  # every response of both steps reached its rows()
    saved = json.loads((out / "config.json").read_text())["policy"]["options"]
    assert saved["test_constant"] == {"scale": 0.5, "log_file": str(log)}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["optimizer_updates"] >= 1 for r in rows)
    trained = load_file(out / "checkpoints" / "step-00000002" / "model.safetensors")
    from tracerl.models import load_model

    initial = load_model("tiny-block").backbone.state_dict()
    assert max(float((trained[k] - initial[k]).abs().max()) for k in trained) > 1e-4  # it trained


def test_algorithm_options_are_typed_and_errors_name_the_key():
    config = load_config(RLConfig, None, ["policy.method=test_constant", "policy.options.test_constant.scale=2"])
    algorithm = make_algorithm(config.policy)
    assert algorithm.options == ConstantOptions(scale=2.0) and config.policy.options["test_constant"]["log_file"] == ""
    with pytest.raises(ConfigError, match=r"policy\.options\.test_constant\.scal\b.*scale"):
        make_algorithm(load_config(RLConfig, None, ["policy.method=test_constant", "policy.options.test_constant.scal=2"]).policy)
    with pytest.raises(ConfigError, match=r"policy\.options\.tracerl\.shrink must be an integer"):
        make_algorithm(load_config(RLConfig, None, ["policy.options.tracerl.shrink=two"]).policy)
    with pytest.raises(ConfigError, match=r"policy\.options\.grpo: no RL algorithm"):
        make_algorithm(load_config(RLConfig, None, ["policy.options.grpo.x=1"]).policy)
    with pytest.raises(ConfigError, match=r"policy\.method: unknown 'grpo'; valid: tracerl, random_masking, coupled.*test_constant"):
        make_algorithm(load_config(RLConfig, None, ["policy.method=grpo"]).policy)
    # Sections of other algorithms may stay in a config that switches policy.method.
    config = load_config(RLConfig, None, ["policy.method=coupled", "policy.options.tracerl.shrink=2"])
    assert make_algorithm(config.policy).options.mask_samples == 1


def test_register_refuses_a_name_clash_and_a_bad_value_model_use():
    class Clash(Algorithm):
        name = "tracerl"

    class Bad(Algorithm):
        name = "test_bad"
        value_model = "sometimes"

    with pytest.raises(ValueError, match="already registered"):
        register_algorithm(Clash)
    with pytest.raises(TypeError, match="value_model"):
        register_algorithm(Bad)
    assert "test_bad" not in algorithm_names()


def test_the_rl_loop_names_no_method():
    import tracerl.rl.loop

    source = Path(tracerl.rl.loop.__file__).read_text()
    builtin = algorithm_names()  # every registered method, plugins of this file included
    found = [m for m in builtin if re.search(rf"\b{m}\b", source)]
    assert found == [], f"rl/loop.py mentions {found}: the loop must be generic over the algorithm"


def test_a_masking_subclass_builds_its_parents_rows_and_mask_levels_are_checked_early():
    from tracerl.models import load_model
    from tracerl.objectives import Example
    from tracerl.rl.algorithms.coupled import Coupled

    class WiderCoupled(Coupled):  # a plugin variant of a built-in: inherits its rows
        name = "test_wider_coupled"

    register_algorithm(WiderCoupled)
    model = load_model("tiny-block")
    config = load_config(RLConfig, None, ["policy.method=test_wider_coupled"])
    algorithm = make_algorithm(config.policy)
    examples = [Example([65, 66, 67], [70, 71, 72, 73, 74])]
    rows = algorithm.rows(model, examples, torch.Generator().manual_seed(0), block_size=None, pad_id=None)
    reference = make_algorithm(load_config(RLConfig, None, ["policy.method=coupled"]).policy).rows(
        model, examples, torch.Generator().manual_seed(0), block_size=None, pad_id=None)
    assert torch.equal(rows.input_ids, reference.input_ids) and rows.num_targets == 5  # mask + complement
    with pytest.raises(ConfigError, match=r"noise_low, noise_high: need 0 < noise_low <= noise_high <= 1"):
        make_algorithm(load_config(RLConfig, None, ["policy.method=random_masking",
                                                    "policy.options.random_masking.noise_low=0.95"]).policy)
    with pytest.raises(ConfigError, match=r"policy\.options\.coupled\.noise_high: must be < 1"):
        make_algorithm(load_config(RLConfig, None, ["policy.method=coupled",
                                                    "policy.options.coupled.noise_high=1.0"]).policy)
