"""tracerl/config.py: YAML with a budget on aliases, UTF-8 config files, and errors of nested
sections that name their key in full."""

from __future__ import annotations

import pytest

from tracerl.config import MAX_YAML_VALUES, load_config, parse_yaml
from tracerl.errors import ConfigError
from tracerl.recipes.sft import SFTConfig
from tracerl.rl import RLConfig


def test_aliases_and_merges_within_the_budget_load():
    loaded = parse_yaml("base: &b {x: 1, y: [1, 2]}\none: {<<: *b, y: 3}\ntwo: *b\n")
    assert loaded == {"base": {"x": 1, "y": [1, 2]}, "one": {"x": 1, "y": 3}, "two": {"x": 1, "y": [1, 2]}}


def test_an_alias_bomb_is_refused_at_the_alias_that_crosses_the_budget(tmp_path):
    rows = ['a0: &a0 [' + ", ".join(["lol"] * 10) + "]"]
    rows += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 5)]
    path = tmp_path / "bomb.yaml"
    path.write_text("data:\n  task:\n    params:\n" + "".join(f"      {r}\n" for r in rows))
    # a1..a3 expand to ~12 000 values; a4 (line 8) repeats a3's 11 111 ten times: it crosses 100 000.
    assert MAX_YAML_VALUES == 100_000
    with pytest.raises(ConfigError, match=rf"^{path}:8: invalid YAML: aliases expand to more than "
                                          rf"{MAX_YAML_VALUES} values"):
        load_config(SFTConfig, path)
    assert parse_yaml("\n".join(rows[:4]))["a3"][0][0][0][0] == "lol"  # below the budget: fine


def test_a_recursive_alias_is_refused(tmp_path):
    path = tmp_path / "loop.yaml"
    path.write_text("data:\n  task:\n    params: &p {again: *p}\n")
    with pytest.raises(ConfigError, match=rf"^{path}:3: invalid YAML: an alias inside its own anchor"):
        load_config(SFTConfig, path)


@pytest.mark.parametrize("schema,override,message", [
    (SFTConfig, "data.task.seed=-1", "config: data.task.seed: must be in [0, 2**31), got -1"),
    (SFTConfig, "eval.task.size=-2", "config: eval.task.size: must be >= 0, got -2"),
    (RLConfig, "rollout.sampling.top_p=2.0", "config: rollout.sampling.top_p: must be in (0, 1], got 2.0"),
    (RLConfig, "task.seed=-1", "config: task.seed: must be in [0, 2**31), got -1"),
    (RLConfig, "loop.micro_batch=0", "config: loop.micro_batch and loop.accumulation must be >= 1"),
])
def test_a_nested_section_names_its_key_in_full(schema, override, message):
    with pytest.raises(ConfigError) as err:
        load_config(schema, None, [override])
    assert str(err.value) == message
